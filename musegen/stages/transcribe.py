"""Audio to beat-synchronous piano MIDI: `musegen corpus transcribe`, as Pop1K7 was made.

Notes come from basic-pitch (Spotify, ICASSP 2022), whose wheel ships the model as
``saved_models/icassp_2022/nmp.onnx``; we run it with onnxruntime, so nothing is downloaded
at run time and TensorFlow is not needed (basic-pitch 0.4.0's Linux metadata pins
tensorflow<2.15.1, which would take numpy back to 1.26: `make setup` installs basic-pitch
with --no-deps plus the `audio` extra). Beats come from librosa's dynamic-programming
tracker on an onset envelope made from the transcribed notes, at their median local tempo;
each beat becomes 480 ticks (one tempo event per beat, as in Pop1K7's midi_analyzed
files) and notes keep their place between beats. Bars: 4/4 from the first detected beat (a
downbeat guess from bass onsets, and one from chord changes, scored lower on train pieces).

Memory is bounded by the chunk sizes, not the file: audio is decoded in blocks and
resampled as a stream, the model sees 2-second windows, notes are decoded from a rolling
window of model frames, and only the notes are kept for the whole file (the beat tracker's
envelope, one float per frame, is made from them). A note held over NOTE_MARGIN_S is cut.

Every input file gets one row in <audio>/transcribe.csv (COLUMNS) with a reason code from
REASONS when rejected; a re-run skips files whose sha256 already has a row (ok rows also
need their MIDI), except RECHECKED rejections (length limits, duplicates, name clashes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import multiprocessing
import os
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from musegen import files
from musegen.config import DataParams, ParamsError, StageConfig
from musegen.core.midi import TICKS_PER_BEAT
from musegen.stages.prepare import list_files

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
REPORT = "transcribe.csv"
COLUMNS = ("path", "sha256", "status", "reason", "detail", "seconds", "n_notes", "bpm", "midi")
REASONS = (
    "missing",  # files.open_regular: gone, not a regular file (FIFO, device, folder), unreadable
    "not_regular",
    "unreadable",
    "not_audio",  # empty, another suffix, or a header libsndfile does not recognise
    "corrupt",  # recognised but malformed, truncated or failing to decode
    "too_long",  # over max_seconds (from the header: nothing decoded)
    "too_short",  # under min_seconds
    "silent",  # peak below silence_db dBFS
    "no_beats",  # fewer than 4 beats found (a drone, a sine, a single chord)
    "no_notes",  # fewer than min_notes notes
    "duplicate",  # same bytes as an earlier file
    "name_clash",  # another input maps to the same MIDI path (song.wav and song.mp3)
)
RECHECKED = ("too_long", "too_short", "duplicate", "name_clash")  # on params or other files

# basic-pitch's model geometry (basic_pitch.constants): 22.05 kHz, 256-sample frames,
# windows of 43,844 samples (172 frames) overlapping by 30 frames.
SAMPLE_RATE = 22050
HOP = 256
WINDOW = 2 * SAMPLE_RATE - HOP
OVERLAP = 30 * HOP
WINDOW_HOP = WINDOW - OVERLAP
FPS = SAMPLE_RATE / HOP  # 86.13 model frames per second
MIDI_OFFSET = 21  # model pitch bin 0 is A0
BLOCK_S = 30  # decoded per read
BATCH = 8  # windows per model call
SEGMENT_S, NOTE_MARGIN_S = 60, 10  # notes decoded from SEGMENT + 2 margins of frames at a time
MIN_BEATS = 4
TEMPO_HOP_S, TEMPO_BLOCK = 0.5, 120  # a tempo estimate every 0.5 s, 120 at a time


@dataclasses.dataclass(frozen=True)
class TranscribeParams:
    """The `transcribe` section of params.yaml (see the comments there)."""

    max_seconds: float
    min_seconds: float
    silence_db: float
    min_notes: int
    onset_threshold: float
    frame_threshold: float
    min_note_ms: float
    num_workers: int
    corpora: dict[str, str]  # name -> audio folder: one `transcribe@name` DVC stage each

    def __post_init__(self) -> None:
        if not 0 < self.min_seconds < self.max_seconds:
            raise ParamsError("transcribe: need 0 < min_seconds < max_seconds (fix params.yaml)")
        if self.num_workers < 0 or self.min_notes < 1:
            raise ParamsError("transcribe: num_workers >= 0 and min_notes >= 1 (fix params.yaml)")
        for name in self.corpora or {}:
            if not re.fullmatch(r"[\w.-]+", str(name)) or name in (".", ".."):
                raise ParamsError(f"transcribe.corpora: {name!r} is not a folder name")


class AudioError(Exception):
    """An input that cannot become a corpus file; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_model(num_threads: int = 0) -> Any:
    """basic-pitch's ONNX model from its wheel, in an onnxruntime session.

    Raises:
        ImportError: basic-pitch or onnxruntime is missing; the message says how to install.
    """
    try:
        import onnxruntime as ort

        level = logging.root.level  # basic_pitch warns at import about every absent backend
        logging.root.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():  # resampy 0.4.2's pkg_resources deprecation
                warnings.simplefilter("ignore")
                import basic_pitch.note_creation  # noqa: F401 -- imported once, quietly
                from basic_pitch import FilenameSuffix, build_icassp_2022_model_path
        finally:
            logging.root.setLevel(level)
    except ImportError as err:
        raise ImportError(
            f"transcription needs basic-pitch and onnxruntime ({err}); run `make setup`, or "
            "`pip install -e '.[audio]' && pip install --no-deps basic-pitch==0.4.0`"
        ) from err
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = num_threads, 1
    path = build_icassp_2022_model_path(FilenameSuffix.onnx)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probe(path: Path, params: TranscribeParams) -> tuple[float, int]:
    """Check what can be checked without decoding; return (seconds, sample rate).

    Raises:
        AudioError: not_audio, corrupt, too_long or too_short.
    """
    import soundfile as sf

    if path.stat().st_size == 0:
        raise AudioError("not_audio", "empty file (0 bytes)")
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise AudioError("not_audio", f"suffix {path.suffix!r} is not one of {AUDIO_SUFFIXES}")
    try:
        info = sf.info(str(path))
    except sf.LibsndfileError as err:
        reason = "not_audio" if "not recognised" in str(err) else "corrupt"
        raise AudioError(reason, str(err).replace(f"Error opening {str(path)!r}: ", "")) from err
    short = re.search(r"^data\s*:\s*(\d+) \(should be (\d+)\)", info.extra_info, re.M)
    if short and int(short[2]) < int(short[1]):  # libsndfile clamps a cut WAV silently
        raise AudioError(
            "corrupt", f"truncated: {short[1]} bytes of audio promised, {short[2]} found"
        )
    seconds = info.frames / info.samplerate if info.samplerate else 0.0
    if seconds > params.max_seconds:
        raise AudioError(
            "too_long", f"{seconds:.0f} s > transcribe.max_seconds {params.max_seconds}"
        )
    if seconds < params.min_seconds:
        raise AudioError("too_short", f"{seconds:.2f} s < transcribe.min_seconds")
    return seconds, info.samplerate


def decode(path: Path, stats: dict[str, float]) -> Iterator[np.ndarray]:
    """Yield mono float32 blocks at 22.05 kHz, BLOCK_S seconds at a time (streamed).

    Fills `stats` with the decoded length (`seconds`) and the peak (`peak`) as it goes.
    """
    import soundfile as sf
    import soxr

    stats.update(seconds=0.0, peak=0.0)
    with sf.SoundFile(str(path)) as f:
        stream = soxr.ResampleStream(f.samplerate, SAMPLE_RATE, 1, dtype="float32")
        while True:
            block = f.read(BLOCK_S * f.samplerate, dtype="float32", always_2d=True)
            last = len(block) < BLOCK_S * f.samplerate
            mono = block.mean(axis=1)  # (samples,)
            stats["seconds"] += len(mono) / f.samplerate
            stats["peak"] = max(stats["peak"], float(np.abs(mono).max(initial=0.0)))
            out = stream.resample_chunk(mono, last=last)
            if len(out):
                yield out
            if last:
                return


def model_frames(audio: Iterator[np.ndarray], session: Any) -> Iterator[np.ndarray]:
    """Run basic-pitch over the stream; yield (n, 2, 88) blocks of [note, onset] frames.

    Frame g is centred on input sample g * 256. The input is padded with OVERLAP / 2 zeros
    in front (as basic-pitch does); window k covers padded samples [k * WINDOW_HOP, + WINDOW)
    and supplies the frames g in [ceil(k * h), ceil((k + 1) * h)), h = WINDOW_HOP / 256 =
    141.27, taken from its own frame g - k * h + 15 (rounded, <= 5.8 ms off). Neighbours
    never overlap and nothing drifts (basic-pitch's own unwrapping keeps 142 frames per
    window and corrects times afterwards).
    """
    names = ["StatefulPartitionedCall:1", "StatefulPartitionedCall:2"]  # note, onset
    inp = session.get_inputs()[0].name
    h = WINDOW_HOP / HOP
    buf, base = np.zeros(OVERLAP // 2, np.float32), 0  # buf[0] is padded sample `base`
    n_samples, k, done = 0, 0, False
    while not done:
        block = next(audio, None)
        if block is None:
            done = True
        else:
            n_samples += len(block)
            buf = np.concatenate([buf, block])
        n_frames = n_samples // HOP + 1  # frames centred inside the audio
        ready = []  # windows whose input is all here (at the end: until every frame is out)
        while (
            (math.ceil(k * h) < n_frames) if done else (k * WINDOW_HOP + WINDOW <= base + len(buf))
        ):
            ready.append(k)
            k += 1
        for b in range(0, len(ready), BATCH):
            ks = ready[b : b + BATCH]
            batch = np.zeros((len(ks), WINDOW, 1), np.float32)  # (B, 43844, 1)
            for i, kk in enumerate(ks):
                piece = buf[kk * WINDOW_HOP - base : kk * WINDOW_HOP - base + WINDOW]
                batch[i, : len(piece), 0] = piece
            note, onset = session.run(names, {inp: batch})  # each (B, 172, 88)
            for i, kk in enumerate(ks):
                g = np.arange(math.ceil(kk * h), min(math.ceil((kk + 1) * h), n_frames))
                j = np.rint(g - kk * h).astype(int) + OVERLAP // HOP // 2
                yield np.stack([note[i, j], onset[i, j]], axis=1)  # (n, 2, 88)
        drop = k * WINDOW_HOP - base  # samples no later window needs
        buf, base = buf[drop:], base + drop


def decode_notes(frames: Iterator[np.ndarray], params: TranscribeParams) -> tuple[np.ndarray, int]:
    """basic-pitch's note decoding over a rolling window of frames.

    Returns:
        notes: (N, 4) float array [start_s, end_s, pitch, amplitude 0-1], sorted by start.
        n_frames: how many model frames the audio gave.
    """
    from basic_pitch.note_creation import output_to_notes_polyphonic

    segment, margin = int(SEGMENT_S * FPS), int(NOTE_MARGIN_S * FPS)
    min_len = round(params.min_note_ms / 1000 * FPS)
    notes: list[tuple[int, int, int, float]] = []
    n_frames = 0
    blocks: list[np.ndarray] = []
    start, final = 0, 0  # global frame of blocks[0]; notes starting before `final` are out

    def decode(arr: np.ndarray, upto: float) -> None:  # keep notes starting in [final, upto)
        with np.errstate(invalid="ignore", divide="ignore"):  # all-zero frames: 0 / 0
            found = output_to_notes_polyphonic(
                arr[:, 0].copy(), arr[:, 1].copy(), onset_thresh=params.onset_threshold,
                frame_thresh=params.frame_threshold, min_note_len=min_len, infer_onsets=True,
                max_freq=None, min_freq=None, melodia_trick=True,
            )  # fmt: skip
        notes.extend(
            (start + s, start + e, p, a) for s, e, p, a in found if final <= start + s < upto
        )

    for block in frames:
        n_frames += len(block)
        blocks.append(block)
        if sum(map(len, blocks)) >= segment + 2 * margin:
            arr = np.concatenate(blocks)  # (frames, 2, 88)
            decode(arr, start + len(arr) - margin)
            final = start + len(arr) - margin
            keep = final - margin - start  # left context for the next window
            blocks, start = [arr[keep:]], start + keep
    if blocks:
        decode(np.concatenate(blocks), math.inf)
    table = np.array(sorted(notes), dtype=np.float64).reshape(-1, 4)
    table[:, :2] /= FPS
    return table, n_frames


def onset_envelope(notes: np.ndarray, n_frames: int) -> np.ndarray:
    """The transcribed notes as an onset envelope for the beat tracker, one value per frame.

    Each onset adds amplitude x sqrt(duration): long and loud notes (bass, chords, melody
    notes on the beat) weigh more than passing notes, which steers the tracker to the beat
    rather than the fastest pulse. Smoothed by a 1-frame Gaussian. Chosen on rendered
    train-split pieces over the model's own onset activations (bench/transcribe.py).
    """
    from scipy.ndimage import gaussian_filter1d

    envelope = np.zeros(n_frames)
    frame = np.clip(np.rint(notes[:, 0] * FPS).astype(int), 0, max(n_frames - 1, 0))
    np.add.at(envelope, frame, notes[:, 3] * np.sqrt(notes[:, 1] - notes[:, 0]))
    return gaussian_filter1d(envelope, 1.0)


def local_tempo(envelope: np.ndarray) -> np.ndarray:
    """Tempo (BPM) every TEMPO_HOP_S: librosa's estimate (its 8-s autocorrelation window and
    log-normal prior around 120 BPM) on the envelope around that time.

    Windows are views into the envelope, TEMPO_BLOCK at a time, so memory does not grow with
    the file (librosa's per-frame tempogram would be 689 x 930,000 floats for 3 hours, and
    one estimate per frame costs 40x more).
    """
    import librosa

    win, hop = round(8 * FPS), round(TEMPO_HOP_S * FPS)
    windows = librosa.util.frame(
        np.pad(envelope, win // 2, mode="linear_ramp"), frame_length=win, hop_length=hop, axis=0
    )
    return np.concatenate(
        [
            librosa.feature.tempo(
                tg=librosa.feature.tempogram(
                    onset_envelope=windows[i : i + TEMPO_BLOCK], sr=SAMPLE_RATE, hop_length=HOP,
                    win_length=win, center=False,
                ),
                sr=SAMPLE_RATE, hop_length=HOP, aggregate=None,
            )[:, 0]
            for i in range(0, len(windows), TEMPO_BLOCK)
        ]
    )  # fmt: skip


def track_beats(notes: np.ndarray, n_frames: int) -> np.ndarray:
    """Beat times (s): librosa's dynamic-programming tracker on the notes' onset envelope, at
    the median of the local tempo estimates.

    One tempo per file: the tracker's tightness lets beats drift about +-20 % around it
    (a 120 -> 96 BPM change is followed; tests). librosa's time-varying mode (a tempo per
    frame) scored the same on train-split pieces but lost every beat before a tempo step
    in that test, so it is not used.
    """
    import librosa

    envelope = onset_envelope(notes, n_frames)
    if not envelope.any():
        return np.zeros(0)
    _, beats = librosa.beat.beat_track(
        onset_envelope=envelope, sr=SAMPLE_RATE, hop_length=HOP,
        bpm=float(np.median(local_tempo(envelope))), units="time",
    )  # fmt: skip
    return np.asarray(beats, np.float64)


def beat_grid(beats: np.ndarray, phase: int) -> np.ndarray:
    """The beats extended backwards (first interval) to a bar start at or before 0 s.

    Beat `phase` of the detected beats starts a bar; grid[0] <= 0 becomes tick 0.
    """
    ibi = beats[1] - beats[0]
    n_pre = math.ceil(beats[0] / ibi - 1e-9)
    n_pre += (-(n_pre + phase)) % 4
    return np.concatenate([beats[0] - ibi * np.arange(n_pre, 0, -1), beats])


def to_ticks(seconds: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Audio seconds to ticks: each grid interval is 480 ticks; after the last, its tempo."""
    beat = np.interp(seconds, grid, np.arange(len(grid), dtype=np.float64))
    after = seconds > grid[-1]
    beat[after] = len(grid) - 1 + (seconds[after] - grid[-1]) / (grid[-1] - grid[-2])
    return np.rint(beat * TICKS_PER_BEAT).astype(np.int64)


def to_midi(notes: np.ndarray, grid: np.ndarray) -> Any:  # -> miditoolkit.MidiFile
    """A one-track piano MidiFile: a tempo event on every beat, notes on the 480-tick grid."""
    import miditoolkit

    midi = miditoolkit.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    midi.time_signature_changes = [miditoolkit.TimeSignature(4, 4, 0)]
    bpm = 60.0 / np.diff(grid)
    midi.tempo_changes = [
        miditoolkit.TempoChange(float(b), i * TICKS_PER_BEAT) for i, b in enumerate(bpm)
    ]
    start, end = to_ticks(notes[:, 0], grid), to_ticks(notes[:, 1], grid)
    velocity = np.clip(np.rint(notes[:, 3] * 127), 1, 127).astype(int)
    piano = miditoolkit.Instrument(program=0, name="piano (basic-pitch)")
    piano.notes = [
        miditoolkit.Note(int(v), int(p), int(s), int(max(e, s + 1)))
        for s, e, p, v in zip(start, end, notes[:, 2].astype(int), velocity, strict=True)
    ]
    midi.instruments = [piano]
    return midi


def transcribe_audio(
    path: Path, params: TranscribeParams, session: Any
) -> tuple[Any, dict[str, Any]]:
    """One audio file to a beat-synchronous MidiFile, streamed (see the module docstring).

    Returns:
        The MidiFile and what the report row needs (seconds, n_notes, bpm), plus the
        detected `beats` (s) for scoring.

    Raises:
        AudioError: with one of REASONS.
    """
    header_seconds, _ = probe(path, params)
    stats: dict[str, float] = {}
    try:
        notes, n_frames = decode_notes(model_frames(decode(path, stats), session), params)
    except RuntimeError as err:  # libsndfile read errors surface as LibsndfileError here
        done = stats.get("seconds", 0)
        raise AudioError("corrupt", f"decoding failed after {done:.1f} s: {err}") from err
    if stats["seconds"] < 0.99 * header_seconds - 0.1:
        raise AudioError(
            "corrupt",
            f"truncated: header says {header_seconds:.1f} s, {stats['seconds']:.1f} s decoded",
        )
    peak_db = 20 * math.log10(max(stats["peak"], 1e-10))
    if peak_db < params.silence_db:
        raise AudioError(
            "silent", f"peak {peak_db:.0f} dBFS < transcribe.silence_db {params.silence_db}"
        )
    if len(notes) < params.min_notes:
        raise AudioError(
            "no_notes", f"{len(notes)} notes < transcribe.min_notes {params.min_notes}"
        )
    beats = track_beats(notes, n_frames)
    if len(beats) < MIN_BEATS:
        raise AudioError("no_beats", f"{len(beats)} beats found; need {MIN_BEATS} for a tempo map")
    midi = to_midi(notes, beat_grid(beats, 0))
    info = {
        "seconds": round(stats["seconds"], 3),
        "n_notes": len(notes),
        "bpm": round(float(60 / np.median(np.diff(beats))), 2),
        "beats": beats,
        "notes": notes,
    }
    return midi, info


_SESSION: Any = None  # one model per worker process


def _init_worker(num_threads: int) -> None:
    global _SESSION  # noqa: PLW0603 -- the per-process model cache is the point
    _SESSION = load_model(num_threads)


def _compile_beat_tracker() -> None:
    """Run librosa's numba beat tracker once in this process, so its on-disk cache exists.

    Workers that compile it at the same time can leave a corrupt cache behind, which
    segfaults every later run (seen with numba 0.68 and librosa 0.11).
    """
    import librosa

    envelope = np.random.default_rng(0).random(2000)
    librosa.beat.beat_track(onset_envelope=envelope, sr=SAMPLE_RATE, hop_length=HOP, bpm=120.0)


def transcribe_one(job: tuple[Path, str, str, Path], params: TranscribeParams) -> dict[str, Any]:
    """Transcribe audio_dir/rel to out_dir/<rel>.mid; return its report row (never raises)."""
    audio_dir, rel, sha256, out_dir = job
    midi_rel = Path(rel).with_suffix(".mid").as_posix()
    row = dict.fromkeys(COLUMNS, "") | {"path": files.printable(rel), "sha256": sha256}
    try:
        midi, info = transcribe_audio(audio_dir / rel, params, _SESSION)
        out = out_dir / midi_rel
        out.parent.mkdir(parents=True, exist_ok=True)
        with files.replacing(out) as tmp:
            midi.dump(str(tmp))
        row.update(status="ok", midi=files.printable(midi_rel))
        row.update({k: info[k] for k in ("seconds", "n_notes", "bpm")})
    except AudioError as err:
        row.update(status="rejected", reason=err.reason, detail=files.printable(err.detail))
    except Exception as err:  # one bad file must not stop a folder
        detail = files.printable(f"{type(err).__name__}: {err}")
        row.update(status="rejected", reason="corrupt", detail=detail)
    return row


def _sha256(path: Path) -> str:
    """sha256 through the one safe read (files.open_regular), 64 KiB at a time."""
    digest = hashlib.sha256()
    with files.open_regular(path) as (fh, _):
        while chunk := fh.read(1 << 16):
            digest.update(chunk)
    return digest.hexdigest()


def read_report(path: Path) -> pd.DataFrame:
    """A transcribe.csv back as strings (empty cells stay empty)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def transcribe(
    audio_dir: Path,
    out_dir: Path,
    params: TranscribeParams,
    progress: bool = True,
    report: Path | None = None,
) -> pd.DataFrame:
    """Transcribe every file under audio_dir into out_dir; write audio_dir/transcribe.csv.

    Args:
        audio_dir: the recordings (walked recursively, hidden files skipped).
        out_dir: the corpus folder to fill (e.g. data/raw/<name>); one .mid per ok input,
            at the input's relative path.
        params: the `transcribe` section.
        progress: draw a progress bar (stderr).
        report: where the report goes (default audio_dir/transcribe.csv); the DVC stage
            keeps it beside the corpus, out of its input folder.

    Returns:
        The report, one row per input file in path order, columns COLUMNS.

    Raises:
        FileNotFoundError: audio_dir is missing or holds no files.
    """
    audio_dir, out_dir = Path(audio_dir), Path(out_dir)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"{audio_dir}: audio folder not found (pass --audio DIR)")
    names = [f for f in list_files(audio_dir) if f != REPORT]
    if not names:
        raise FileNotFoundError(f"{audio_dir}: no files to transcribe (hidden files are skipped)")
    report = Path(report) if report else audio_dir / REPORT
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if report.is_file():
        for row in read_report(report).to_dict("records"):
            made = out_dir / files.from_printable(row["midi"])
            ok = row["status"] == "ok" and made.is_file()
            if ok or (row["status"] == "rejected" and row["reason"] not in RECHECKED):
                done[row["sha256"], Path(row["path"]).with_suffix(".mid").as_posix()] = row
    rows: dict[str, dict[str, Any]] = {}  # by the file's own relative name
    jobs, first_by_sha, first_by_midi = [], {}, {}
    for rel in names:
        midi_rel = Path(rel).with_suffix(".mid").as_posix()
        blank = dict.fromkeys(COLUMNS, "") | {"path": files.printable(rel), "status": "rejected"}
        try:
            sha = _sha256(audio_dir / rel)
        except files.FileRefusedError as err:
            rows[rel] = blank | {"reason": err.reason, "detail": files.printable(err.detail)}
            continue
        except OSError as err:  # EIO and the like while reading
            rows[rel] = blank | {"reason": "unreadable", "detail": f"cannot read: {err.strerror}"}
            continue
        blank["sha256"] = sha
        if sha in first_by_sha:
            rows[rel] = blank | {
                "reason": "duplicate",
                "detail": f"same bytes as {first_by_sha[sha]}",
            }
        elif midi_rel in first_by_midi:
            rows[rel] = blank | {
                "reason": "name_clash",
                "detail": f"{first_by_midi[midi_rel]} already becomes {midi_rel}; rename one",
            }
        elif (sha, files.printable(midi_rel)) in done:
            rows[rel] = done[sha, files.printable(midi_rel)] | {"path": files.printable(rel)}
        else:
            jobs.append((audio_dir, rel, sha, out_dir))
        first_by_sha.setdefault(sha, files.printable(rel))
        first_by_midi.setdefault(midi_rel, files.printable(rel))
    cores = os.cpu_count() or 1
    workers = max(1, min(params.num_workers or cores, len(jobs)))
    bar = tqdm(total=len(jobs), desc=f"transcribe {audio_dir}", unit="file", disable=not progress)
    one = partial(transcribe_one, params=params)
    try:
        if workers == 1:
            _init_worker(cores)
            for job in jobs:
                rows[job[1]] = one(job)
                bar.update()
        else:  # forkserver: callers (Prefect, MLflow) may hold threads, which fork can deadlock
            _compile_beat_tracker()
            ctx = multiprocessing.get_context("forkserver")
            # workers fork from a server that imported these once (librosa alone: ~5 s CPU)
            ctx.set_forkserver_preload([__name__, "librosa.beat", "librosa.feature", "soxr"])
            with ProcessPoolExecutor(
                workers, ctx, initializer=_init_worker, initargs=(max(1, cores // workers),)
            ) as pool:
                for job, row in zip(jobs, pool.map(one, jobs), strict=True):
                    rows[job[1]] = row
                    bar.update()
    finally:
        bar.close()
        table = pd.DataFrame([rows[r] for r in names if r in rows], columns=list(COLUMNS))
        report.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(report, table.to_csv(index=False, lineterminator="\n"))
    return table


def summarize(report: pd.DataFrame, out_dir: Path) -> str:
    """One line per outcome: ok count and hours, rejections by reason naming each file."""
    ok = report[report.status == "ok"]
    hours = pd.to_numeric(ok.seconds).sum() / 3600
    lines = [f"transcribe: {len(report)} files, {len(ok)} ok ({hours:.2f} h) -> {out_dir}"]
    lines += [
        f"  {r.path}: {r.reason}: {r.detail}" for r in report[report.status != "ok"].itertuples()
    ]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class TranscribeConfig(StageConfig):
    """What the transcribe stage reads: its section and data.raw_root."""

    transcribe: TranscribeParams
    data: DataParams


@dataclasses.dataclass(frozen=True)
class TranscribeResult:
    """One transcribed corpus: its folder, its report and the report's counts."""

    folder: Path
    report: Path
    files: int
    ok: int
    summary: str

    @classmethod
    def read(cls, params: TranscribeConfig, root: Path | str = ".") -> tuple[TranscribeResult, ...]:
        """One result per transcribe.corpora entry (the DVC stage's `foreach`: the corpus
        data.raw_root/<name>, its report <name>.transcribe.csv beside it)."""
        raw_root = Path(root, params.data.raw_root)
        return tuple(
            cls.of(raw_root / name, raw_root / f"{name}.{REPORT}")
            for name in params.transcribe.corpora or {}
        )

    @classmethod
    def of(cls, folder: Path, report: Path) -> TranscribeResult:
        """The counts of `report` (a transcribe.csv) for the corpus in `folder`."""
        table = read_report(report)
        ok = int((table.status == "ok").sum())
        return cls(folder, report, len(table), ok, summarize(table, folder))


def run(
    params: TranscribeConfig, audio: Path, out: Path | None = None, report: Path | None = None
) -> TranscribeResult:
    """The transcribe stage: recordings in `audio` into `out` (default
    data.raw_root/<audio's name>), report at `report` (default <audio>/transcribe.csv).

    Raises:
        FileNotFoundError: see `transcribe`.
        ImportError: basic-pitch's model is not installed.
    """
    out = out or Path(params.data.raw_root) / audio.name
    transcribe(audio, out, params.transcribe, report=report)
    return TranscribeResult.of(out, report or audio / REPORT)
