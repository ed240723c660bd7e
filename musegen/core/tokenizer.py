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

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import miditoolkit
import numpy as np

from musegen import paths
from musegen.core.midi import DEFAULT_BPM, TICKS_PER_BEAT, Score, read_score, to_score

__all__ = [
    "CPTokenizer",
    "Grammar",
    "GrammarState",
    "REMITokenizer",
    "Tokenizer",
    "get_tokenizer",
    "load_tokenizer",
]

STEP = TICKS_PER_BEAT // 8  # 60 ticks: a 32nd note, the onset and duration grid
POSITIONS = 32  # positions per 4/4 bar
CELLS_PER_BEAT = TICKS_PER_BEAT // STEP  # 8 grid cells per beat
PITCH_MIN, PITCH_MAX = 21, 108  # A0..C8
NUM_DURATIONS = 64  # 60..3840 ticks
NUM_VELOCITIES = 64  # bins of 2
TEMPO_BPM = 30.0 * 2.0 ** (np.arange(32) * 3 / 31)  # geometric 30..240 BPM
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
NOTE_FIELDS = (PITCH, DURATION, VELOCITY)  # what a Note word carries, all three, in this order
#: REMI: a token of these fields opens a word of that type; the others join the open word
OPENS = {BAR_BEAT: METRICAL, PITCH: NOTE}
JOINS = {TEMPO: METRICAL, CHORD: METRICAL, REST: METRICAL, DURATION: NOTE, VELOCITY: NOTE}


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


# ---- the grammar: one reading of words, shared by check, decode and generation -------------
class GrammarState:
    """Where a song stands after the words read so far; `apply` reads the next word.

    `Tokenizer.check` and `decode` read every word through `apply` (counting violations and
    repairing what can be repaired); generation keeps one per piece and asks `Grammar` which
    words may come next. Build with `GrammarState()` (before the first word).
    """

    def __init__(self) -> None:
        self.bar = -1  # index of the current bar; -1 before the first Bar word
        self.pos: int | None = None  # position of the last Position word in this bar
        self.tempo_cell, self.tempo_sec, self.bpm = 0, 0.0, DEFAULT_BPM  # last tempo change
        self.last_note: tuple[int, int, int] | None = None  # (pitch, duration, velocity) ids
        self.ended = False  # an EOS word was read
        #: what the last word read placed: its note (start, end, pitch, velocity) in ticks,
        #: and the grid cell of a Position word (where its tempo and chord apply)
        self.note: tuple[int, int, int, int] | None = None
        self.position_cell: int | None = None

    def seconds(self, cell: int) -> float:
        """Music time of grid cell `cell` under the tempo changes read so far."""
        return self.tempo_sec + (cell - self.tempo_cell) * 60.0 / (self.bpm * CELLS_PER_BEAT)

    def exceeds(self, w: np.ndarray, max_bars: int | None, max_seconds: float | None) -> bool:
        """Would Metrical word `w` start past a cap (a bar index >= max_bars, or the time)?"""
        if w[TYPE] != METRICAL:
            return False
        if w[BAR_BEAT] == BAR:
            bar = max(self.bar, -1) + 1 + int(w[REST])
            cell = bar * POSITIONS
            return (max_bars is not None and bar >= max_bars) or (
                max_seconds is not None and self.seconds(cell) >= max_seconds
            )
        cell = max(self.bar, 0) * POSITIONS + int(w[BAR_BEAT]) - 2
        return max_seconds is not None and self.seconds(cell) >= max_seconds

    def apply(self, word: Any) -> int:  # noqa: PLR0911 (a grammar table reads best as early returns)
        """Read one word (8 CP ids, not padding): returns its violations and moves on.

        Rules: the song opens with a Bar word; a Bar carries only a rest, a Position only a
        tempo and chord; positions rise within a bar; a Note follows a Position in the same
        bar and has pitch, duration and velocity and nothing else; the song ends with one EOS
        word, which carries nothing else.
        Repairs (the decoder's): a song that opens with another word starts in bar 0; a Note
        with no position or pitch is skipped; a missing duration is a 32nd note, a missing
        velocity 89.
        """
        row = word.tolist() if isinstance(word, np.ndarray) else word
        self.note = self.position_cell = None
        kind = row[TYPE]
        if self.ended or kind == 0:  # a word after EOS, or a word with no type
            return 1
        if kind == EOS:
            self.ended = True
            return int(any(row[1:]))  # an EOS word carries nothing else
        errors = 0
        if self.bar < 0 and not (kind == METRICAL and row[BAR_BEAT] == BAR):
            errors, self.bar = 1, 0  # repair: the song starts in bar 0
        if kind == METRICAL:
            errors += any(row[f] for f in NOTE_FIELDS)
            if row[BAR_BEAT] == BAR:
                errors += bool(row[TEMPO] or row[CHORD])
                self.bar, self.pos, self.last_note = self.bar + 1 + row[REST], None, None
                return errors
            if row[BAR_BEAT] == 0:
                return errors + 1
            errors += bool(row[REST])
            k = row[BAR_BEAT] - 2
            errors += self.pos is not None and k <= self.pos
            self.pos, self.last_note = k, None
            self.position_cell = cell = self.bar * POSITIONS + k
            if row[TEMPO]:
                self.tempo_sec, self.tempo_cell = self.seconds(cell), cell
                self.bpm = float(TEMPO_BPM[row[TEMPO] - 1])
            return errors
        # a Note word
        errors += any(row[f] for f in (BAR_BEAT, TEMPO, CHORD, REST))
        if self.pos is None or not row[PITCH]:
            return errors + 1  # no position to play it at, or no pitch: skip the note
        pitch, dur, vel = (row[f] for f in NOTE_FIELDS)
        errors += (not dur) + (not vel)
        self.last_note = (pitch, dur, vel)
        start = (self.bar * POSITIONS + self.pos) * STEP
        # repairs: a 32nd note, velocity 89
        self.note = (start, start + (dur or 1) * STEP, pitch + PITCH_MIN - 1, 2 * (vel or 45) - 1)
        return errors


class Grammar:
    """Which word (CP) or token (REMI) may come next: the masks that keep generation legal.

    The same rules `GrammarState.apply` checks, as boolean masks over a field's ids (CP) or
    the token vocabulary (REMI), so a sampler can keep every output decodable
    (`check(out) == 0`) whatever its temperature. Build with `tokenizer.grammar`.

    `sequential`: fields are drawn in FIELDS order, each restricted by the ones drawn before
    it (bar_beat decides whether tempo/chord or rest may carry a value; a Note keeps the
    tokenizer's note order within a position). Otherwise every field is drawn given the type
    alone and `repair` clears what the word's bar_beat rules out.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.sizes = tuple(int(v) for v in tokenizer.field_sizes)
        self.any = [np.ones(v, bool) for v in self.sizes]
        self.value = [np.arange(v) > 0 for v in self.sizes]  # a field carrying a value
        self.ignore = [np.arange(v) == 0 for v in self.sizes]  # a field forced to Ignore
        ids = np.arange(self.sizes[BAR_BEAT])
        # bar_beat after position p: Bar, or a position > p (ids 2 + k); row 0 = no position
        self.bar_beat = [(ids == BAR) | (ids >= 3 + p) for p in range(-1, POSITIONS)]
        if isinstance(tokenizer, REMITokenizer):
            self.field_of, self.value_of = tokenizer.field_of, tokenizer.value_of
            self.token_of = {f: self.field_of == f for f in range(len(FIELDS))}  # (V,) each
            self.opens = np.zeros(len(self.field_of), bool)  # EOS and Bar may always come next
            self.opens[[1, tokenizer.token(BAR_BEAT, BAR)]] = True
            pos0 = tokenizer.token(BAR_BEAT, 2)  # Position_0
            tok = np.arange(len(self.field_of))
            # positions after p (row p + 1; row 0 = no position yet in this bar)
            self.pos_after = [
                (tok >= pos0 + p + 1) & (tok < pos0 + POSITIONS) for p in range(-1, POSITIONS)
            ]

    # -- CP: one field at a time -----------------------------------------------------------
    def type_mask(self, state: GrammarState, *, sequential: bool, min_bars: int) -> np.ndarray:
        """Allowed word types (Ignore, EOS, Metrical, Note) after `state`."""
        eos_ok = state.bar >= min_bars  # the piece has closed min_bars bars (bar min_bars is open)
        note_ok = state.pos is not None
        if sequential and state.last_note is not None:  # the note order must leave a note
            note_ok &= state.last_note != tuple(self.sizes[f] - 1 for f in NOTE_FIELDS)
        return np.array([False, eos_ok, True, note_ok])

    def field_mask(  # noqa: PLR0911 (a grammar table reads best as early returns)
        self, f: int, word: np.ndarray, state: GrammarState, *, sequential: bool, min_bars: int
    ) -> np.ndarray:
        """Allowed ids of field f (>= 1) of `word`, whose type and (sequential) earlier fields
        are drawn; only Ignore (0) when the field carries nothing in such a word."""
        kind, seq = word[TYPE], sequential
        if kind == EOS:
            return self.ignore[f]
        if kind == METRICAL:
            if f in NOTE_FIELDS:
                return self.ignore[f]
            if f == BAR_BEAT:
                return self.bar_beat[(state.pos if state.pos is not None else -1) + 1]
            if seq and f in (TEMPO, CHORD) and word[BAR_BEAT] == BAR:
                return self.ignore[f]  # a Bar word carries only a rest
            if seq and f == REST and word[BAR_BEAT] != BAR:
                return self.ignore[f]  # a Position word carries no rest
            if f == REST and state.bar + 1 < min_bars:
                # a rest past bar min_bars - 1 would end the piece early (the bar cap) or pad it
                return np.arange(self.sizes[REST]) <= min_bars - 2 - state.bar
            return self.any[f]
        # a Note word: pitch, duration and velocity carry values, the rest is Ignore
        if f not in NOTE_FIELDS:
            return self.ignore[f]
        if not (seq and state.last_note is not None):
            return self.value[f]
        last = dict(zip(NOTE_FIELDS, state.last_note, strict=True))
        tied = all(word[g] == last[g] for g in NOTE_FIELDS if g < f)
        # the tokenizer orders notes of a position by (pitch, duration, velocity)
        return self.value[f] & (np.arange(self.sizes[f]) >= last[f]) if tied else self.value[f]

    @staticmethod
    def repair(word: np.ndarray) -> None:
        """Independent draws: set the fields a Metrical word's bar_beat rules out to Ignore."""
        if word[TYPE] == METRICAL:
            if word[BAR_BEAT] == BAR:
                word[TEMPO] = word[CHORD] = 0
            else:
                word[REST] = 0

    # -- REMI: one token at a time ---------------------------------------------------------
    def token_mask(self, word: np.ndarray, state: GrammarState, *, min_bars: int) -> np.ndarray:
        """Allowed next REMI tokens while `word` (CP ids of the word being written, fields in
        FIELDS order) is open and `state` holds the words before it."""
        if word[TYPE] == NOTE and not word[DURATION]:
            return self.token_of[DURATION]
        if word[TYPE] == NOTE and not word[VELOCITY]:
            return self.token_of[VELOCITY]
        is_bar = word[TYPE] == METRICAL and word[BAR_BEAT] == BAR
        is_pos = word[TYPE] == METRICAL and not is_bar
        pos = None if is_bar else (int(word[BAR_BEAT]) - 2 if is_pos else state.pos)
        allowed = self.opens | self.pos_after[(pos if pos is not None else -1) + 1]
        if pos is not None:
            allowed = allowed | self.token_of[PITCH]
        if is_bar and not word[REST]:
            allowed = allowed | self.token_of[REST]
        if is_pos and not word[CHORD]:  # a Position word writes its tempo before its chord
            allowed = allowed | self.token_of[CHORD]
            if not word[TEMPO]:
                allowed = allowed | self.token_of[TEMPO]
        if state.bar + (1 + int(word[REST]) if is_bar else 0) < min_bars:
            allowed = allowed.copy()
            allowed[1] = False  # 1 = EOS: the piece has not reached bar min_bars yet
            if is_bar:  # as in CP: no rest past bar min_bars - 1
                allowed &= ~(self.token_of[REST] & (self.value_of > min_bars - 2 - state.bar))
        return allowed


class Tokenizer:
    """Shared core: MIDI -> word matrix -> MIDI, vocabulary, save/load and grammar check.

    Build one with `get_tokenizer("cp"|"remi", use_chords=..., num_rest_bars=...)` or a subclass
    directly. Subclasses set `representation` and override `_from_words` (word matrix -> their
    array) and `_read` (their array -> word matrix, the index where each word starts, and the
    number of tokens that did not fit in a word). `grammar` is the `Grammar` of its arrays.

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
        path = paths.vocab(out_dir)
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

    def to_words(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(word matrix, index in `tokens` where each word starts) of this tokenizer's array.

        Raises:
            ValueError: wrong shape or an id out of its field's range.
        """
        words, starts, _ = self._read(np.asarray(tokens))
        return words, starts

    @functools.cached_property
    def grammar(self) -> Grammar:
        """The masks that keep generated arrays decodable (built once per tokenizer)."""
        return Grammar(self)

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
        words, _, errors = self._read(np.asarray(tokens))
        state, notes, tempos, chords = GrammarState(), [], [], []
        for row in words.tolist():
            if not any(row):  # padding
                continue
            errors += state.apply(row)
            if state.note is not None:
                notes.append(state.note)
            if state.position_cell is not None:  # a Position word's tempo and chord changes
                tick = state.position_cell * STEP
                if row[TEMPO]:
                    tempos.append((tick, float(TEMPO_BPM[row[TEMPO] - 1])))
                if row[CHORD]:
                    root_q = CHORDS[row[CHORD] - 1]
                    chords.append((tick, f"{root_q}_{root_q.split('_')[0]}"))
        self.last_decode_errors = errors + (not state.ended)
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
        """Count grammar violations (0 for anything `encode` produces): see `GrammarState`.

        All-zero rows (padding) are ignored.

        Raises:
            ValueError: wrong shape or an id out of its field's range.
        """
        words, _, errors = self._read(np.asarray(tokens))
        state = GrammarState()
        errors += sum(state.apply(row) for row in words.tolist() if any(row))
        return errors + (not state.ended)

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

    def _read(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        raise NotImplementedError

    def _to_words(self, tokens: np.ndarray) -> tuple[np.ndarray, int]:
        """(word matrix, tokens that fit no word): `_read` without the word starts."""
        words, _, errors = self._read(tokens)
        return words, errors


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

    def _read(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        if tokens.ndim != 2 or tokens.shape[1] != len(FIELDS):
            raise ValueError(
                f"cp tokens: expected shape (n_words, {len(FIELDS)}), got {tokens.shape}; "
                "pass one song's CP array (REMI arrays are 1-D)"
            )
        self._check_range(tokens, self.field_sizes[None, :])
        return tokens.astype(np.int64), np.arange(len(tokens)), 0


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
        #: each REMI id's CP field and id within that field (PAD: type 0; EOS: type 1)
        self.field_of = np.concatenate([[0, 0], np.repeat(np.arange(1, len(FIELDS)), sizes)])
        self.value_of = np.concatenate([[0, 1], *(np.arange(1, s + 1) for s in sizes)])
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

    def token(self, field: int, value: int) -> int:
        """The REMI id of id `value` (>= 1) of CP field `field` (>= 1)."""
        return int(self._offset[field]) + value - 1

    def _from_words(self, words: np.ndarray) -> np.ndarray:
        ids = np.where(words > 0, words + self._offset - 1, 0)  # (n_words, 8)
        ids[:, TYPE] = np.where(words[:, TYPE] == EOS, 1, 0)  # only EOS shows its type
        return ids[ids > 0].astype(np.int32)  # row-major: each word's fields in order

    def _read(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        if tokens.ndim != 1:
            raise ValueError(
                f"remi tokens: expected a 1-D array, got shape {tokens.shape}; "
                "pass one song's REMI stream (CP arrays are 2-D)"
            )
        self._check_range(tokens, np.array(len(self.events)))
        words: list[list[int]] = []
        starts: list[int] = []
        errors = 0
        for i, tok in enumerate(tokens.tolist()):
            field, value = int(self.field_of[tok]), int(self.value_of[tok])
            if tok == 0:
                continue
            if field == TYPE or field in OPENS:  # EOS, or a token that opens a word
                words.append([EOS if field == TYPE else OPENS[field]] + [0] * (len(FIELDS) - 1))
                words[-1][field] = value
                starts.append(i)
            elif words and words[-1][TYPE] == JOINS[field] and not words[-1][field]:
                words[-1][field] = value
            else:
                errors += 1  # e.g. a Duration with no Pitch before it
        return (
            np.array(words, np.int64).reshape(-1, len(FIELDS)),
            np.array(starts, np.int64),
            errors,
        )


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
    path = paths.vocab(path) if path.is_dir() else path
    return from_vocab(json.loads(path.read_text()), path)
