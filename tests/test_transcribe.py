"""`musegen corpus transcribe`: crafted bad audio gets reasons; real rendered audio becomes a
corpus that prepare accepts and tokenize encodes; the tempo map puts each beat at 480 ticks.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import miditoolkit
import numpy as np
import pytest
import soundfile as sf

from musegen.config import load_section
from musegen.stages import transcribe as tr

ROOT = Path(__file__).resolve().parents[1]
SR = 22050


@pytest.fixture(scope="module")
def params() -> tr.TranscribeParams:
    return load_section(tr.TranscribeParams, "transcribe", ROOT / "params.yaml")


def _tone(seconds: float, hz: float = 1000.0, level: float = 0.5) -> np.ndarray:
    return (level * np.sin(2 * np.pi * hz * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def _tempo_events(path: Path) -> list[tuple[int, float]]:
    """(tick, BPM) of every set_tempo event, as written."""
    import mido

    tick, out = 0, []
    for msg in mido.merge_tracks(mido.MidiFile(path).tracks):
        tick += msg.time
        if msg.type == "set_tempo":
            out.append((tick, mido.tempo2bpm(msg.tempo)))
    return out


def test_bad_files_get_reasons_and_a_rerun_skips_them(tmp_path, params):
    audio, out = tmp_path / "audio", tmp_path / "out"
    audio.mkdir()
    sf.write(audio / "cut.wav", _tone(3), SR)
    data = (audio / "cut.wav").read_bytes()
    (audio / "cut.wav").write_bytes(data[: len(data) // 2])  # header promises 3 s
    (audio / "random.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (audio / "empty.mp3").write_bytes(b"")
    (audio / "notes.txt").write_text("not audio\n")
    sf.write(audio / "silence.wav", np.zeros(3 * SR, np.float32), SR)
    sf.write(audio / "silence.flac", np.zeros(3 * SR, np.float32), SR)  # same MIDI name
    sf.write(audio / "sine.wav", _tone(4), SR)  # 1 kHz: one held pitch, no rhythm
    shutil.copy(audio / "sine.wav", audio / "sine2.wav")
    sf.write(audio / "blip.ogg", _tone(0.5), SR)
    sf.write(audio / "long.flac", _tone(7, 440), SR)
    os.mkfifo(audio / "pipe.wav")  # opening it would block forever: refused from stat()
    p = dataclasses.replace(params, max_seconds=6, num_workers=1)

    report = tr.transcribe(audio, out, p, progress=False)
    reasons = dict(zip(report.path, report.reason, strict=True))
    assert reasons == {
        "blip.ogg": "too_short",
        "cut.wav": "corrupt",
        "empty.mp3": "not_audio",
        "long.flac": "too_long",
        "notes.txt": "not_audio",
        "pipe.wav": "not_regular",
        "random.wav": "not_audio",
        "silence.flac": "silent",
        "silence.wav": "name_clash",
        "sine2.wav": "duplicate",
        "sine.wav": "no_notes",
    }
    assert (report.status == "rejected").all() and all(report.detail.str.len() > 0)
    assert not list(out.glob("**/*.mid"))
    assert (audio / "transcribe.csv").is_file()

    (audio / "silence.flac").unlink()  # the clash is gone: silence.wav is checked now
    again = tr.transcribe(audio, out, p, progress=False)
    assert dict(zip(again.path, again.reason, strict=True)) == {
        **{k: v for k, v in reasons.items() if k != "silence.flac"},
        "silence.wav": "silent",
    }


def test_rendered_audio_becomes_a_corpus_prepare_and_tokenize_accept(tmp_path, real_midi_dir):
    """As the README says: transcribe, then prepare; then the tokenize stage encodes it."""
    import mir_eval

    from musegen.core.render import render_audio
    from musegen.stages.tokenize import TokenizeParams, tokenize

    audio = tmp_path / "recordings"
    audio.mkdir()
    sources = {"bach__bwv269": ".flac", "bach__bwv347": ".mp3"}
    for stem, suffix in sources.items():
        wav = render_audio(real_midi_dir / f"{stem}.mid", tmp_path / f"{stem}.wav")
        clip, sr = sf.read(wav, dtype="float32")
        sf.write(audio / f"{stem}{suffix}", clip[: 12 * sr], sr)  # a few seconds each
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    musegen = [sys.executable, "-m", "musegen"]
    cmd = [*musegen, "corpus", "transcribe", "--audio", "recordings", "--out", "data/raw/mine"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "2 ok" in run.stdout, run.stdout
    corpus = tmp_path / "data/raw/mine"
    for stem in sources:
        midi = miditoolkit.MidiFile(str(corpus / f"{stem}.mid"))
        assert midi.ticks_per_beat == 480
        tempos = _tempo_events(corpus / f"{stem}.mid")  # miditoolkit merges equal ones
        assert [t for t, _ in tempos] == list(range(0, 480 * len(tempos), 480))  # every beat
        bpm = np.median([b for _, b in tempos])
        assert 100 < bpm < 140, bpm  # the score's 120 BPM (not half or double)
        # onset F1 against the source's first 11 s; MIDI time 0 is the bar line at or before
        # the audio's start, so align by the best of the first est notes on the first ref note
        ref = miditoolkit.MidiFile(str(real_midi_dir / f"{stem}.mid"))
        ref_s, est_s = ref.get_tick_to_time_mapping(), midi.get_tick_to_time_mapping()
        ref_notes = [n for i in ref.instruments for n in i.notes if ref_s[n.start] < 11]
        est_notes = midi.instruments[0].notes
        r_on = np.array([ref_s[n.start] for n in ref_notes]) + 10  # mir_eval: times >= 0
        e_on = np.array([est_s[n.start] for n in est_notes])
        r_hz = 440 * 2 ** ((np.array([n.pitch for n in ref_notes]) - 69) / 12)
        e_hz = 440 * 2 ** ((np.array([n.pitch for n in est_notes]) - 69) / 12)
        f1 = max(
            mir_eval.transcription.precision_recall_f1_overlap(
                np.c_[r_on, r_on + 0.1], r_hz, np.c_[e, e + 0.1], e_hz, offset_ratio=None
            )[2]
            for e in (e_on - e_on[k] + r_on.min() for k in range(5))
        )
        assert f1 > 0.6, (stem, f1)
    before = {p: p.stat().st_mtime_ns for p in corpus.glob("*.mid")}
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in corpus.glob("*.mid")} == before  # resumed

    prep = subprocess.run(
        [*musegen, "prepare", "--raw", "data/raw/mine", "--out", "prepared"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    assert "2 files, 2 ok" in prep.stdout, prep.stdout
    tok = dataclasses.replace(
        load_section(TokenizeParams, "tokenize", ROOT / "params.yaml"),
        num_workers=1,
        metrics=str(tmp_path / "tok.json"),
    )
    tokens = tokenize(corpus, tmp_path / "prepared/manifest.csv", tmp_path / "tokens", tok)
    words = sum(len(np.load(tokens / "cp" / f"{s}.npy")) for s in ("train", "valid", "test"))
    assert words > 50


def test_tempo_map_puts_each_beat_at_480_ticks():
    beats = np.array([0.7, 1.2, 1.8, 2.3, 2.9, 3.4])  # a drifting tempo
    grid = tr.beat_grid(beats, phase=1)  # beat 1 (1.2 s) starts a bar
    assert grid[0] <= 0  # tick 0 is at or before the start of the audio
    notes = np.array([[1.2, 1.8, 60, 0.5], [2.6, 2.9, 64, 1.0], [3.9, 4.4, 67, 0.2]])
    midi = tr.to_midi(notes, grid)
    n_pre = len(grid) - len(beats)
    assert (n_pre + 1) % 4 == 0  # so the bar line (every 1920 ticks) falls on 1.2 s
    assert [t.time for t in midi.tempo_changes] == [480 * i for i in range(len(grid) - 1)]
    assert midi.tempo_changes[n_pre + 1].tempo == pytest.approx(100.0)  # 0.6 s beat
    ticks = [(n.start, n.end) for n in midi.instruments[0].notes]
    first = (n_pre + 1) * 480
    assert ticks[0] == (first, first + 480)  # on a beat, one beat long
    assert ticks[1] == (first + 960 + 240, first + 1440)  # half a beat, between beats
    assert ticks[2][0] == (len(grid) - 1) * 480 + 480  # after the last beat: its tempo
    assert [n.velocity for n in midi.instruments[0].notes] == [64, 127, 25]


def test_decoding_is_streamed_memory_does_not_grow_with_length(tmp_path):
    """20 minutes of audio: read whole it would take 106 MB at 22.05 kHz; streamed < 30 MB."""
    path = tmp_path / "long.flac"
    block = np.zeros(60 * SR, np.float32)
    block[:: SR // 2] = 0.5  # clicks, so blocks differ from pure silence
    with sf.SoundFile(path, "w", SR, 1, "PCM_16", format="FLAC") as f:
        for _ in range(20):
            f.write(block)
    stats: dict[str, float] = {}
    tracemalloc.start()
    try:
        n = sum(len(b) for b in tr.decode(path, stats))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == pytest.approx(20 * 60 * SR, abs=SR // 10)
    assert stats["seconds"] == pytest.approx(1200) and stats["peak"] == pytest.approx(0.5, 0.01)
    assert peak < 30e6, peak


def test_model_frames_cover_the_audio_once(params):
    """Frames come out one per 256 samples, in order, with nothing doubled at window seams."""
    session = tr.load_model(1)
    clip = _tone(5.3, 440, 0.3)
    frames = np.concatenate(list(tr.model_frames(iter(np.array_split(clip, 3)), session)))
    assert frames.shape == (len(clip) // tr.HOP + 1, 2, 88)
    a4 = frames[20:-20, 0, 69 - tr.MIDI_OFFSET]  # A4's note activation, held throughout
    assert a4.min() > params.frame_threshold


def test_beats_follow_a_tempo_change_at_the_quarter_note_level():
    """40 s at 120 BPM then 40 s at 96: a loud long bass note on each beat, a soft short one
    between beats. The tracker must keep the beat (not the eighths) through the change."""
    import mir_eval

    beats = np.concatenate([np.arange(0.5, 40, 0.5), 40 + np.arange(0, 40, 60 / 96)])
    offbeats = beats[:-1] + np.diff(beats) / 2
    notes = np.concatenate(
        [np.c_[beats, beats + 0.4, np.full(len(beats), 48), np.full(len(beats), 0.8)],
         np.c_[offbeats, offbeats + 0.1, np.full(len(offbeats), 72), np.full(len(offbeats), 0.5)]]
    )  # fmt: skip
    notes = notes[np.argsort(notes[:, 0])]
    found = tr.track_beats(notes, int(82 * tr.FPS))
    assert mir_eval.beat.f_measure(beats, found) > 0.95


@pytest.mark.slow
def test_optional_dvc_stage_transcribes_the_corpora_named_in_params(tmp_path, real_midi_dir):
    """In a fresh git + DVC copy of the project: transcribe.corpora {mine: recordings} adds
    a stage transcribe@mine upstream of prepare; `dvc repro` of it writes the corpus and its
    report, and DVC then finds it up to date."""
    import yaml
    from conftest import copy_project, sh

    from musegen.core.render import render_audio

    copy_project(tmp_path, ("musegen", "dvc.yaml"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["transcribe"]["corpora"] = {"mine": "recordings"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "recordings").mkdir()
    wav = render_audio(real_midi_dir / "bach__bwv269.mid", tmp_path / "full.wav")
    clip, sr = sf.read(wav, dtype="float32")
    sf.write(tmp_path / "recordings/chorale.flac", clip[: 8 * sr], sr)

    def dvc(*args: str) -> str:
        return sh(sys.executable, "-m", "dvc", *args, cwd=tmp_path).stdout

    sh("git", "init", "-q", cwd=tmp_path)
    dvc("init", "-q")
    assert '"transcribe@mine" -> "prepare"' in dvc("dag", "--dot")
    dvc("repro", "--single-item", "transcribe")
    midi = miditoolkit.MidiFile(str(tmp_path / "data/raw/mine/chorale.mid"))
    assert midi.ticks_per_beat == 480 and len(midi.instruments[0].notes) > 20
    report = tr.read_report(tmp_path / "data/raw/mine.transcribe.csv")
    assert report.status.tolist() == ["ok"] and not (tmp_path / "recordings" / tr.REPORT).exists()
    assert "transcribe@mine" in yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert "transcribe@mine" not in dvc("status", "transcribe")  # up to date
