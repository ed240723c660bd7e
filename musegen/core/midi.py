"""MIDI reading shared by prepare and the tokenizers: header checks and the note table.

Everything downstream works on a `Score`: a note array at a fixed 480 ticks per beat (the
Pop1K7 and CP grid) plus tempo, time-signature and marker lists. Bad input raises
`MidiError` with a short machine-readable reason (used in the manifest) and a message that
names the file and the problem.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musegen import files

TICKS_PER_BEAT = 480  # the Pop1K7 / CP grid; every Score is rescaled to it
BAR_TICKS = 4 * TICKS_PER_BEAT  # 1920: every file is read on a 4/4 bar grid
DEFAULT_BPM = 120.0  # MIDI's tempo when a file sets none (miditoolkit's too)

#: reason codes a MidiError may carry (the manifest's `reason` column).
REASONS = (
    "not_midi",
    "empty_file",
    "truncated",
    "corrupt",
    "format_2",
    "smpte_division",
    "zero_division",
    "too_large",
    "no_notes",
    "drums_only",
    "too_long",
    "duplicate",
    "header_only",
    # from files.open_regular (too_large above is shared): a dangling link, a FIFO, device or
    # folder, a file or folder without read permission
    "missing",
    "not_regular",
    "unreadable",
)
assert set(files.REASONS) <= set(REASONS)
#: the most any reader takes when the caller gives no limit (prepare.max_file_mb rejects larger
#: corpus files first); piano MIDI is ~10-100 kB, and parsing costs ~15-100x the file size
MAX_MIDI_BYTES = 16_000_000


class MidiError(ValueError):
    """A file that cannot be used, with a reason code from REASONS."""

    def __init__(self, path: Path | str, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        # printable: a name that is not UTF-8 must not crash whoever prints the error
        self.path, self.reason, self.detail = files.printable(path), reason, detail
        super().__init__(f"{self.path}: {reason}: {detail}")


@dataclass
class Score:
    """A piece reduced to what the tokenizers need, at TICKS_PER_BEAT.

    Attributes:
        notes: int64 array (N, 4) of [start, end, pitch, velocity], sorted by (start, pitch,
            end); drums are excluded, every instrument merged.
        tempos: (tick, bpm) pairs, sorted, first at tick 0 when the file has one.
        time_signatures: (tick, numerator, denominator) triples.
        markers: (tick, text) pairs (Pop1K7 chord markers live here).
        source_ticks_per_beat: the file's own resolution before rescaling.
    """

    notes: np.ndarray
    tempos: list[tuple[int, float]] = field(default_factory=list)
    time_signatures: list[tuple[int, int, int]] = field(default_factory=list)
    markers: list[tuple[int, str]] = field(default_factory=list)
    source_ticks_per_beat: int = TICKS_PER_BEAT
    n_drum_notes: int = 0

    @property
    def end_tick(self) -> int:
        return int(self.notes[:, 1].max()) if len(self.notes) else 0

    def seconds(self, tick: int | None = None) -> float:
        """Wall-clock time of `tick` (default: the last note off) under the tempo map."""
        tick = self.end_tick if tick is None else tick
        tempos = sorted(self.tempos) or [(0, DEFAULT_BPM)]  # tracks may list tempos out of order
        if tempos[0][0] > 0:
            tempos = [(0, DEFAULT_BPM), *tempos]
        total, (prev_tick, prev_bpm) = 0.0, tempos[0]
        for t, bpm in tempos[1:]:
            if t >= tick:
                break
            total += (t - prev_tick) * 60.0 / (prev_bpm * TICKS_PER_BEAT)
            prev_tick, prev_bpm = t, bpm
        return total + (tick - prev_tick) * 60.0 / (prev_bpm * TICKS_PER_BEAT)


def read_header(data: bytes, path: Path | str) -> tuple[int, int, int]:
    """Check the MThd chunk; return (format, n_tracks, division) or raise MidiError."""
    if len(data) == 0:
        raise MidiError(path, "empty_file", "the file has 0 bytes")
    if not data.startswith(b"MThd"):
        raise MidiError(path, "not_midi", f"expected 'MThd' header, found {data[:4]!r}")
    if len(data) < 14:
        raise MidiError(path, "truncated", f"header needs 14 bytes, file has {len(data)}")
    fmt, n_tracks, division = struct.unpack(">HHH", data[8:14])
    if fmt == 2:
        raise MidiError(path, "format_2", "format 2 (independent sequences) is not supported")
    if division & 0x8000:
        raise MidiError(path, "smpte_division", "SMPTE time division; re-export in ticks per beat")
    if division == 0:
        raise MidiError(path, "zero_division", "0 ticks per beat in the header")
    if n_tracks == 0 or len(data) <= 14:
        raise MidiError(path, "truncated", "header announces no track data")
    return fmt, n_tracks, division


def read_checked(path: Path, max_bytes: int | None = None) -> bytes:
    """The file's bytes after the safe read (`files.read_regular`) and the header checks.

    Raises:
        MidiError: not a readable regular file of at most `max_bytes` (default MAX_MIDI_BYTES),
            or a bad header.
    """
    try:
        data = files.read_regular(path, MAX_MIDI_BYTES if max_bytes is None else max_bytes)
    except files.FileRefusedError as exc:
        raise MidiError(exc.path, exc.reason, exc.detail) from exc
    read_header(data, path)
    return data


def load_midi(path: Path | str, max_bytes: int | None = None):  # -> miditoolkit.MidiFile
    """Parse a MIDI file with miditoolkit after header checks; errors become MidiError."""
    import miditoolkit

    path = Path(path)
    data = read_checked(path, max_bytes)
    try:
        return miditoolkit.MidiFile(file=io.BytesIO(data))
    except (EOFError, struct.error, IndexError) as exc:
        raise MidiError(
            path, "truncated", f"ends inside a chunk ({str(exc) or type(exc).__name__})"
        ) from exc
    except Exception as exc:  # mido raises bare OSError/ValueError/KeyError on bad data
        raise MidiError(path, "corrupt", f"{type(exc).__name__}: {exc}") from exc


def _rescale(ticks: np.ndarray, tpb: int) -> np.ndarray:
    """Ticks at `tpb` -> ticks at TICKS_PER_BEAT: exact when divisible, else round half even."""
    ticks = np.asarray(ticks, dtype=np.int64)
    if tpb == TICKS_PER_BEAT:
        return ticks
    scaled = ticks * TICKS_PER_BEAT
    # music21 writes 10080 = 21 x 480 ticks per beat, so the exact branch is the usual one
    return np.where(scaled % tpb == 0, scaled // tpb, np.rint(scaled / tpb).astype(np.int64))


def _sorted_notes(rows: np.ndarray, tpb: int) -> np.ndarray:
    notes = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    if len(notes):
        notes[:, :2] = _rescale(notes[:, :2], tpb)
        notes = notes[np.lexsort((notes[:, 1], notes[:, 2], notes[:, 0]))]
    return notes


def to_score(midi) -> Score:
    """Reduce a miditoolkit.MidiFile to a Score at TICKS_PER_BEAT (all non-drum notes merged)."""
    tpb = int(midi.ticks_per_beat)
    rows, n_drum = [], 0
    for inst in midi.instruments:
        if inst.is_drum:
            n_drum += len(inst.notes)
            continue
        rows.extend((n.start, n.end, n.pitch, n.velocity) for n in inst.notes)
    tempo_ticks = _rescale([t.time for t in midi.tempo_changes], tpb)
    sig_ticks = _rescale([ts.time for ts in midi.time_signature_changes], tpb)
    marker_ticks = _rescale([m.time for m in midi.markers], tpb)
    return Score(
        notes=_sorted_notes(rows, tpb),
        tempos=[
            (int(t), float(c.tempo)) for t, c in zip(tempo_ticks, midi.tempo_changes, strict=True)
        ],
        time_signatures=[
            (int(t), int(ts.numerator), int(ts.denominator))
            for t, ts in zip(sig_ticks, midi.time_signature_changes, strict=True)
        ],
        markers=[(int(t), str(m.text)) for t, m in zip(marker_ticks, midi.markers, strict=True)],
        source_ticks_per_beat=tpb,
        n_drum_notes=n_drum,
    )


def read_score(path: Path | str, max_bytes: int | None = None) -> Score:
    """Read a MIDI file straight to a Score with symusic (C++), about 50x faster than miditoolkit.

    Gives the same Score as `to_score(load_midi(path))` (tests/test_tokenizer.py checks it on
    every test file): notes paired first-in first-out, tempos in BPM computed as mido does, with
    miditoolkit's rules (a default 120 BPM at tick 0, a tempo at tick 0 replaces it, repeats
    of the previous tempo dropped).

    Raises:
        MidiError: the header is bad (see read_header) or symusic cannot parse the body.
    """
    return parse_score(read_checked(Path(path), max_bytes), path)


def parse_score(data: bytes, path: Path | str) -> Score:
    """The Score of MIDI bytes already read and header-checked (see read_score).

    `path` only names the file in errors.

    Raises:
        MidiError: symusic cannot parse the body.
    """
    import symusic

    try:
        sm = symusic.Score.from_midi(data)
    except Exception as exc:  # symusic raises RuntimeError('MiniMidi: ...') on any bad body
        if "remaining" in str(exc) or "length" in str(exc):
            raise MidiError(path, "truncated", f"ends inside a chunk ({exc})") from exc
        raise MidiError(path, "corrupt", f"{type(exc).__name__}: {exc}") from exc
    tpb = int(sm.ticks_per_quarter)
    parts, n_drum = [], 0
    for track in sm.tracks:
        if track.is_drum:
            n_drum += len(track.notes)
            continue
        if len(track.notes):
            a = track.notes.numpy()  # columns: time, duration, pitch, velocity
            start = a["time"].astype(np.int64)
            parts.append(
                np.stack([start, start + a["duration"], a["pitch"], a["velocity"]], axis=1)
            )
    rows = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
    tempos: list[tuple[int, float]] = [(0, DEFAULT_BPM)]
    tp = sm.tempos.numpy()
    for tick, mspq in zip(tp["time"].tolist(), tp["mspq"].tolist(), strict=True):
        bpm = 60 * 1e6 / mspq * 4 / 4.0  # mido.tempo2bpm, operation for operation
        if tick == 0:
            tempos = [(0, bpm)]
        elif bpm != tempos[-1][1]:
            tempos.append((tick, bpm))
    ts = sm.time_signatures.numpy()
    return Score(
        notes=_sorted_notes(rows, tpb),
        tempos=[
            (int(t), b)
            for t, (_, b) in zip(_rescale([t for t, _ in tempos], tpb), tempos, strict=True)
        ],
        time_signatures=[
            (int(t), int(n), int(d))
            for t, n, d in zip(
                _rescale(ts["time"], tpb), ts["numerator"], ts["denominator"], strict=True
            )
        ],
        markers=[
            (int(t), m.text)
            for t, m in zip(_rescale([m.time for m in sm.markers], tpb), sm.markers, strict=True)
        ],
        source_ticks_per_beat=tpb,
        n_drum_notes=n_drum,
    )
