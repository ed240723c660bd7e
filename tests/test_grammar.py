"""The one grammar: `check`, `decode` and the generation masks read words the same way.

Generation's masks come from the tokenizer's `Grammar` and `check` counts violations with
`GrammarState`; the outputs `generate` makes pass `check` (test_generate), and here the other
direction: every word (CP) or token (REMI) that `encode` writes for a real file is one the
masks allow where it stands, in both draw modes. A mask that forbade a grammatical word would
fail here; one that allowed an ungrammatical word fails test_generate's `check(out) == 0`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_SOURCES

from musegen.core import tokenizer as tk
from musegen.core.tokenizer import BAR, BAR_BEAT, FIELDS, REST, TYPE, GrammarState
from musegen.stages.corpus import midi_name

FILES = [*(midi_name(s) for s in REAL_SOURCES[:4]), "pop1k7__1390.mid"]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("sequential", [False, True], ids=["independent", "sequential"])
def test_cp_masks_allow_every_encoded_word(real_midi_dir: Path, name: str, sequential: bool):
    tok = tk.CPTokenizer()
    grammar, state = tok.grammar, GrammarState()
    words = tok.encode(real_midi_dir / name).astype(np.int64)
    for i, w in enumerate(words):
        where = f"{name} word {i} {w.tolist()}"
        assert grammar.type_mask(state, sequential=sequential, min_bars=0)[w[TYPE]], where
        drawn = np.zeros(len(FIELDS), np.int64)
        drawn[TYPE] = w[TYPE]
        for f in range(1, len(FIELDS)):  # fields in draw order, each given those before it
            mask = grammar.field_mask(f, drawn, state, sequential=sequential, min_bars=0)
            assert mask[w[f]], f"{where}: field {FIELDS[f]} id {w[f]} masked"
            drawn[f] = w[f]
        repaired = drawn.copy()
        grammar.repair(repaired)
        np.testing.assert_array_equal(repaired, w)  # repair leaves a grammatical word as it is
        assert state.apply(w) == 0, where
    assert state.ended


@pytest.mark.parametrize("name", FILES)
def test_remi_masks_allow_every_encoded_token(real_midi_dir: Path, name: str) -> None:
    tok = tk.REMITokenizer()
    grammar, state = tok.grammar, GrammarState()
    tokens = tok.encode(real_midi_dir / name)
    words, starts = tok.to_words(tokens)
    assert tokens[0] == tok.token(BAR_BEAT, BAR) and starts[0] == 0
    for k, (word, start) in enumerate(zip(words[:-1], starts[:-1], strict=True)):
        stop, cur = starts[k + 1], np.zeros(len(FIELDS), np.int64)
        for i in range(start, stop):
            f = int(grammar.field_of[tokens[i]])
            if cur[TYPE]:  # a token that joins the open word
                assert grammar.token_mask(cur, state, min_bars=0)[tokens[i]], f"{name} token {i}"
            else:  # the token that opened it (allowed after the previous word, below)
                cur[TYPE] = tk.OPENS[f]
            cur[f] = grammar.value_of[tokens[i]]
        np.testing.assert_array_equal(cur, word)
        assert grammar.token_mask(cur, state, min_bars=0)[tokens[stop]], f"{name} token {stop}"
        assert state.apply(word) == 0
    assert int(grammar.field_of[tokens[-1]]) == TYPE  # EOS closes the stream


def test_min_bars_masks_eos_and_long_rests() -> None:
    """The caps' rules sit in the grammar too: no EOS before bar min_bars, no rest past it."""
    grammar = tk.CPTokenizer().grammar
    state = GrammarState()
    bar = np.zeros(len(FIELDS), np.int64)
    bar[TYPE], bar[BAR_BEAT] = tk.METRICAL, BAR
    state.apply(bar)  # in bar 0
    assert not grammar.type_mask(state, sequential=False, min_bars=3)[tk.EOS]
    assert grammar.type_mask(state, sequential=False, min_bars=0)[tk.EOS]
    rest = grammar.field_mask(REST, bar, state, sequential=True, min_bars=3)
    assert rest.nonzero()[0].tolist() == [0, 1]  # Rest_1 lands in bar 2, the last one owed
