"""Transcription benchmark: render held-out corpus MIDI, transcribe it back, score it.

For each piece of the test and valid splits (prepare's hash split, so no training piece):
render it with the project's FluidSynth path (musegen.core.render), then make a second copy
with sox reverb plus white noise at --snr dB, and transcribe both with
`musegen.stages.transcribe` (streamed). Peers in the same run: basic-pitch's own `predict()`
(whole file in memory, its default decoding) for notes and speed, librosa's own tracker on
the audio (`beat_track(y=...)`) for beats. Scores (mir_eval): note F1 onset-only and
onset+offset, beat F-measure of the written tempo map (its 480-tick beats, back in seconds)
against the source's quarter-note beats, downbeat F-measure of its bars against the source's
bars. Speed: audio seconds / wall seconds, one file at a time on one thread, the whole
folder through `transcribe()` with every core (the command's own path), and the model alone
on one thread, with the 1-minute load average. Memory: peak RSS of a child process
transcribing --long-minutes of audio vs 1 minute.

    python -m bench.transcribe                        # data/raw/m21-keyboard, all held-out pieces
    python -m bench.transcribe --num-files 4 --long-minutes 0

Goals (issue 14): onset F1 >= 0.85 and beat F >= 0.9 on clean rendered piano; >= 10x real
time on 2 cores.
"""

from __future__ import annotations

import sys

# bench/tokenize.py is named like the stdlib's `tokenize`; run as a script, this folder would
# come first on sys.path and shadow it (pandas imports it). Drop the folder before imports.
sys.path = [p for p in sys.path if p not in ("", __file__.rpartition("/")[0] or ".")]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from musegen.config import load_section  # noqa: E402
from musegen.core.midi import BAR_TICKS, TICKS_PER_BEAT  # noqa: E402
from musegen.stages import transcribe as tr  # noqa: E402
from musegen.stages.prepare import PrepareParams, split_of  # noqa: E402

DEFAULT_DIR = Path("data/raw/m21-keyboard")


def held_out(midi_dir: Path, n: int, params: Path) -> list[Path]:
    """The first n test-split files (then valid), by prepare's own hash split; n = 0: all."""
    p = load_section(PrepareParams, "prepare", params)
    files = sorted(midi_dir.glob("*.mid"))
    split = {
        f: split_of(hashlib.sha256(f.read_bytes()).hexdigest(), p.valid_percent, p.test_percent)
        for f in files
    }
    chosen = [f for f in files if split[f] == "test"] + [f for f in files if split[f] == "valid"]
    return chosen[: n or None]


def reference(midi_path: Path) -> dict[str, np.ndarray]:
    """Source notes (s), quarter-note beats and bar starts (s) from the MIDI's tempo map."""
    import miditoolkit

    midi = miditoolkit.MidiFile(str(midi_path))
    seconds = midi.get_tick_to_time_mapping()
    tpb = midi.ticks_per_beat
    notes = [n for i in midi.instruments if not i.is_drum for n in i.notes]
    end = max(n.end for n in notes)
    beats = seconds[np.arange(0, end, tpb)]
    sigs = midi.time_signature_changes or [miditoolkit.TimeSignature(4, 4, 0)]
    bars, tick = [], 0
    for i, ts in enumerate(sigs):  # bar starts under each time signature until the next
        stop = sigs[i + 1].time if i + 1 < len(sigs) else end
        tick = max(tick, ts.time)
        while tick < stop:
            bars.append(tick)
            tick += ts.numerator * tpb * 4 // ts.denominator
    table = np.array(
        [(seconds[n.start], seconds[min(n.end, len(seconds) - 1)], n.pitch) for n in notes]
    )
    return {"notes": table, "beats": beats, "bars": seconds[np.array(bars)]}


def written(midi: object, grid0: float, path: Path) -> dict[str, np.ndarray]:
    """What the written MIDI says, back in audio seconds: notes, 480-tick beats, 4/4 bars."""
    import miditoolkit

    midi.dump(str(path))  # and read back: what the corpus holds
    midi = miditoolkit.MidiFile(str(path))
    seconds = midi.get_tick_to_time_mapping() + grid0
    notes = midi.instruments[0].notes
    last = len(seconds) - 1
    table = np.array(
        [(seconds[min(n.start, last)], seconds[min(n.end, last)], n.pitch) for n in notes]
    )
    beats, bars = (seconds[np.arange(0, last, ticks)] for ticks in (TICKS_PER_BEAT, BAR_TICKS))
    return {"notes": table, "beats": beats[beats >= 0], "bars": bars}


def score(ref: dict[str, np.ndarray], est: dict[str, np.ndarray]) -> dict[str, float]:
    import mir_eval
    import pretty_midi

    hz = pretty_midi.note_number_to_hz
    args = (
        ref["notes"][:, :2],
        hz(ref["notes"][:, 2]),
        est["notes"][:, :2],
        hz(est["notes"][:, 2]),
    )
    out = {
        "onset_f1": mir_eval.transcription.precision_recall_f1_overlap(*args, offset_ratio=None)[2],
        "onset_offset_f1": mir_eval.transcription.precision_recall_f1_overlap(*args)[2],
    }
    if "beats" in est:
        out["beat_f"] = mir_eval.beat.f_measure(ref["beats"], est["beats"])
        out["downbeat_f"] = mir_eval.beat.f_measure(ref["bars"], est["bars"])
    return out


def degrade(clean: Path, out: Path, snr_db: float, seed: int) -> Path:
    """sox reverb (50 % reverberance, 50 % HF damping, 100 % room) + white noise at snr_db."""
    import soundfile as sf

    wet = out.with_suffix(".rev.wav")
    subprocess.run(["sox", str(clean), str(wet), "reverb", "50", "50", "100"], check=True)
    audio, sr = sf.read(wet, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    rms = float(np.sqrt(np.mean(audio**2)))
    noise = np.random.default_rng(seed).standard_normal(len(audio)).astype(np.float32)
    audio = audio + noise * rms * 10 ** (-snr_db / 20)
    sf.write(out, audio / max(1.0, float(np.abs(audio).max())), sr)
    wet.unlink()
    return out


def peak_rss_mb(audio: Path, params_file: Path) -> float:
    """Peak RSS (MB) of a fresh process that transcribes `audio`."""
    code = (
        "import sys, resource; from pathlib import Path;"
        "from musegen.stages import transcribe as tr;"
        "from musegen.config import load_section;"
        "p = load_section(tr.TranscribeParams, 'transcribe', sys.argv[2]);"
        "import dataclasses; p = dataclasses.replace(p, max_seconds=1e6);"
        "tr.transcribe_audio(Path(sys.argv[1]), p, tr.load_model(1));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(audio), str(params_file)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def model_alone(session: object, wav: Path, seconds: float = 10.0) -> float:
    """The model's own speed on one thread: audio seconds per wall second, batches of windows
    of `wav` run for about `seconds` (no decoding, note or beat work)."""
    import soundfile as sf

    audio, _ = sf.read(wav, dtype="float32")  # rendered at the model's 22.05 kHz
    n = tr.BATCH
    batch = np.zeros((n, tr.WINDOW, 1), np.float32)
    for i in range(n):
        piece = audio[i * tr.WINDOW_HOP : i * tr.WINDOW_HOP + tr.WINDOW]
        batch[i, : len(piece), 0] = piece
    inp = session.get_inputs()[0].name
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {inp: batch})
        runs += 1
    return round(runs * n * tr.WINDOW_HOP / tr.SAMPLE_RATE / (time.perf_counter() - t0), 1)


def tile(src: Path, out: Path, minutes: float) -> Path:
    """`src` repeated to `minutes` of audio, written in blocks (FLAC)."""
    import soundfile as sf

    audio, sr = sf.read(src, dtype="float32")
    need = int(minutes * 60 * sr)
    with sf.SoundFile(out, "w", sr, 1, "PCM_16", format="FLAC") as f:
        for i in range(0, need, len(audio)):
            f.write(audio[: min(len(audio), need - i)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--midi-dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--num-files", type=int, default=0, help="0 = every held-out piece")
    ap.add_argument("--snr", type=float, default=20.0, help="noise level of the degraded copy")
    ap.add_argument("--long-minutes", type=float, default=20, help="memory check; 0 = skip")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    from musegen.core.render import render_audio

    params = load_section(tr.TranscribeParams, "transcribe", args.params)
    files = held_out(args.midi_dir, args.num_files, args.params)
    work = Path(tempfile.mkdtemp(prefix="bench-transcribe-"))
    clean_dir, noisy_dir = work / "clean", work / "noisy"
    clean_dir.mkdir()
    noisy_dir.mkdir()
    use_sox = shutil.which("sox") is not None
    for i, f in enumerate(files):
        render_audio(f, clean_dir / f"{f.stem}.wav", renderer="fluidsynth")
        if use_sox:
            degrade(clean_dir / f"{f.stem}.wav", noisy_dir / f"{f.stem}.wav", args.snr, i)
    print(f"{len(files)} held-out pieces from {args.midi_dir}, rendered to {work}")

    import librosa
    import mir_eval
    from basic_pitch.inference import Model, predict

    session = tr.load_model(1)
    peer = Model(
        Path(__import__("basic_pitch").__file__).parent / "saved_models/icassp_2022/nmp.onnx"
    )
    rows, audio_s, ours_s, peer_s = [], 0.0, 0.0, 0.0
    load = {"start": os.getloadavg()[0]}
    tr.transcribe_audio(clean_dir / f"{files[0].stem}.wav", params, session)  # warm up (JIT)
    model_x = model_alone(session, clean_dir / f"{files[0].stem}.wav")
    for f in files:
        ref = reference(f)
        for kind in ("clean", "noisy") if use_sox else ("clean",):
            wav = work / kind / f"{f.stem}.wav"
            t0 = time.perf_counter()
            midi, info = tr.transcribe_audio(wav, params, session)
            took = time.perf_counter() - t0
            grid0 = tr.beat_grid(info["beats"], 0)[0]
            row = {"file": f.name, "kind": kind, "seconds": info["seconds"]}
            row |= score(ref, written(midi, grid0, work / f"{kind}-{f.stem}.mid"))
            if kind == "clean":
                audio_s, ours_s = audio_s + info["seconds"], ours_s + took
                t0 = time.perf_counter()
                _, _, events = predict(
                    str(wav),
                    peer,
                    params.onset_threshold,
                    params.frame_threshold,
                    params.min_note_ms,
                )
                peer_s += time.perf_counter() - t0
                peer_notes = {"notes": np.array([(s, e, p) for s, e, p, *_ in events])}
                row["peer_onset_f1"] = score(ref, peer_notes)["onset_f1"]
                # beat peer: librosa's tracker on the audio's own onset strength
                y, sr = librosa.load(wav, sr=None)
                _, peer_beats = librosa.beat.beat_track(y=y, sr=sr, units="time")
                row["peer_beat_f"] = mir_eval.beat.f_measure(ref["beats"], peer_beats)
            rows.append(row)
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            )

    def mean(kind: str, key: str) -> float:
        vals = [r[key] for r in rows if r["kind"] == kind and key in r]
        return float(np.mean(vals)) if vals else float("nan")

    # the command's own path: every core, one worker per core, a folder of clean audio
    out_dir = work / "corpus"
    load["folder"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    report = tr.transcribe(
        clean_dir, out_dir, dataclasses.replace(params, num_workers=0), progress=False
    )
    folder_s = time.perf_counter() - t0
    folder_audio = float(report.seconds.astype(float).sum())
    figures = {
        "files": len(files),
        "audio_minutes": round(audio_s / 60, 2),
        "clean": {
            k: round(mean("clean", k), 3)
            for k in (
                "onset_f1",
                "onset_offset_f1",
                "beat_f",
                "downbeat_f",
                "peer_onset_f1",
                "peer_beat_f",
            )
        },
        "noisy": {
            k: round(mean("noisy", k), 3)
            for k in ("onset_f1", "onset_offset_f1", "beat_f", "downbeat_f")
        },
        "x_realtime_1_thread": round(audio_s / ours_s, 1),
        "peer_x_realtime_1_thread": round(audio_s / peer_s, 1),
        "x_realtime_folder_all_cores": round(folder_audio / folder_s, 1),
        "x_realtime_model_alone_1_thread": model_x,
        "cores": os.cpu_count(),
        "load_avg_1min": {k: round(v, 1) for k, v in load.items()},
        "beat_f_below_0.9": {
            r["file"]: round(r["beat_f"], 3)
            for r in rows
            if r["kind"] == "clean" and r["beat_f"] < 0.9
        },
    }
    if args.long_minutes:
        one = tile(clean_dir / f"{files[0].stem}.wav", work / "one.flac", 1)
        long = tile(clean_dir / f"{files[0].stem}.wav", work / "long.flac", args.long_minutes)
        figures["peak_rss_mb_1_min"] = round(peak_rss_mb(one, args.params))
        figures[f"peak_rss_mb_{args.long_minutes:g}_min"] = round(peak_rss_mb(long, args.params))
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "rows": rows}, indent=2) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
