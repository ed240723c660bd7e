"""Augmentation: transposing tokens equals transposing the music, on real files; ranges kept."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from musegen.core import tokenizer as tk
from musegen.core.augment import Augmenter
from musegen.core.midi import Score, to_score

ROOTS = tk.ROOTS


def transposed_score(score: Score, k: int) -> Score:
    """The music moved by k semitones, written independently of augment.py: every note, and
    the root and bass of every `Root_Quality_Bass` chord marker."""
    notes = score.notes.copy()
    notes[:, 2] += k
    markers = []
    for tick, text in score.markers:
        parts = text.split("_")
        if tk.parse_chord_marker(text) not in (None, 0):
            root = tk.FLATS.get(parts[0], parts[0])
            parts[0] = ROOTS[(ROOTS.index(root) + k) % 12]
            if len(parts) == 3 and tk.FLATS.get(parts[2], parts[2]) in ROOTS:
                parts[2] = ROOTS[(ROOTS.index(tk.FLATS.get(parts[2], parts[2])) + k) % 12]
        markers.append((tick, "_".join(parts)))
    return dataclasses.replace(score, notes=notes, markers=markers)


@pytest.mark.parametrize("rep", ["cp", "remi"])
def test_transposed_tokens_equal_tokens_of_transposed_music(
    rep: str, real_midi_files: list[Path]
) -> None:
    """decode(encode(x)) moved by k, then encoded == encode(x) moved by k (every field).

    The decoded file carries its chords as markers, so moving the music moves the chords too;
    re-analysing moved notes without markers can differ only where two chord readings tie.
    """
    tok = tk.get_tokenizer(rep)
    aug = Augmenter(tok.vocab, transpose_range=5)
    checked = 0
    for path in real_midi_files:
        tokens = tok.encode(path)
        score = to_score(tok.decode(tokens))  # the music as the tokens hold it, chords as markers
        pitches = score.notes[:, 2]
        for k in (-5, -2, 1, 5):
            if pitches.min() + k < tk.PITCH_MIN or pitches.max() + k > tk.PITCH_MAX:
                continue
            moved = aug.transpose(tokens.reshape(len(tokens), -1), k).reshape(tokens.shape)
            want = tok.encode(transposed_score(score, k))
            assert np.array_equal(moved, want), f"{path.name}: k={k}"
            notes = to_score(tok.decode(moved)).notes
            assert np.array_equal(notes, transposed_score(score, k).notes), f"{path.name}: k={k}"
            checked += 1
    assert checked >= 2 * len(real_midi_files)


def test_random_shift_keeps_the_window_on_the_keyboard() -> None:
    """k is drawn among the shifts in range that keep every pitch inside A0..C8 (never -1)."""
    tok = tk.CPTokenizer()
    aug = Augmenter(tok.vocab, transpose_range=5, tempo_shift_range=2)
    high = tok.field_events["pitch"].index("Pitch_105")  # C8 = 108: at most +3
    low = tok.field_events["pitch"].index("Pitch_22")  # A0 = 21: at most -1
    chord = tok.field_events["chord"].index("Chord_C_M")
    tempo = tok.field_events["tempo"].index("Tempo_30")  # the lowest class: t >= 0
    win = np.zeros((4, len(tk.FIELDS)), np.int64)  # Bar, Position (tempo, chord), Note, EOS
    win[0, [tk.TYPE, tk.BAR_BEAT]] = [tk.METRICAL, tk.BAR]
    win[1, [tk.TYPE, tk.BAR_BEAT, tk.TEMPO, tk.CHORD]] = [tk.METRICAL, 2, tempo, chord]
    win[2, [tk.TYPE, tk.PITCH, tk.DURATION, tk.VELOCITY]] = [tk.NOTE, high, 1, 1]
    win[3, tk.TYPE] = tk.EOS
    rng = np.random.default_rng(0)
    shifts, tempos = set(), set()
    for _ in range(300):
        out = aug(win, rng)
        k = out[2, tk.PITCH] - high
        shifts.add(int(k))
        tempos.add(int(out[1, tk.TEMPO] - tempo))
        assert tok.field_events["chord"][out[1, tk.CHORD]] == f"Chord_{ROOTS[k % 12]}_M"
        assert tok.check(out) == 0
    assert shifts == set(range(-5, 4))
    assert tempos == {0, 1, 2}
    win[3, [tk.TYPE, tk.PITCH, tk.DURATION, tk.VELOCITY]] = [tk.NOTE, low, 1, 1]  # and A#0
    assert {int(aug(win, rng)[2, tk.PITCH] - high) for _ in range(100)} == {-1, 0, 1, 2, 3}


def read_score_stub() -> Score:
    notes = np.array([[0, 480, 60, 80], [480, 960, 64, 80]], np.int64)
    return Score(notes=notes)


def test_off_draws_nothing_and_negative_range_is_refused() -> None:
    tok = tk.REMITokenizer()
    aug = Augmenter(tok.vocab, transpose_range=0)
    assert not aug.active
    rng = np.random.default_rng(0)
    win = tok.encode(read_score_stub()).reshape(-1, 1)
    assert np.array_equal(aug(win, rng), win)
    assert rng.bit_generator.state == np.random.default_rng(0).bit_generator.state
    with pytest.raises(ValueError, match="transpose_range"):
        Augmenter(tok.vocab, transpose_range=-1)
