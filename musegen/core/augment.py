"""Training-time augmentation of token windows: pitch transposition and tempo-class shift.

Works on any vocab.json (CP: one vocabulary per field; REMI: one field holding every event)
by reading event names: `Pitch_<midi>` moves by k semitones, `Chord_<root>_<quality>` moves
its root by k (N_N stays), `Tempo_<bpm>` moves by t classes (about 7 % each). Other events,
padding and Ignore are unchanged.

Range rule (shift, never skip): k is drawn uniformly among the shifts in
[-transpose_range, transpose_range] that keep every pitch of the window inside the piano
(A0..C8, the vocabulary); k = 0 always qualifies, so every window is used. A window spanning
the whole keyboard is therefore never transposed, and one near an edge moves mostly inward.
The tempo shift follows the same rule within the 32 tempo classes. Validation windows are
never augmented (train.py applies this to training batches only).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

_PITCH = re.compile(r"Pitch_(\d+)$")
_CHORD = re.compile(r"Chord_([A-G]#?)_(.+)$")
_ROOTS = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def _pitch_table(events: list[str], shifts: np.ndarray) -> np.ndarray:
    """(len(shifts), V) new id of each event under each semitone shift; -1 = leaves the range."""
    index = {e: i for i, e in enumerate(events)}
    table = np.tile(np.arange(len(events)), (len(shifts), 1))
    for i, event in enumerate(events):
        if m := _PITCH.match(event):
            for s, k in enumerate(shifts.tolist()):
                table[s, i] = index.get(f"Pitch_{int(m[1]) + k}", -1)
        elif (m := _CHORD.match(event)) and m[1] in _ROOTS:
            for s, k in enumerate(shifts.tolist()):
                table[s, i] = index[f"Chord_{_ROOTS[(_ROOTS.index(m[1]) + k) % 12]}_{m[2]}"]
    return table


def _tempo_table(events: list[str], shifts: np.ndarray) -> np.ndarray:
    """(len(shifts), V) new id of each event under each tempo-class shift; -1 = off the end."""
    ids = [i for i, e in enumerate(events) if e.startswith("Tempo_")]  # ascending classes
    table = np.tile(np.arange(len(events)), (len(shifts), 1))
    for c, i in enumerate(ids):
        for s, t in enumerate(shifts.tolist()):
            table[s, i] = ids[c + t] if 0 <= c + t < len(ids) else -1
    return table


class Augmenter:
    """Random pitch transposition and tempo-class shift of token windows.

    Args:
        vocab: the tokenize stage's vocab.json content (fields, events per field).
        transpose_range: largest |k| in semitones (0 = no transposition).
        tempo_shift_range: largest |t| in tempo classes (0 = no tempo shift).
    """

    def __init__(
        self, vocab: Mapping[str, Any], transpose_range: int, tempo_shift_range: int = 0
    ) -> None:
        if transpose_range < 0 or tempo_shift_range < 0:
            raise ValueError(
                f"train.transpose_range ({transpose_range}) and train.tempo_shift_range "
                f"({tempo_shift_range}) must be >= 0"
            )
        events = [list(vocab["events"][f]) for f in vocab["fields"]]
        self.pitch_shifts = np.arange(-transpose_range, transpose_range + 1)
        self.tempo_shifts = np.arange(-tempo_shift_range, tempo_shift_range + 1)
        # one (n_shifts, V_f) table per field; identity rows where a field has no such events
        self.pitch = [_pitch_table(e, self.pitch_shifts) for e in events]
        self.tempo = [_tempo_table(e, self.tempo_shifts) for e in events]

    @property
    def active(self) -> bool:
        return len(self.pitch_shifts) > 1 or len(self.tempo_shifts) > 1

    def transpose(self, win: np.ndarray, k: int) -> np.ndarray:
        """`win` (T, F) ids moved by k semitones (k within the range; -1 where a pitch leaves)."""
        return self._apply(self.pitch, win, int(np.flatnonzero(self.pitch_shifts == k)[0]))

    def shift_tempo(self, win: np.ndarray, t: int) -> np.ndarray:
        """`win` (T, F) ids moved by t tempo classes (-1 where a tempo leaves the classes)."""
        return self._apply(self.tempo, win, int(np.flatnonzero(self.tempo_shifts == t)[0]))

    def __call__(self, win: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A randomly transposed (and tempo-shifted) copy of `win`; draws nothing when off."""
        for tables, shifts in ((self.pitch, self.pitch_shifts), (self.tempo, self.tempo_shifts)):
            if len(shifts) > 1:
                ok = np.ones(len(shifts), bool)  # shifts keeping every id of the window valid
                for f, table in enumerate(tables):
                    ok &= (table[:, win[:, f]] >= 0).all(axis=1)
                win = self._apply(tables, win, int(rng.choice(np.flatnonzero(ok))))
        return win

    @staticmethod
    def _apply(tables: list[np.ndarray], win: np.ndarray, s: int) -> np.ndarray:
        out = np.empty_like(win)
        for f, table in enumerate(tables):
            out[:, f] = table[s, win[:, f]]
        return out
