"""Audio rendering (FluidSynth and the numpy fallback) and piano rolls, on real MIDI."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.image as mpimg
import miditoolkit
import numpy as np
import pytest
import soundfile as sf
from miditoolkit.midi.utils import example_midi_file

from musegen.core import render
from tests.conftest import needs

#: the Pop1K7 piece shipped with miditoolkit: 930 notes, last note-off at 79.0 s.
EXAMPLE = Path(example_midi_file())
EXAMPLE_END_S = 79.0
HAS_FLUIDSYNTH = shutil.which("fluidsynth") is not None


def _one_note(path: Path, pitch: int = 69, seconds: float = 1.0) -> Path:
    """A MIDI file with one note at 120 BPM (480 ticks/beat: 960 ticks per second)."""
    midi = miditoolkit.MidiFile(ticks_per_beat=480)
    midi.tempo_changes = [miditoolkit.TempoChange(120, 0)]
    piano = miditoolkit.Instrument(program=0, name="piano")
    piano.notes = [miditoolkit.Note(velocity=90, pitch=pitch, start=0, end=int(960 * seconds))]
    midi.instruments = [piano]
    midi.dump(path)
    return path


def _empty(path: Path) -> Path:
    midi = miditoolkit.MidiFile(ticks_per_beat=480)
    midi.instruments = [miditoolkit.Instrument(program=0)]
    midi.dump(path)
    return path


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio))))


# --- audio ------------------------------------------------------------------------------


def test_fallback_plays_the_note_frequency(tmp_path: Path) -> None:
    midi = _one_note(tmp_path / "a4.mid", pitch=69, seconds=1.0)
    out = render.render_audio(midi, tmp_path / "a4.wav", sample_rate=22050, renderer="numpy")
    audio, sr = sf.read(out.path)
    assert (out.renderer, sr, audio.ndim) == ("numpy", 22050, 1)
    assert 1.0 <= len(audio) / sr <= 1.0 + render.TAIL_SECONDS + 0.1
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    peak_hz = np.fft.rfftfreq(len(audio), 1 / sr)[spectrum.argmax()]
    assert peak_hz == pytest.approx(440.0, abs=2.0)
    assert np.abs(audio).max() == pytest.approx(render.PEAK, abs=1e-3)  # peak-normalised


def test_fallback_mp3_of_a_real_piece_decodes(tmp_path: Path) -> None:
    out = render.render_audio(EXAMPLE, tmp_path / "ex.mp3", renderer="numpy")
    audio, sr = sf.read(out.path)  # the MP3 decodes back
    assert out.renderer == "numpy" and out.soundfont is None
    assert EXAMPLE_END_S <= len(audio) / sr <= EXAMPLE_END_S + 3.0
    assert _rms(audio) > 0.02  # music, not silence
    assert np.abs(audio).max() <= 1.0


@needs(
    "fluidsynth", install="apt-get install --no-install-recommends fluidsynth timgm6mb-soundfont"
)
def test_fluidsynth_mp3_of_a_real_piece(tmp_path: Path) -> None:
    out = render.render_audio(EXAMPLE, tmp_path / "ex.mp3", renderer="fluidsynth")
    audio, sr = sf.read(out.path)
    assert out.renderer == "fluidsynth" and out.soundfont is not None and out.soundfont.is_file()
    # FluidSynth rings on after the last note-off; the trim keeps only the audible release.
    assert EXAMPLE_END_S <= len(audio) / sr <= EXAMPLE_END_S + 3.0
    assert _rms(audio) > 0.02
    assert np.abs(audio).max() == pytest.approx(render.PEAK, abs=0.05)  # MP3 rounding
    # every 10 s window holds sound: no dropped stretch
    windows = audio[: int(EXAMPLE_END_S) // 10 * 10 * sr].reshape(-1, 10 * sr)
    assert all(_rms(w) > 1e-3 for w in windows)


def test_env_var_forces_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSEGEN_RENDERER", "numpy")
    midi = _one_note(tmp_path / "n.mid")
    assert render.render_audio(midi, tmp_path / "n.wav").renderer == "numpy"


def test_auto_without_fluidsynth_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MUSEGEN_RENDERER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no fluidsynth on PATH
    midi = _one_note(tmp_path / "n.mid")
    assert render.render_audio(midi, tmp_path / "n.wav").renderer == "numpy"
    with pytest.raises(FileNotFoundError, match=r"apt-get install .*fluidsynth"):
        render.render_audio(midi, tmp_path / "n.wav", renderer="fluidsynth")


@pytest.mark.parametrize("renderer", ["auto", "numpy"])
def test_empty_midi_renders_short_silence(tmp_path: Path, renderer: str) -> None:
    out = render.render_audio(_empty(tmp_path / "e.mid"), tmp_path / "e.mp3", renderer=renderer)
    audio, sr = sf.read(out.path)
    assert out.renderer == "silence"
    assert len(audio) / sr == pytest.approx(render.SILENCE_SECONDS, abs=0.1)
    assert np.abs(audio).max() < 1e-3


def test_missing_soundfont_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MUSEGEN_SOUNDFONT", raising=False)
    with pytest.raises(FileNotFoundError, match=r"nope\.sf2.*apt-get install"):
        render.find_soundfont(tmp_path / "nope.sf2")
    with pytest.raises(FileNotFoundError, match=r"no General MIDI soundfont.*apt-get install"):
        render.find_soundfont(candidates=(tmp_path / "a.sf2",))
    # the pretty_midi wheel's copy is the pure-pip fallback, and it is a real file
    assert render.pretty_midi_soundfont().stat().st_size > 1_000_000
    if HAS_FLUIDSYNTH:
        with pytest.raises(FileNotFoundError, match="apt-get install"):
            render.render_audio(
                _one_note(tmp_path / "n.mid"),
                tmp_path / "n.wav",
                renderer="fluidsynth",
                soundfont=tmp_path / "nope.sf2",
            )


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    midi = _one_note(tmp_path / "n.mid")
    with pytest.raises(ValueError, match=r"n\.aiff.*\.mp3"):
        render.render_audio(midi, tmp_path / "n.aiff", renderer="numpy")
    corrupt = tmp_path / "corrupt.mid"
    corrupt.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    with pytest.raises(ValueError, match=r"corrupt\.mid: cannot read MIDI"):
        render.render_audio(corrupt, tmp_path / "c.wav")
    with pytest.raises(ValueError, match="renderer 'timidity'"):
        render.render_audio(midi, tmp_path / "n.wav", renderer="timidity")


# --- piano roll -------------------------------------------------------------------------


def test_piano_roll_is_an_image_of_the_requested_size(tmp_path: Path) -> None:
    png = render.piano_roll(EXAMPLE, tmp_path / "roll.png", width=6, height=3, dpi=50)
    image = mpimg.imread(png)
    assert image.shape[:2] == (150, 300)  # height*dpi x width*dpi, pixels
    # notes are drawn in viridis: a good share of pixels are saturated, not grey or white
    rgb = image[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2
    assert coloured.mean() > 0.05


def test_piano_roll_same_from_path_and_midifile(tmp_path: Path) -> None:
    a = render.piano_roll(EXAMPLE, tmp_path / "a.png", dpi=40)
    b = render.piano_roll(miditoolkit.MidiFile(EXAMPLE), tmp_path / "b.png", dpi=40)
    assert np.array_equal(mpimg.imread(a), mpimg.imread(b))


def test_piano_roll_marks_where_the_prompt_ends(tmp_path: Path) -> None:
    """A red vertical line at the prompt's end: one column of red pixels spanning the roll."""
    png = render.piano_roll(_empty(tmp_path / "e.mid"), tmp_path / "p.png", dpi=40, prompt_beats=2)
    rgb = mpimg.imread(png)[..., :3]
    red = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.4) & (rgb[..., 2] < 0.4)
    columns = np.flatnonzero(red.sum(axis=0) > 0.5 * rgb.shape[0])
    assert len(columns) and columns.max() - columns.min() <= 3  # one line
    plain = mpimg.imread(render.piano_roll(_empty(tmp_path / "e.mid"), tmp_path / "n.png", dpi=40))
    assert not ((plain[..., 0] > 0.7) & (plain[..., 1] < 0.4) & (plain[..., 2] < 0.4)).any()


def test_loss_curves_mark_checkpoints_and_chosen_steps(tmp_path: Path) -> None:
    history = [
        {"step": s, "train_loss": 5 - s / 100, "valid_loss": 4 + (s - 300) ** 2 / 1e5}
        | {"valid_loss_pitch": 2 + s / 1000, "valid_loss_duration": 1.0}
        for s in range(50, 650, 50)
    ]
    marks = {"best valid loss": 300, "best sweep score": 500}
    png = render.loss_curves(history, tmp_path / "c.png", checkpoints=[100, 300, 500], marks=marks)
    rgb = mpimg.imread(png)[..., :3]
    assert rgb.shape[:2] == (560, 800)
    red = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.4) & (rgb[..., 2] < 0.4)
    assert (red.sum(axis=0) > 0.3 * rgb.shape[0]).any()  # the best-valid STEP's line


def test_piano_roll_of_an_empty_file(tmp_path: Path) -> None:
    png = render.piano_roll(_empty(tmp_path / "e.mid"), tmp_path / "e.png", dpi=40)
    image = mpimg.imread(png)
    assert image.shape[:2] == (160, 480)
    rgb = image[..., :3]
    # only the colour bar is coloured: the plot area holds no note rectangles
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2
    assert coloured[:, : int(0.8 * image.shape[1])].sum() == 0
