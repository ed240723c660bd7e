"""Listen and look: MIDI to peak-normalised audio (MP3/WAV/FLAC/OGG) and to a piano-roll PNG.

Audio goes through the `fluidsynth` CLI with a General MIDI soundfont (Debian:
``apt-get install -y --no-install-recommends fluidsynth`` also brings
/usr/share/sounds/sf2/TimGM6mb.sf2). Without the binary, or with ``renderer="numpy"`` /
``MUSEGEN_RENDERER=numpy``, a small additive synthesiser in numpy plays the notes instead,
so tests and CPU-only machines never need apt. Encoding is soundfile's (libsndfile 1.2 has
an MP3 writer). Facts and timings: research/evaluation-and-audio.md sections 4-5.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import miditoolkit
import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

#: searched in order when no soundfont is given: Debian's TimGM6mb (small, fast), the
#: larger FluidR3, then the TimGM6mb copy inside the pretty_midi wheel (always installed).
SOUNDFONTS = (
    Path("/usr/share/sounds/sf2/TimGM6mb.sf2"),
    Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
    Path("/usr/share/soundfonts/FluidR3_GM.sf2"),
    Path("/usr/share/sounds/sf2/default-GM.sf2"),
)
INSTALL_HINT = "apt-get install -y --no-install-recommends fluidsynth  # brings TimGM6mb.sf2"
#: libsndfile (format, subtype) by output suffix.
FORMATS = {
    ".mp3": ("MP3", "MPEG_LAYER_III"),
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}
PEAK = 10 ** (-1 / 20)  # normalise to -1 dBFS: loud and equal across samples, no clipping
SILENCE_SECONDS = 1.0  # what an empty MIDI file renders to
TAIL_SECONDS = 1.0  # numpy synth: room for the release after the last note-off


@dataclass(frozen=True)
class Rendered:
    """What `render_audio` wrote; usable as a path (``Path(rendered)``, ``open(rendered)``).

    Attributes:
        path: the audio file.
        renderer: ``fluidsynth``, ``numpy`` or ``silence`` (empty MIDI).
        soundfont: the soundfont FluidSynth used, else None.
        seconds: audio duration.
    """

    path: Path
    renderer: str
    soundfont: Path | None
    seconds: float

    def __fspath__(self) -> str:
        return str(self.path)


def pretty_midi_soundfont() -> Path:
    """The TimGM6mb.sf2 shipped inside the pretty_midi wheel (a pure-pip fallback)."""
    import pretty_midi

    return Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"


def find_soundfont(
    soundfont: Path | str | None = None, candidates: tuple[Path, ...] | None = None
) -> Path:
    """Return `soundfont`, else $MUSEGEN_SOUNDFONT, else the first candidate that exists.

    Raises:
        FileNotFoundError: the named soundfont is missing or no candidate exists; the
            message names what to install.
    """
    soundfont = soundfont or os.environ.get("MUSEGEN_SOUNDFONT")
    if soundfont:
        if not Path(soundfont).is_file():
            raise FileNotFoundError(
                f"{soundfont}: soundfont not found; pass an existing .sf2 or install one "
                f"with `{INSTALL_HINT}`"
            )
        return Path(soundfont)
    if candidates is None:
        candidates = (*SOUNDFONTS, pretty_midi_soundfont())
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no General MIDI soundfont found (looked in {', '.join(map(str, candidates))}); "
        f"install one with `{INSTALL_HINT}` or set MUSEGEN_SOUNDFONT"
    )


def _notes_seconds(midi: miditoolkit.MidiFile) -> np.ndarray:
    """(N, 4) float array [start_s, end_s, pitch, velocity] of every non-drum note."""
    notes = [n for inst in midi.instruments if not inst.is_drum for n in inst.notes]
    if not notes:
        return np.zeros((0, 4))
    ticks = np.array([(n.start, n.end, n.pitch, n.velocity) for n in notes], dtype=np.int64)
    # tick -> seconds through the tempo map (array of length max_tick + 1).
    seconds = midi.get_tick_to_time_mapping()
    last = len(seconds) - 1
    start, end = seconds[np.minimum(ticks[:, 0], last)], seconds[np.minimum(ticks[:, 1], last)]
    return np.column_stack([start, end, ticks[:, 2], ticks[:, 3]]).astype(np.float64)


def _tone(pitch: int, sample_rate: int, release: int) -> np.ndarray:
    """One struck note, long enough to decay to -43 dB (5 tau) plus the release."""
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    tau = 1.2 * 2 ** (-(pitch - 60) / 24)  # decay time: ~1.2 s at middle C, longer below
    t = np.arange(int(5 * tau * sample_rate) + release) / sample_rate  # (S,)
    env = np.exp(-t / tau) * np.minimum(t / 0.005, 1.0)  # 5 ms attack, no click
    partials = [k for k in range(1, 5) if f0 * k < sample_rate / 2]  # no aliasing
    tone = sum(0.5 ** (k - 1) * np.sin(2 * np.pi * f0 * k * t) for k in partials)
    return (env * tone).astype(np.float32)


def synthesize(notes: np.ndarray, sample_rate: int) -> np.ndarray:
    """Additive piano-ish tone per note: 4 harmonics, 5 ms attack, exponential decay.

    Ignores programs and pedal (a fallback for tests and CPU boxes, not for listening
    tests). Low notes ring longer, as on a piano.

    Args:
        notes: (N, 4) [start_s, end_s, pitch, velocity].
        sample_rate: Hz.

    Returns:
        Mono float32 audio, (samples,), not normalised.
    """
    length = int((notes[:, 1].max(initial=0.0) + TAIL_SECONDS) * sample_rate) + 1
    out = np.zeros(length, dtype=np.float32)
    release = int(0.2 * sample_rate)  # fade after note-off (damper)
    fade = np.linspace(1.0, 0.0, release, dtype=np.float32)
    tones: dict[int, np.ndarray] = {}  # pitch -> decaying tone; a piece uses ~60 pitches
    for start, end, pitch, velocity in notes:
        key = int(pitch)
        if key not in tones:
            tones[key] = _tone(key, sample_rate, release)
        tone = tones[key]
        held = min(max(int((end - start) * sample_rate), 1), len(tone) - release)
        seg = tone[: held + release] * np.float32(velocity / 127.0)
        seg[held:] *= fade
        i = int(start * sample_rate)
        out[i : i + len(seg)] += seg[: length - i]
    return out


def _fluidsynth(midi_path: Path, soundfont: Path, sample_rate: int) -> np.ndarray:
    """Render with the fluidsynth CLI to a temporary WAV; return mono float32."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        # -n no MIDI input, -i no shell, -q quiet; gain 0.6 keeps dense pieces off the clip
        # point (we normalise afterwards anyway).
        cmd = ["fluidsynth", "-ni", "-q", "-g", "0.6", "-F", str(wav), "-r", str(sample_rate)]
        proc = subprocess.run(
            [*cmd, str(soundfont), str(midi_path)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not wav.is_file():
            raise RuntimeError(
                f"{midi_path}: fluidsynth failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        audio, _ = sf.read(wav, dtype="float32", always_2d=True)
    return audio.mean(axis=1)  # (samples,) stereo -> mono


def _trim_tail(audio: np.ndarray, end_s: float, sample_rate: int, peak: float) -> np.ndarray:
    """Cut trailing near-silence (< -60 dB re. peak) after the last note-off.

    FluidSynth keeps writing reverb noise for up to ~20 s after the last note; a listener
    should not wait through it. Keeps 0.1 s after the last audible sample.
    """
    loud = np.flatnonzero(np.abs(audio) > peak * 1e-3)
    keep = max(int(end_s * sample_rate), int(loud[-1]) + int(0.1 * sample_rate))
    return audio[: min(keep, len(audio))]


def write_audio(audio: np.ndarray, out_path: Path, sample_rate: int) -> Path:
    """Write mono audio in the format named by `out_path`'s suffix (mp3, wav, flac, ogg).

    Written in blocks: one-shot OGG/Vorbis writes of over ~90 s crash libsndfile 1.2.2.

    Raises:
        ValueError: an unsupported suffix.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() not in FORMATS:
        raise ValueError(
            f"{out_path}: unsupported audio suffix {out_path.suffix!r}; use one of "
            f"{', '.join(FORMATS)}"
        )
    fmt, subtype = FORMATS[out_path.suffix.lower()]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(out_path, "w", sample_rate, 1, subtype, format=fmt) as f:
        for i in range(0, len(audio), 8192):
            f.write(audio[i : i + 8192])
    return out_path


def render_audio(
    midi_path: Path | str,
    out_path: Path | str,
    sample_rate: int = 22050,
    renderer: str = "auto",
    soundfont: Path | str | None = None,
) -> Rendered:
    """Render a MIDI file to peak-normalised mono audio.

    Args:
        midi_path: the MIDI file.
        out_path: .mp3, .wav, .flac or .ogg; the suffix picks the encoding.
        sample_rate: Hz (22.05 kHz is plenty for piano previews).
        renderer: ``fluidsynth``, ``numpy``, or ``auto`` ($MUSEGEN_RENDERER if set, else
            fluidsynth when the binary is on PATH, else numpy).
        soundfont: .sf2 for FluidSynth; default: `find_soundfont()`.

    Returns:
        A `Rendered` naming the file and the renderer used.

    Raises:
        FileNotFoundError: fluidsynth was asked for but is not installed, or no soundfont.
        ValueError: unknown renderer, unreadable MIDI or unsupported suffix.
    """
    midi_path, out_path = Path(midi_path), Path(out_path)
    if renderer == "auto":
        renderer = os.environ.get("MUSEGEN_RENDERER") or (
            "fluidsynth" if shutil.which("fluidsynth") else "numpy"
        )
    if renderer not in ("fluidsynth", "numpy"):
        raise ValueError(f"renderer {renderer!r}: expected auto, fluidsynth or numpy")
    try:
        notes = _notes_seconds(miditoolkit.MidiFile(midi_path))
    except Exception as err:
        raise ValueError(f"{midi_path}: cannot read MIDI ({err}); is it a .mid file?") from err

    font = None
    if not len(notes):
        renderer, audio = "silence", np.zeros(int(SILENCE_SECONDS * sample_rate), np.float32)
    elif renderer == "fluidsynth":
        if not shutil.which("fluidsynth"):
            raise FileNotFoundError(
                f"renderer fluidsynth: the `fluidsynth` binary is not on PATH; install it "
                f"with `{INSTALL_HINT}` or use renderer='numpy'"
            )
        font = find_soundfont(soundfont)
        audio = _fluidsynth(midi_path, font, sample_rate)
    else:
        audio = synthesize(notes, sample_rate)
    peak = float(np.abs(audio).max(initial=0.0))
    if peak > 0:
        audio = _trim_tail(audio, notes[:, 1].max(), sample_rate, peak) * (PEAK / peak)
    write_audio(audio, out_path, sample_rate)
    log.info("%s: rendered %s with %s", out_path, midi_path, renderer)
    return Rendered(out_path, renderer, font, len(audio) / sample_rate)


def piano_roll(
    midi: Path | str | miditoolkit.MidiFile,
    out_png: Path | str,
    *,
    width: float = 12.0,
    height: float = 4.0,
    dpi: int = 80,
    title: str | None = None,
    prompt_beats: float | None = None,
) -> Path:
    """Draw a piano roll: one rectangle per note, coloured by velocity, bar lines every 4 beats.

    x is in beats (the file's ticks_per_beat), labelled by bar number; y is cropped to the
    lowest pitch - 2 .. highest + 2 with black-key rows shaded and C labels. No title by
    default: in blind comparisons a title would reveal the checkpoint.

    Args:
        midi: a MIDI path or a miditoolkit.MidiFile.
        out_png: where to write; the image is exactly width*dpi x height*dpi pixels.
        width, height: figure size in inches.
        dpi: pixels per inch (80 keeps a report of many rolls light).
        title: optional title.
        prompt_beats: where the prompt ends (beats): a red line, the continuation after it.

    Returns:
        `out_png` as a Path.
    """
    # Figure + Agg canvas directly: no pyplot global state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not isinstance(midi, miditoolkit.MidiFile):
        midi = miditoolkit.MidiFile(midi)
    tpb = midi.ticks_per_beat
    notes = [n for inst in midi.instruments if not inst.is_drum for n in inst.notes]
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    if notes:
        low, high = min(n.pitch for n in notes) - 2, max(n.pitch for n in notes) + 2
        end_beat = max(n.end for n in notes) / tpb
    else:
        low, high, end_beat = 58, 74, 4.0  # an empty octave around middle C
        ax.text(0.5, 0.5, "no notes", transform=ax.transAxes, ha="center", va="center")
    for pitch in range(low, high + 1):
        if pitch % 12 in (1, 3, 6, 8, 10):  # black keys: C#, D#, F#, G#, A#
            ax.axhspan(pitch - 0.5, pitch + 0.5, color="0.93", zorder=0, lw=0)
    norm = Normalize(0, 127)  # fixed scale so rolls compare across samples
    rects = [
        Rectangle((n.start / tpb, n.pitch - 0.45), (n.end - n.start) / tpb, 0.9) for n in notes
    ]
    patches = PatchCollection(rects, cmap="viridis", norm=norm, zorder=2)
    patches.set_array(np.array([n.velocity for n in notes], dtype=float))
    ax.add_collection(patches)
    fig.colorbar(patches, ax=ax, label="velocity", pad=0.01)

    bars = np.arange(0, end_beat + 4, 4)  # 4/4: a bar is 4 beats (1920 ticks at 480 tpb)
    for x in bars:
        ax.axvline(x, color="0.6", lw=0.5, zorder=1)
    step = max(1, len(bars) // 16)  # at most ~16 bar labels
    ax.set_xticks(bars[::step], [str(int(b // 4) + 1) for b in bars[::step]])
    cs = [p for p in range(low, high + 1) if p % 12 == 0]
    ax.set_yticks(cs, [f"C{p // 12 - 1}" for p in cs])  # MIDI 60 = C4
    if prompt_beats is not None:
        ax.axvline(prompt_beats, color="tab:red", lw=1.5, zorder=3)
        end_beat = max(end_beat, prompt_beats)
    ax.set_xlim(0, end_beat)
    ax.set_ylim(low - 0.5, high + 0.5)
    ax.set_xlabel("bar")
    if title:
        ax.set_title(title)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)  # no bbox_inches="tight": it would change the pixel size
    return out_png


def loss_curves(
    history: list[dict],
    out_png: Path | str,
    *,
    checkpoints: list[int],
    marks: dict[str, int],
    dpi: int = 80,
) -> Path:
    """Validation curves a person can open offline: total and per-field valid loss by STEP.

    Top: train and valid loss (weighted sum); bottom: each field's valid loss. Grey dotted
    lines are the STEP checkpoints, coloured lines the STEPs in `marks` (label -> STEP, e.g.
    the best valid loss and the STEP the sweep chose).

    Args:
        history: the eval rows of a checkpoint (step, train_loss, valid_loss, valid_loss_<f>).
        out_png: where to write (PNG).
        checkpoints: STEPs with a checkpoint.
        marks: labelled STEPs to highlight.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([r["step"] for r in history])
    fields = [k.removeprefix("valid_loss_") for k in history[0] if k.startswith("valid_loss_")]
    fig = Figure(figsize=(10, 7), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.4])
    if "train_loss" in history[0]:
        top.plot(steps, [r["train_loss"] for r in history], "--", color="0.4", label="train")
    top.plot(steps, [r["valid_loss"] for r in history], color="k", lw=2, label="valid")
    top.set_ylabel("loss (sum of fields)")
    for f in fields:
        bottom.plot(steps, [r[f"valid_loss_{f}"] for r in history], label=f)
    bottom.set_ylabel("valid loss per field")
    bottom.set_yscale("log")
    bottom.set_xlabel("STEP")
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for ax in (top, bottom):
        for s in checkpoints:
            ax.axvline(s, color="0.7", lw=0.8, ls=":", zorder=0)
        for (label, s), c in zip(marks.items(), colours, strict=False):
            ax.axvline(s, color=c, lw=1.6, label=f"{label}: STEP {s}" if ax is top else None)
    top.legend(fontsize=8, loc="upper right")
    if fields:
        bottom.legend(fontsize=8, loc="upper right", ncols=2)
    top.set_title("validation curves (dotted: STEP checkpoints)")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    return out_png
