"""REMI and Compound Word (CP) tokenizers sharing one core.

Both see a piece as the same list of *words* (Hsiao et al. 2021): a Metrical word (a Bar, or a
Position in the bar with an optional tempo and chord change), a Note word (pitch, duration,
velocity) and a final EOS word. CP stores the words as rows of an int32 matrix, one column per
field; REMI writes each word's non-empty fields as a flat token stream (Huang & Yang 2020).
The base class turns a MIDI file into the word matrix with numpy, checks the grammar and
decodes words back to MIDI; a subclass only maps between words and its own array.

Grid and vocabulary (both representations, the Pop1K7 conventions):

- 480 ticks per beat and a 4/4 bar grid for every file (Pop1K7 hard-codes 4/4 too): a bar is
  1920 ticks split into 32 positions of 60 ticks. A 3/4 or 6/8 file keeps every note exactly
  (onsets on the 60-tick grid); only its bar lines fall every 4 beats instead.
- Tempo: 32 classes spaced geometrically from 30 to 240 BPM (3 octaves, about 7 % apart); a
  tempo goes to the nearest class in log space, out-of-range tempos clip to the ends. The
  first Position word of a song always carries the initial tempo (120 BPM when the file has
  none); later ones only when the class changes.
- Pitch: 88 piano keys, MIDI 21-108. Notes outside are dropped (no octave folding, which
  would change the music) and counted in `last_encode_dropped`.
- Duration: 64 classes, 60..3840 ticks (1/16 beat to two 4/4 bars), rounded to the nearest
  60 ticks; shorter notes become 60, longer ones are clipped to 3840.
- Velocity: 64 bins of width 2; bin k decodes to 2k + 1 (1..127).
- Rest: Rest_k (k = 1..num_rest_bars) on a Bar word means "k empty bars come before this
  bar", so silences do not emit runs of Bar words. A longer silence is split: a Bar word with
  Rest_max followed by an empty bar, repeated (each chunk covers max + 1 bars).
- Chord: 12 roots x 11 Pop1K7/chorder qualities + N_N. Taken from Pop1K7 markers
  `Root_Quality_Bass` (the bass is dropped, as in the CP paper) when the file has any;
  otherwise computed as Pop1K7 did: one chord per beat by chorder (`chorder_chords`, on the
  quantized notes; N_N where chorder finds no complete chord). Emitted when the chord
  changes; decode writes each one back as a `Root_Quality_Root` marker, so re-encoding a
  decoded file reads the same chords back.
- id 0 is "Ignore" in every CP field (the field does not apply) and "PAD" in REMI.

Round trip: `encode(decode(encode(x))) == encode(x)` for any file. Through a *written* file it
holds too, except when two notes of one pitch overlap after quantization: MIDI readers pair
note-offs first-in first-out, so the file cannot say which of the two ends first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import miditoolkit
import numpy as np

from musegen.core.midi import TICKS_PER_BEAT, Score, read_score, to_score

__all__ = ["CPTokenizer", "REMITokenizer", "Tokenizer", "get_tokenizer", "load_tokenizer"]

STEP = TICKS_PER_BEAT // 8  # 60 ticks: a 32nd note, the onset and duration grid
POSITIONS = 32  # positions per 4/4 bar
PITCH_MIN, PITCH_MAX = 21, 108  # A0..C8
NUM_DURATIONS = 64  # 60..3840 ticks
NUM_VELOCITIES = 64  # bins of 2
TEMPO_BPM = 30.0 * 2.0 ** (np.arange(32) * 3 / 31)  # geometric 30..240 BPM
DEFAULT_BPM = 120.0  # MIDI's tempo when a file sets none
ROOTS = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FLATS = {"Db": "C#", "Eb": "D#", "Gb": "F#", "Ab": "G#", "Bb": "A#", "Cb": "B", "Fb": "E"}
QUALITIES = {  # chorder's names (used in Pop1K7 markers) -> intervals above the root
    "M": (0, 4, 7),
    "m": (0, 3, 7),
    "o": (0, 3, 6),
    "+": (0, 4, 8),
    "7": (0, 4, 7, 10),
    "M7": (0, 4, 7, 11),
    "m7": (0, 3, 7, 10),
    "o7": (0, 3, 6, 9),
    "/o7": (0, 3, 6, 10),
    "sus2": (0, 2, 7),
    "sus4": (0, 5, 7),
}
CHORDS = ("N_N", *(f"{r}_{q}" for r in ROOTS for q in QUALITIES))

#: CP columns; type first because the model's type-first heads read column 0.
FIELDS = ("type", "bar_beat", "tempo", "chord", "pitch", "duration", "velocity", "rest")
TYPE, BAR_BEAT, TEMPO, CHORD, PITCH, DURATION, VELOCITY, REST = range(len(FIELDS))
EOS, METRICAL, NOTE = 1, 2, 3  # ids in the type field
BAR = 1  # id of "Bar" in bar_beat; Position_k is 2 + k


def _first(pair: tuple) -> Any:
    return pair[0]


def parse_chord_marker(text: str) -> int | None:
    """Chord index in CHORDS of a Pop1K7 marker (`E_m7_G`, `N_N_N`), or None if not a chord."""
    parts = text.split("_")
    if len(parts) not in (2, 3):
        return None
    root, quality = FLATS.get(parts[0], parts[0]), parts[1]
    if root == "N" and quality == "N":
        return 0
    if root not in ROOTS or quality not in QUALITIES:
        return None
    return CHORDS.index(f"{root}_{quality}")


def chorder_chords(start: np.ndarray, end: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """One chord per beat as Pop1K7 made them: index in CHORDS (0 = N_N) for beats 0.. .

    chorder's `Dechorder.dechord` (the recogniser of Pop1K7's analyzer: a one-beat or a
    two-beat reading per beat, whichever scores better; an incomplete reading is N_N), with
    its note lookup done per window on a slice of its timepoints (the same notes: it looks 10
    onsets back from a window's start) so a long piece costs O(n log n), not O(n^2).

    Args:
        start, end, pitch: note arrays in ticks at 480 per beat.
    """
    from collections import OrderedDict

    from chorder import Dechorder
    from chorder.timepoints import get_notes_at

    midi = miditoolkit.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    piano = miditoolkit.Instrument(program=0, name="piano")
    notes = zip(start.tolist(), end.tolist(), pitch.tolist(), strict=True)
    piano.notes = [miditoolkit.Note(64, p, s, e) for s, e, p in notes if e > s]
    midi.instruments.append(piano)
    midi.max_tick = int(end.max()) if len(end) else 0
    # chorder.timepoints.get_timepoints: onset -> notes, each given .dur (and .instrument)
    points: dict[int, list] = {}
    for note in sorted(piano.notes, key=lambda n: n.start):
        note.dur, note.instrument = note.end - note.start, piano
        points.setdefault(note.start, []).append(note)
    onsets = np.array(sorted(points), np.int64)
    items = [(t, points[t]) for t in onsets.tolist()]

    def reading(beats: int) -> list[tuple[Any, float]]:  # Dechorder.get_chords(midi, beats)
        span = TICKS_PER_BEAT * beats
        out = []
        for lo in range(0, midi.max_tick, span):
            first, stop = np.searchsorted(onsets, [lo, lo + span])
            window = OrderedDict(items[max(int(first) - 10, 0) : int(stop)])
            sounding = get_notes_at(window, lo, lo + span)
            out.append(Dechorder.get_chord_quality(sounding, lo, lo + span))
        return out

    # Dechorder.dechord: each beat keeps its one-beat reading when both one-beat readings of
    # its pair score at least the two-beat one (halved), else the two-beat reading
    ones, twos = reading(1), [(c, s / 2) for c, s in reading(2)]
    chords = []
    for i, (two, two_score) in enumerate(twos):
        prev = ones[2 * i]
        if 2 * i + 1 < len(ones):
            nxt = ones[2 * i + 1]
            pair = [prev[0], nxt[0]] if prev[1] >= two_score and nxt[1] >= two_score else [two] * 2
            chords += pair
        else:
            chords.append(prev[0] if prev[1] > two_score else two)
    return np.array(
        [CHORDS.index(f"{ROOTS[c.root_pc]}_{c.quality}") if c.is_complete() else 0 for c in chords],
        np.int64,
    )


class Tokenizer:
    """Shared core: MIDI -> word matrix -> MIDI, vocabulary, save/load and grammar check.

    Build one with `get_tokenizer("cp"|"remi", use_chords=..., num_rest_bars=...)` or a subclass
    directly. Subclasses set `representation` and override `_from_words` (word matrix -> their
    array) and `_to_words` (their array -> word matrix plus the number of tokens that did not
    fit in a word).

    Args:
        use_chords: emit chord events (from markers, else computed per beat).
        num_rest_bars: largest Rest_k; longer silences are split (see the module docstring).
    """

    representation: ClassVar[str] = ""

    def __init__(self, use_chords: bool = True, num_rest_bars: int = 16) -> None:
        if num_rest_bars < 1:
            raise ValueError(f"num_rest_bars must be >= 1, got {num_rest_bars}")
        self.use_chords, self.num_rest_bars = bool(use_chords), int(num_rest_bars)
        # event strings per CP field, id 0 first
        self.field_events: dict[str, list[str]] = {
            "type": ["Ignore", "EOS", "Metrical", "Note"],
            "bar_beat": ["Ignore", "Bar", *(f"Position_{k}" for k in range(POSITIONS))],
            "tempo": ["Ignore", *(f"Tempo_{round(b)}" for b in TEMPO_BPM)],
            "chord": ["Ignore", *(f"Chord_{c}" for c in CHORDS)],
            "pitch": ["Ignore", *(f"Pitch_{p}" for p in range(PITCH_MIN, PITCH_MAX + 1))],
            "duration": ["Ignore", *(f"Duration_{STEP * d}" for d in range(1, NUM_DURATIONS + 1))],
            "velocity": ["Ignore", *(f"Velocity_{2 * k + 1}" for k in range(NUM_VELOCITIES))],
            "rest": ["Ignore", *(f"Rest_{k}" for k in range(1, self.num_rest_bars + 1))],
        }
        self.field_sizes = np.array([len(self.field_events[f]) for f in FIELDS])
        self.last_encode_dropped = 0  # notes outside 21..108 in the last encode
        self.last_decode_errors = 0  # words or tokens skipped or repaired in the last decode

    # -- configuration and vocabulary -----------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Settings that rebuild this tokenizer (and the grid constants, for readers)."""
        return {
            "use_chords": self.use_chords,
            "num_rest_bars": self.num_rest_bars,
            "ticks_per_beat": TICKS_PER_BEAT,
            "positions_per_bar": POSITIONS,
            "time_signature": "4/4 grid for every file",
            "tempo_bpm": [round(float(b), 4) for b in TEMPO_BPM],
        }

    @property
    def vocab(self) -> dict[str, Any]:
        """The vocab.json content: fields, sizes, event string of every id, config."""
        raise NotImplementedError

    def save(self, out_dir: Path | str) -> Path:
        """Write vocab.json into `out_dir` (enough to rebuild the tokenizer and decode)."""
        path = Path(out_dir) / "vocab.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.vocab, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """Rebuild a tokenizer from a folder holding vocab.json (or the file itself)."""
        return load_tokenizer(path)

    # -- encoding -------------------------------------------------------------------------
    def encode(self, source: Path | str | miditoolkit.MidiFile | Score) -> np.ndarray:
        """Tokenize a MIDI file (path, miditoolkit.MidiFile or Score) to this tokenizer's array.

        Raises:
            MidiError: the path is not a readable MIDI file.
        """
        if isinstance(source, Score):
            score = source
        elif isinstance(source, miditoolkit.MidiFile):
            score = to_score(source)
        else:
            score = read_score(source)
        return self._from_words(self.words(score))

    def from_words(self, words: np.ndarray) -> np.ndarray:
        """This tokenizer's array of a word matrix (`words` of any tokenizer with the same
        config): encode once, write every representation."""
        return self._from_words(words)

    def words(self, score: Score) -> np.ndarray:
        """The word matrix of a Score: int32 (n_words, 8), CP ids in FIELDS column order."""
        n = score.notes
        keep = (n[:, 2] >= PITCH_MIN) & (n[:, 2] <= PITCH_MAX)
        self.last_encode_dropped = int((~keep).sum())
        n = n[keep]
        cell = (n[:, 0] + STEP // 2) // STEP  # onset on the 60-tick grid, halves round up
        dur = np.clip((n[:, 1] - n[:, 0] + STEP // 2) // STEP, 1, NUM_DURATIONS)
        pitch_id = n[:, 2] - (PITCH_MIN - 1)
        vel_id = np.clip(n[:, 3], 0, 127) // 2 + 1
        order = np.lexsort((vel_id, dur, pitch_id, cell))  # notes of a position by pitch
        cell, dur, pitch_id, vel_id = cell[order], dur[order], pitch_id[order], vel_id[order]
        n_cells = (int(cell.max()) // POSITIONS + 1) * POSITIONS if len(cell) else POSITIONS

        t_cell, t_id = self.__tempo_events(score, n_cells)
        c_cell, c_id = self.__chord_events(score, cell, dur, pitch_id, n_cells)

        # one Position word per cell holding notes or a change; one Bar word per bar with any
        m_cell = np.unique(np.concatenate([cell, t_cell, c_cell]))
        pos = np.zeros((len(m_cell), len(FIELDS)), np.int64)
        pos[:, TYPE], pos[:, BAR_BEAT] = METRICAL, 2 + m_cell % POSITIONS
        pos[np.searchsorted(m_cell, t_cell), TEMPO] = t_id
        pos[np.searchsorted(m_cell, c_cell), CHORD] = c_id
        bars = np.unique(m_cell // POSITIONS)
        gaps = np.diff(bars, prepend=-1) - 1  # empty bars before each bar
        bar_rows, bar_cell = [], []
        for bar, gap in zip(bars.tolist(), gaps.tolist(), strict=True):
            left = gap
            while left > self.num_rest_bars:  # a chunk: Rest_max, then one empty bar
                bar_rows.append(self.num_rest_bars)
                bar_cell.append(bar * POSITIONS)
                left -= self.num_rest_bars + 1
            bar_rows.append(left)
            bar_cell.append(bar * POSITIONS)
        bar_w = np.zeros((len(bar_rows), len(FIELDS)), np.int64)
        bar_w[:, TYPE], bar_w[:, BAR_BEAT], bar_w[:, REST] = METRICAL, BAR, bar_rows
        note_w = np.zeros((len(cell), len(FIELDS)), np.int64)
        note_w[:, TYPE] = NOTE
        note_w[:, PITCH], note_w[:, DURATION], note_w[:, VELOCITY] = pitch_id, dur, vel_id

        # order: by cell, then Bar < Position < Note; stable keeps each group's own order
        key = np.concatenate([np.array(bar_cell) * 3, m_cell * 3 + 1, cell * 3 + 2])
        rows = np.concatenate([bar_w, pos, note_w])[np.argsort(key, kind="stable")]
        eos = np.zeros((1, len(FIELDS)), np.int64)
        eos[0, TYPE] = EOS
        return np.concatenate([rows, eos]).astype(np.int32)

    def __tempo_events(self, score: Score, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        """(cells, tempo ids) of tempo-class changes inside the song, the first at cell 0."""
        tempos = sorted(score.tempos, key=_first)  # stable: file order within a tick
        if not tempos or tempos[0][0] > 0:
            tempos.insert(0, (0, DEFAULT_BPM))
        ticks = np.array([t for t, _ in tempos], np.int64)
        bpm = np.clip(np.array([b for _, b in tempos], float), TEMPO_BPM[0], TEMPO_BPM[-1])
        cls = np.abs(np.log(bpm)[:, None] - np.log(TEMPO_BPM)[None]).argmin(1)
        return self.__changes((ticks + STEP // 2) // STEP, cls + 1, n_cells)

    def __chord_events(
        self, score: Score, cell: np.ndarray, dur: np.ndarray, pitch_id: np.ndarray, n_cells: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cells, chord ids) of chord changes: from markers if any parse, else per beat."""
        empty = np.zeros(0, np.int64)
        if not self.use_chords:
            return empty, empty
        # markers inside the song only: if all fall after it, decode writes none, and a
        # re-encode must then compute the same chords as this encode did
        marks = [((t + STEP // 2) // STEP, parse_chord_marker(text)) for t, text in score.markers]
        marks = sorted(((t, c) for t, c in marks if c is not None and t < n_cells), key=_first)
        if marks:
            cells = np.array([t for t, _ in marks], np.int64)
            return self.__changes(cells, np.array([c for _, c in marks], np.int64) + 1, n_cells)
        if not len(cell):
            return empty, empty
        beats = chorder_chords(cell * STEP, (cell + dur) * STEP, pitch_id + PITCH_MIN - 1)
        return self.__changes(np.arange(len(beats)) * 8, beats + 1, n_cells)

    @staticmethod
    def __changes(cells: np.ndarray, ids: np.ndarray, n_cells: int) -> tuple[np.ndarray, ...]:
        """Keep the last value per cell, then only values that differ from the previous one."""
        last = np.append(cells[1:] != cells[:-1], True)
        cells, ids = cells[last], ids[last]
        changed = np.insert(ids[1:] != ids[:-1], 0, True)
        cells, ids = cells[changed], ids[changed]
        inside = cells < n_cells  # events after the last note's bar are dropped
        return cells[inside], ids[inside]

    # -- decoding and grammar -------------------------------------------------------------
    def decode(self, tokens: np.ndarray) -> miditoolkit.MidiFile:
        """Turn an array (maybe generated, maybe ungrammatical) back into a MIDI file.

        Words that do not fit are skipped or repaired and counted in `last_decode_errors`.

        Raises:
            ValueError: wrong shape or an id out of its field's range.
        """
        words, errors = self._to_words(np.asarray(tokens))
        errors_walk, notes, tempos, chords = self.__walk(words)
        self.last_decode_errors = errors + errors_walk
        midi = miditoolkit.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
        piano = miditoolkit.Instrument(program=0, is_drum=False, name="piano")
        piano.notes = [miditoolkit.Note(v, p, s, e) for s, e, p, v in notes]
        midi.instruments.append(piano)
        midi.tempo_changes = [miditoolkit.TempoChange(float(b), t) for t, b in tempos]
        midi.time_signature_changes = [miditoolkit.TimeSignature(4, 4, 0)]
        midi.markers = [miditoolkit.Marker(text, t) for t, text in chords]
        midi.max_tick = max([e for _, e, _, _ in notes] + [0])
        return midi

    def check(self, tokens: np.ndarray) -> int:
        """Count grammar violations (0 for anything `encode` produces).

        Rules: the song opens with a Bar word; a Bar carries only a rest, a Position only a
        tempo and chord; positions rise within a bar; a Note follows a Position in the same
        bar and has pitch, duration and velocity and nothing else; the song ends with one EOS.
        All-zero rows (padding) are ignored.

        Raises:
            ValueError: wrong shape or an id out of its field's range.
        """
        words, errors = self._to_words(np.asarray(tokens))
        return errors + self.__walk(words)[0]

    def __walk(self, words: np.ndarray) -> tuple[int, list, list, list]:
        """Read words in order: (violations, notes, tempos, chord markers)."""
        errors, bar, pos = 0, -1, None
        notes: list[tuple[int, int, int, int]] = []
        tempos: list[tuple[int, float]] = []
        chords: list[tuple[int, str]] = []
        ended = False
        for row in words.tolist():
            if not any(row):  # padding
                continue
            kind = row[TYPE]
            if ended or kind == 0:  # a word after EOS, or a word with no type
                errors += 1
                continue
            if kind == EOS:
                ended = True
                continue
            if bar < 0 and not (kind == METRICAL and row[BAR_BEAT] == BAR):
                errors, bar = errors + 1, 0  # repair: the song starts in bar 0
            if kind == METRICAL:
                errors += any(row[f] for f in (PITCH, DURATION, VELOCITY))
                if row[BAR_BEAT] == BAR:
                    errors += bool(row[TEMPO] or row[CHORD])
                    bar, pos = bar + 1 + row[REST], None
                elif row[BAR_BEAT] == 0:
                    errors += 1
                else:
                    errors += bool(row[REST])
                    k = row[BAR_BEAT] - 2
                    errors += pos is not None and k <= pos
                    pos, cell = k, bar * POSITIONS + k
                    if row[TEMPO]:
                        tempos.append((cell * STEP, float(TEMPO_BPM[row[TEMPO] - 1])))
                    if row[CHORD]:
                        root_q = CHORDS[row[CHORD] - 1]
                        root = root_q.split("_")[0]
                        chords.append((cell * STEP, f"{root_q}_{root}"))
                continue
            # a Note word
            errors += any(row[f] for f in (BAR_BEAT, TEMPO, CHORD, REST))
            if pos is None or not row[PITCH]:
                errors += 1  # no position to play it at, or no pitch: skip the note
                continue
            dur, vel = row[DURATION], row[VELOCITY]
            errors += (not dur) + (not vel)
            dur, vel = dur or 1, vel or 45  # repairs: a 32nd note, velocity 89
            start = (bar * POSITIONS + pos) * STEP
            notes.append((start, start + dur * STEP, row[PITCH] + PITCH_MIN - 1, 2 * vel - 1))
        errors += not ended
        return errors, notes, tempos, chords

    def _check_range(self, ids: np.ndarray, sizes: np.ndarray) -> None:
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"{self.representation} tokens: expected integer ids, got dtype {ids.dtype}; "
                "pass sampled ids (argmax / multinomial output), not logits or probabilities"
            )
        bad = (ids < 0) | (ids >= sizes)
        if bad.any():
            i = np.argwhere(bad)[0]
            raise ValueError(
                f"{self.representation} tokens: id {int(ids[tuple(i)])} at index {i.tolist()} "
                f"is outside 0..{int(np.broadcast_to(sizes, ids.shape)[tuple(i)]) - 1}; "
                "these tokens were made with another vocabulary (load its vocab.json)"
            )

    # -- hooks ----------------------------------------------------------------------------
    def _from_words(self, words: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _to_words(self, tokens: np.ndarray) -> tuple[np.ndarray, int]:
        raise NotImplementedError


class CPTokenizer(Tokenizer):
    """Compound words: an int32 array (n_words, 8), one vocabulary per column (FIELDS)."""

    representation = "cp"

    @property
    def vocab(self) -> dict[str, Any]:
        return {
            "representation": "cp",
            "fields": list(FIELDS),
            "sizes": self.field_sizes.tolist(),
            "events": self.field_events,
            "type_ids": {"EOS": EOS, "Metrical": METRICAL, "Note": NOTE},
            "config": self.config,
        }

    def _from_words(self, words: np.ndarray) -> np.ndarray:
        return words

    def _to_words(self, tokens: np.ndarray) -> tuple[np.ndarray, int]:
        if tokens.ndim != 2 or tokens.shape[1] != len(FIELDS):
            raise ValueError(
                f"cp tokens: expected shape (n_words, {len(FIELDS)}), got {tokens.shape}; "
                "pass one song's CP array (REMI arrays are 1-D)"
            )
        self._check_range(tokens, self.field_sizes[None, :])
        return tokens.astype(np.int64), 0


class REMITokenizer(Tokenizer):
    """REMI: one int32 token stream; each word's non-empty fields in FIELDS order.

    Ids: 0 PAD, 1 EOS, then the events of bar_beat, tempo, chord, pitch, duration, velocity and
    rest (each field's events without its Ignore), in that order.
    """

    representation = "remi"

    def __init__(self, use_chords: bool = True, num_rest_bars: int = 16) -> None:
        super().__init__(use_chords=use_chords, num_rest_bars=num_rest_bars)
        # first REMI id of each field's event 1 (type: only EOS is written)
        sizes = self.field_sizes[1:] - 1
        self._offset = np.concatenate([[1], 2 + np.cumsum(np.concatenate([[0], sizes[:-1]]))])
        self._field_of = np.concatenate([[0, 0], np.repeat(np.arange(1, len(FIELDS)), sizes)])
        self._id_in_field = np.concatenate([[0, 1], *(np.arange(1, s + 1) for s in sizes)])
        self.events = ["PAD", "EOS"] + [e for f in FIELDS[1:] for e in self.field_events[f][1:]]

    @property
    def vocab(self) -> dict[str, Any]:
        return {
            "representation": "remi",
            "fields": ["token"],
            "sizes": [len(self.events)],
            "events": {"token": self.events},
            "config": self.config,
        }

    def _from_words(self, words: np.ndarray) -> np.ndarray:
        ids = np.where(words > 0, words + self._offset - 1, 0)  # (n_words, 8)
        ids[:, TYPE] = np.where(words[:, TYPE] == EOS, 1, 0)  # only EOS shows its type
        return ids[ids > 0].astype(np.int32)  # row-major: each word's fields in order

    def _to_words(self, tokens: np.ndarray) -> tuple[np.ndarray, int]:
        if tokens.ndim != 1:
            raise ValueError(
                f"remi tokens: expected a 1-D array, got shape {tokens.shape}; "
                "pass one song's REMI stream (CP arrays are 2-D)"
            )
        self._check_range(tokens, np.array(len(self.events)))
        words: list[list[int]] = []
        errors = 0
        # a token that opens a word, and the word kinds each other field may join
        opens = {BAR_BEAT: METRICAL, PITCH: NOTE}
        joins = {TEMPO: METRICAL, CHORD: METRICAL, REST: METRICAL, DURATION: NOTE, VELOCITY: NOTE}
        for tok in tokens.tolist():
            field, value = int(self._field_of[tok]), int(self._id_in_field[tok])
            if tok == 0:
                continue
            if field == TYPE:  # EOS
                words.append([EOS] + [0] * (len(FIELDS) - 1))
            elif field in opens:
                words.append([opens[field]] + [0] * (len(FIELDS) - 1))
                words[-1][field] = value
            elif words and words[-1][TYPE] == joins[field] and not words[-1][field]:
                words[-1][field] = value
            else:
                errors += 1  # e.g. a Duration with no Pitch before it
        return np.array(words, np.int64).reshape(-1, len(FIELDS)), errors


_CLASSES: dict[str, type[Tokenizer]] = {"cp": CPTokenizer, "remi": REMITokenizer}


def get_tokenizer(representation: str, **params: Any) -> Tokenizer:
    """A tokenizer by name ("cp" or "remi") built with `params` (use_chords, num_rest_bars)."""
    if representation not in _CLASSES:
        raise ValueError(f"unknown representation {representation!r}; use one of {list(_CLASSES)}")
    return _CLASSES[representation](**params)


def from_vocab(vocab: Mapping[str, Any], where: Path | str) -> Tokenizer:
    """Rebuild the tokenizer a vocab dict describes (a vocab.json, or a checkpoint's copy).

    Raises:
        ValueError: naming `where`: the dict is not a musegen vocab, or its events differ from
            what this version builds from the same config (an incompatible version wrote it).
    """
    rep, cfg = vocab.get("representation"), vocab.get("config")
    if rep not in _CLASSES or not isinstance(cfg, Mapping):
        raise ValueError(
            f"{where}: representation {rep!r} with no tokenizer config is not a musegen vocab; "
            f"expected one of {list(_CLASSES)} as written by `musegen tokenize`"
        )
    tok = get_tokenizer(rep, use_chords=cfg["use_chords"], num_rest_bars=cfg["num_rest_bars"])
    if tok.vocab["events"] != vocab["events"]:
        raise ValueError(
            f"{where}: its event list differs from the one this musegen version builds from "
            "the same config; re-run `musegen tokenize` (and retrain) with this version"
        )
    return tok


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Rebuild the tokenizer saved in `path` (a folder with vocab.json, or the file).

    Raises:
        ValueError: see `from_vocab`.
    """
    path = Path(path)
    path = path / "vocab.json" if path.is_dir() else path
    return from_vocab(json.loads(path.read_text()), path)
