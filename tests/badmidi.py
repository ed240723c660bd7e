"""Craft bad and edge-case MIDI files, byte by byte, for tests of every stage that reads MIDI.

Each builder writes one file into `folder` and returns its path; names default to the case
so a failing test names the file. The raw SMF writer (`smf`, `track`) gives exact control over
headers and chunk lengths, which a MIDI library would refuse to write. Docstrings give the
reason code `musegen.stages.prepare` assigns under the default `prepare:` params.

Usage:
    from tests.badmidi import make_all, valid_piece
    paths = make_all(tmp_path)  # {case name: path}
"""

from __future__ import annotations

import random
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from miditoolkit.midi.utils import example_midi_file

TPB = 480
END_OF_TRACK = b"\xff\x2f\x00"


def varlen(value: int) -> bytes:
    """MIDI variable-length quantity (7 bits a byte, high bit = more follows)."""
    if not 0 <= value <= 0x0FFFFFFF:
        raise ValueError(f"varlen out of range: {value}")
    out = [value & 0x7F]
    while value := value >> 7:
        out.append(0x80 | (value & 0x7F))
    return bytes(reversed(out))


def track(events: Sequence[tuple[int, bytes]], end: bool = True) -> bytes:
    """An MTrk chunk from (delta ticks, raw event bytes) pairs, closed by End of Track."""
    body = b"".join(varlen(dt) + ev for dt, ev in events)
    if end:
        body += b"\x00" + END_OF_TRACK
    return b"MTrk" + struct.pack(">I", len(body)) + body


def smf(
    tracks: Sequence[bytes], fmt: int = 1, division: int = TPB, n_tracks: int | None = None
) -> bytes:
    """A Standard MIDI File: MThd (format, track count, division) followed by `tracks`."""
    count = len(tracks) if n_tracks is None else n_tracks
    return b"MThd" + struct.pack(">IHHH", 6, fmt, count, division) + b"".join(tracks)


def tempo(bpm: float) -> bytes:
    """Set Tempo meta event (microseconds per beat)."""
    return b"\xff\x51\x03" + round(60e6 / bpm).to_bytes(3, "big")


def time_signature(num: int, den: int) -> bytes:
    """Time Signature meta event (denominator as a power of two)."""
    return b"\xff\x58\x04" + bytes([num, den.bit_length() - 1, 24, 8])


def notes(
    pitches: Sequence[int], step: int, length: int, channel: int = 0, velocity: int = 80
) -> list[tuple[int, bytes]]:
    """Consecutive notes, one every `step` ticks, each `length` (<= step) ticks long."""
    events: list[tuple[int, bytes]] = []
    for i, p in enumerate(pitches):
        events.append((0 if i == 0 else step - length, bytes([0x90 | channel, p, velocity])))
        events.append((length, bytes([0x80 | channel, p, 0])))
    return events


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _piece(seed: int = 0, n: int = 32, division: int = TPB, head: Sequence[bytes] = ()) -> bytes:
    """A small format-1 piano piece: conductor track (tempo, meta) + one track of notes."""
    rng = random.Random(seed)
    pitches = [rng.randrange(48, 84) for _ in range(n)]
    meta = track([(0, tempo(100 + seed)), *((0, ev) for ev in head)])
    return smf([meta, track(notes(pitches, division // 2, division // 4))], division=division)


# ---- valid files ---------------------------------------------------------------------------


def valid_piece(folder: Path, name: str = "valid_piece.mid", seed: int = 0, n: int = 32) -> Path:
    """ok: `n` eighth notes at 480 ticks per beat in 4/4; `seed` varies pitches and tempo."""
    return _write(folder, name, _piece(seed, n, head=[time_signature(4, 4)]))


def pop1k7_example(folder: Path, name: str = "pop1k7_1390.mid") -> Path:
    """ok: miditoolkit's bundled Pop1K7 piece (930 notes, 79 s, 68 tempo changes)."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(example_midi_file(), path)
    return path


def three_four(folder: Path, name: str = "waltz_3_4.mid") -> Path:
    """ok, noted non-4/4: a 3/4 piece."""
    return _write(folder, name, _piece(3, head=[time_signature(3, 4)]))


def many_tempo_changes(folder: Path, name: str = "rubato_tempi.mid", n: int = 64) -> Path:
    """ok, noted: a tempo change on every beat (like Pop1K7's beat-synchronised files)."""
    meta = track([(0 if i == 0 else TPB, tempo(90 + i % 40)) for i in range(n)])
    return _write(folder, name, smf([meta, track(notes(range(40, 40 + n), TPB, TPB // 2))]))


def resolution(folder: Path, tpb: int, name: str | None = None) -> Path:
    """ok, noted: a piece at `tpb` ticks per beat (96 coarse; 10080 as music21 writes)."""
    return _write(folder, name or f"tpb_{tpb}.mid", _piece(tpb % 97, division=tpb))


def duplicate(folder: Path, source: Path, name: str = "zz_duplicate.mid") -> Path:
    """duplicate: a byte copy of `source` (sorted after it, so `source` is kept)."""
    return _write(folder, name, Path(source).read_bytes())


def reencoded(folder: Path, source_seed: int = 0, name: str = "zz_reencoded.mid") -> Path:
    """duplicate: the notes of valid_piece(seed) in format 0 with another tempo (new bytes)."""
    rng = random.Random(source_seed)
    pitches = [rng.randrange(48, 84) for _ in range(32)]
    events = [(0, tempo(77)), *notes(pitches, TPB // 2, TPB // 4)]
    return _write(folder, name, smf([track(events)], fmt=0))


def with_drums(folder: Path, name: str = "piano_and_drums.mid") -> Path:
    """ok, noted: piano notes plus a channel-10 drum track (drum notes dropped)."""
    meta = track([(0, tempo(120))])
    piano = track(notes([60, 62, 64, 65, 67, 69, 71, 72], TPB, TPB // 2))
    drums = track(notes([36, 38] * 8, TPB // 2, TPB // 4, channel=9))
    return _write(folder, name, smf([meta, piano, drums]))


# ---- bad files -----------------------------------------------------------------------------


def empty(folder: Path, name: str = "empty.mid") -> Path:
    """empty_file: 0 bytes."""
    return _write(folder, name, b"")


def random_bytes(folder: Path, name: str = "noise.mid", size: int = 2048) -> Path:
    """not_midi: seeded random bytes with a .mid extension."""
    return _write(folder, name, random.Random(size).randbytes(size))


def text_file(folder: Path, name: str = "readme.txt") -> Path:
    """not_midi: a plain text file left in the corpus folder."""
    return _write(folder, name, b"Liner notes: these pieces were transcribed in 2019.\n")


def truncated(folder: Path, name: str = "truncated.mid") -> Path:
    """truncated: a valid piece cut in the middle of its note track."""
    data = _piece(5, n=64)
    return _write(folder, name, data[: len(data) - 200])


def header_only(folder: Path, name: str = "header_only.mid", n_tracks: int = 0) -> Path:
    """header_only: an MThd chunk and nothing else (announcing `n_tracks` tracks)."""
    return _write(folder, name, smf([], n_tracks=n_tracks))


def corrupt_track(folder: Path, name: str = "corrupt_status.mid") -> Path:
    """corrupt: a track holding an undefined status byte (0xF5) after one note."""
    body = [*notes([60], TPB, TPB), (0, b"\xf5\x01\x02")]
    return _write(folder, name, smf([track(body)], fmt=0))


def no_notes(folder: Path, name: str = "no_notes.mid") -> Path:
    """no_notes: tempo, time signature, a program change and a marker, but no notes."""
    meta = track([(0, tempo(120)), (0, time_signature(4, 4)), (0, b"\xff\x06\x05Intro")])
    return _write(folder, name, smf([meta, track([(0, b"\xc0\x00"), (TPB * 8, b"\xb0\x40\x00")])]))


def few_notes(folder: Path, name: str = "three_notes.mid", n: int = 3) -> Path:
    """no_notes: `n` notes, fewer than the default min_notes (8)."""
    return _write(folder, name, smf([track(notes([60, 64, 67][:n], TPB, TPB))], fmt=0))


def drums_only(folder: Path, name: str = "drums_only.mid") -> Path:
    """drums_only: 32 notes, all on channel 10 (MIDI channel index 9)."""
    return _write(folder, name, smf([track(notes([36, 38, 42, 46] * 8, TPB // 2, 60, channel=9))]))


def format_2(folder: Path, name: str = "format_2.mid") -> Path:
    """format_2: two independent sequences, each a valid note track."""
    a, b = track(notes([60, 62, 64], TPB, TPB)), track(notes([67, 69, 71], TPB, TPB))
    return _write(folder, name, smf([a, b], fmt=2))


def zero_division(folder: Path, name: str = "zero_division.mid") -> Path:
    """zero_division: 0 ticks per beat in the header."""
    return _write(folder, name, smf([track(notes(range(60, 72), TPB, TPB))], fmt=0, division=0))


def smpte_division(folder: Path, name: str = "smpte_25fps.mid") -> Path:
    """smpte_division: division 0xE728 (-25 frames per second, 40 ticks per frame)."""
    data = smf([track(notes(range(60, 72), 40, 40))], fmt=0, division=0xE728)
    return _write(folder, name, data)


def ten_hour_note(folder: Path, name: str = "ten_hour_note.mid") -> Path:
    """too_long: one note held 10 hours at 120 bpm (34,560,000 ticks; about 40 bytes)."""
    ticks = 10 * 3600 * 2 * TPB  # 10 h x 2 beats a second x 480 ticks a beat
    events = [(0, tempo(120)), (0, b"\x90\x3c\x50"), (ticks, b"\x80\x3c\x00")]
    return _write(folder, name, smf([track(events)], fmt=0))


def too_large(folder: Path, size: int, name: str = "too_large.mid") -> Path:
    """too_large (when size > max_file_mb): a valid piece plus text events, exactly `size` bytes.

    The padding is split into 60 kB text events: mido refuses a single message over 1 MB, and
    the file must stay valid MIDI so that raising the limit makes it `ok`.
    """
    tracks = _piece(9)[14:]  # the piece's two MTrk chunks, without its header
    chunk = 60_000

    def build(pads: list[int]) -> bytes:
        texts = [(0, b"\xff\x01" + varlen(p) + b"x" * p) for p in pads]
        return smf([tracks, track(texts)], n_tracks=3)

    full = [chunk] * max(0, (size - len(build([]))) // (chunk + 6) - 1)
    fixed = len(build([*full, 0])) - 1  # all but the last text and its length (varlen(0): 1 B)
    last = next(p for n in range(1, 5) if len(varlen(p := size - fixed - n)) == n)
    return _write(folder, name, build([*full, last]))


# ---- everything at once --------------------------------------------------------------------

#: case name -> builder taking only the folder (the cases `make_all` writes).
CASES: dict[str, Callable[[Path], Path]] = {
    "valid_piece": valid_piece,
    "valid_piece_2": lambda f: valid_piece(f, "sub/dir/valid_piece_2.mid", seed=2),
    "pop1k7_example": pop1k7_example,
    "three_four": three_four,
    "many_tempo_changes": many_tempo_changes,
    "tpb_96": lambda f: resolution(f, 96),
    "tpb_10080": lambda f: resolution(f, 10080),
    "with_drums": with_drums,
    "empty": empty,
    "random_bytes": random_bytes,
    "text_file": text_file,
    "truncated": truncated,
    "header_only": header_only,
    "corrupt_track": corrupt_track,
    "no_notes": no_notes,
    "few_notes": few_notes,
    "drums_only": drums_only,
    "format_2": format_2,
    "zero_division": zero_division,
    "smpte_division": smpte_division,
    "ten_hour_note": ten_hour_note,
    "too_large": lambda f: too_large(f, 300_000),
    "duplicate": lambda f: duplicate(f, Path(f) / "valid_piece.mid"),
    "reencoded": reencoded,
}


def make_all(folder: Path) -> dict[str, Path]:
    """Write every case in CASES into `folder` (valid_piece first: duplicate copies it)."""
    return {name: build(Path(folder)) for name, build in CASES.items()}
