"""Sampling rules: nucleus set, temperature limits, per-field settings, masks, loop guard."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from musegen.config import load_section
from musegen.core.sampling import (
    SampleParams,
    forbid_ids,
    loop_guard,
    mask_logits,
    nucleus_mask,
    parse_overrides,
    sample_field,
)

ROOT = Path(__file__).resolve().parents[1]
CP_FIELDS = ("type", "bar_beat", "tempo", "chord", "pitch", "duration", "velocity", "rest")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(**changes: object) -> SampleParams:
    base = load_section(SampleParams, "sample", ROOT / "params.yaml")
    return dataclasses.replace(base, **changes)


# --- params -----------------------------------------------------------------------------


def test_params_yaml_holds_the_official_cp_table() -> None:
    """Defaults are the published CP table (research/music-models.md) and REMI's T=1.2."""
    p = _params()
    assert set(p.temperature) == {*CP_FIELDS, "token"}
    official = {
        "type": (1.0, 0.9),
        "tempo": (1.2, 0.9),
        "chord": (1.0, 0.99),
        "bar_beat": (1.2, 1.0),
        "pitch": (1.0, 0.9),
        "duration": (2.0, 0.9),
        "velocity": (5.0, 1.0),
    }
    for name, settings_ in official.items():
        assert p.field(name) == settings_, name
    assert p.field("token")[0] == 1.2


def test_params_reject_bad_values_and_mismatched_maps() -> None:
    with pytest.raises(ValueError, match=r"top_p\.pitch"):
        _params(top_p={**_params().top_p, "pitch": 1.5})
    with pytest.raises(ValueError, match=r"temperature\.pitch"):
        _params(temperature={**_params().temperature, "pitch": -1.0})
    with pytest.raises(ValueError, match="rest"):
        _params(top_p={k: v for k, v in _params().top_p.items() if k != "rest"})
    with pytest.raises(KeyError, match="'melody'"):
        _params().field("melody")
    with pytest.raises(ValueError, match="melody"):
        _params().require_fields([*CP_FIELDS, "melody"])


def test_overrides_change_only_the_named_field() -> None:
    base = _params()
    new = base.with_overrides(temperature=["pitch=1.3"], top_p=["duration=0.95"])
    assert new.field("pitch") == (1.3, base.top_p["pitch"])
    assert new.field("duration") == (base.temperature["duration"], 0.95)
    unchanged = [f for f in CP_FIELDS if f not in {"pitch", "duration"}]
    assert all(new.field(f) == base.field(f) for f in unchanged)
    assert base.field("pitch")[0] == 1.0  # the original is untouched (frozen)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("melody=1.0", "unknown field 'melody'"),
        ("pitch", "expected FIELD=VALUE"),
        ("pitch=hot", "'hot' is not a number"),
        ("pitch=nan", "finite"),
        ("=1.0", "expected FIELD=VALUE"),
    ],
)
def test_parse_overrides_errors(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_overrides([item], CP_FIELDS, "temperature")
    assert "--temperature" in str(err.value)


def test_parse_overrides_values_and_repeats() -> None:
    assert parse_overrides(["pitch=1.2", " duration=0.95"], CP_FIELDS, "t") == {
        "pitch": 1.2,
        "duration": 0.95,
    }
    with pytest.raises(ValueError, match="twice"):
        parse_overrides(["pitch=1", "pitch=2"], CP_FIELDS, "t")
    # an out-of-range value parses, then the params object rejects it by name
    with pytest.raises(ValueError, match=r"top_p\.pitch"):
        _params().with_overrides(top_p=["pitch=0"])


# --- nucleus ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.01, 0.999),
)
def test_nucleus_is_the_smallest_top_set_with_mass_p(values: list[float], p: float) -> None:
    probs = torch.softmax(torch.tensor([values], dtype=torch.float64), -1)
    keep = nucleus_mask(probs, p)[0]
    kept, dropped = probs[0][keep], probs[0][~keep]
    assert keep.any()  # the top id always survives
    assert kept.sum() >= p - 1e-9  # enough mass
    # minimal: without its least likely member the set falls short of p
    assert kept.sum() - kept.min() < p + 1e-9
    # a top set: nothing dropped is more likely than anything kept
    if dropped.numel():
        assert dropped.max() <= kept.min()


def test_top_p_samples_only_from_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = sample_field(logits.expand(4000, -1), 1.0, 0.75, _gen())
    # mass before id 2 is 0.8 >= 0.75, so the nucleus is {0, 1}, renormalised to 5/8, 3/8
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)
    # the most likely id survives even a tiny p
    assert set(sample_field(logits.expand(100, -1), 1.0, 1e-6, _gen()).tolist()) == {0}


# --- temperature ------------------------------------------------------------------------


def test_temperature_zero_and_near_zero_are_greedy() -> None:
    # distinct integer logits (gap >= 1): at T=0.01 the runner-up has odds e^-100
    logits = torch.stack([torch.randperm(50, generator=_gen(i)) for i in range(64)]).float()
    greedy = logits.argmax(-1)
    assert torch.equal(sample_field(logits, 0.0), greedy)
    assert torch.equal(sample_field(logits, 0.01, 0.9, _gen()), greedy)  # limit T -> 0


def test_temperature_one_matches_softmax_frequencies() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    draws = sample_field(logits.expand(n, -1), 1.0, 1.0, _gen(7))
    observed = torch.bincount(draws, minlength=6).numpy()
    expected = (torch.softmax(logits[0].double(), -1) * n).numpy()
    assert chisquare(observed, expected).pvalue > 1e-3


def test_high_temperature_approaches_uniform() -> None:
    logits = torch.tensor([[8.0, 4.0, 0.0, -4.0]])
    draws = sample_field(logits.expand(20000, -1), 1e4, 1.0, _gen(1))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.02)
    # while T=1 on the same logits is far from uniform
    cold = torch.bincount(sample_field(logits.expand(2000, -1), 1.0, 1.0, _gen(1)), minlength=4)
    assert cold[0] > 0.9 * 2000


def test_no_overflow_at_low_temperature_with_huge_logits() -> None:
    logits = torch.randn(32, 100, generator=_gen(2)) * 1e4
    logits[:, ::3] = float("-inf")
    out = sample_field(logits, 0.01, 0.9, _gen())
    assert torch.equal(out, logits.argmax(-1))  # at this scale T=0.01 is effectively greedy
    # moderate logits at T=0.01: still finite, and never a masked id
    mild = torch.randn(32, 100, generator=_gen(4))
    mild[:, ::3] = float("-inf")
    out = sample_field(mild, 0.01, 1.0, _gen())
    assert (out % 3 != 0).all()


# --- per-field, reproducibility, masks --------------------------------------------------


def test_per_field_settings_reach_the_right_field() -> None:
    """pitch greedy, duration hot: the same logits give one id for pitch and many for duration."""
    p = _params().with_overrides(temperature=["pitch=0", "duration=50"], top_p=["duration=1"])
    logits = torch.randn(1, 20, generator=_gen(5)).expand(500, -1)
    g = _gen(0)
    pitch = sample_field(logits, *p.field("pitch"), g)
    duration = sample_field(logits, *p.field("duration"), g)
    assert set(pitch.tolist()) == {logits[0].argmax().item()}
    assert len(set(duration.tolist())) >= 15


def test_seeded_draws_repeat_and_differ_across_seeds() -> None:
    logits = torch.randn(16, 40, generator=_gen(9))
    a = [sample_field(logits, 1.2, 0.9, g) for g in [_gen(11)] * 5]
    b = [sample_field(logits, 1.2, 0.9, g) for g in [_gen(11)] * 5]
    c = [sample_field(logits, 1.2, 0.9, g) for g in [_gen(12)] * 5]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_masks_are_respected() -> None:
    logits = torch.zeros(3000, 6)
    logits[:, 0] = 10.0  # id 0 would win nearly always
    draws = sample_field(forbid_ids(logits, [0, 4]), 1.0, 1.0, _gen())
    assert set(draws.tolist()) == {1, 2, 3, 5}
    allowed = torch.tensor([False, False, True, False, False, True])
    assert set(sample_field(mask_logits(logits, allowed), 1.0, 1.0, _gen()).tolist()) == {2, 5}
    assert torch.equal(logits[:, 0], torch.full((3000,), 10.0))  # out of place
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        forbid_ids(logits, [6])
    with pytest.raises(ValueError, match="every id is masked"):
        sample_field(mask_logits(logits, torch.zeros(6, dtype=torch.bool)), 1.0)


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample_field(torch.zeros(5), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        sample_field(torch.tensor([[0.0, float("nan")]]), 1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_field(torch.zeros(1, 3), 1.0, 0.0)


# --- loop guard -------------------------------------------------------------------------


def test_loop_guard_bans_the_continuation_of_a_repeated_cycle() -> None:
    cycle = [5, 7, 9]
    history = [1, 2, *cycle * 3]
    assert loop_guard(history, max_period=4, max_repeats=3) == [5]  # 5 would start copy 4
    assert loop_guard(history, max_period=4, max_repeats=4) == []  # only 3 copies so far
    assert loop_guard(history, max_period=2, max_repeats=3) == []  # period 3 not searched
    assert loop_guard(history, max_period=0, max_repeats=3) == []  # off
    # CP words (rows): the banned item is the whole word that continues the loop
    words = torch.tensor([[2, 1], [2, 3]] * 2)
    assert loop_guard(words, max_period=2, max_repeats=2) == [(2, 1)]
    banned_ids = loop_guard([4, 4, 4], max_period=3, max_repeats=3)
    out = sample_field(forbid_ids(torch.zeros(200, 6), banned_ids), 1.0, 1.0, _gen())
    assert 4 not in out.tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-2, 2), min_size=2, max_size=60), st.floats(0.05, 0.95))
def test_nucleus_ties_at_the_edge_keep_the_lowest_ids(values: list[int], p: float) -> None:
    """Many equal probabilities: the nucleus is the prefix of a stable descending sort."""
    probs = torch.softmax(torch.tensor([values], dtype=torch.float32), -1)
    order = torch.sort(probs[0], descending=True, stable=True).indices
    sorted_p = probs[0][order]
    # torch's cumsum, as the sampler's: float64 running sums rounded to float32
    size = int(((sorted_p.cumsum(0) - sorted_p) < p).sum())
    expected = torch.zeros(len(values), dtype=torch.bool)
    expected[order[:size]] = True
    assert torch.equal(nucleus_mask(probs, p)[0], expected)


def _torch_reference(logits: torch.Tensor, t: float, p: float, u: torch.Tensor) -> torch.Tensor:
    """The draw written with torch ops alone (the sampler before it moved to NumPy)."""
    probs = torch.softmax(logits / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(
        -1, order, (sorted_p.cumsum(-1) - sorted_p) < p
    )
    probs = probs.masked_fill(~(keep & (probs > 0)), 0.0)
    cdf = probs.cumsum(dim=-1)
    ids = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(
        max=cdf.size(-1) - 1
    )
    return torch.where(probs.gather(-1, ids) > 0, ids, probs.argmax(-1, keepdim=True))[:, 0]


@pytest.mark.parametrize("t, p", [(1.0, 0.9), (1.2, 1.0), (5.0, 0.5), (0.5, 0.99)])
def test_draws_equal_the_torch_reference(t: float, p: float) -> None:
    """Bit for bit: float32 softmax, float64-accumulated sums, the same inverse-CDF draw."""
    for seed in range(20):
        g = _gen(seed)
        logits = torch.randn(40, 137, generator=g) * 4
        logits[torch.rand(40, 137, generator=g) < 0.3] = float("-inf")
        logits[:, 0] = 1.0  # no row fully masked
        u = torch.rand(40, generator=g)
        assert torch.equal(sample_field(logits, t, p, u=u), _torch_reference(logits, t, p, u))


def test_per_row_settings_equal_one_call_per_row() -> None:
    """A (B,) temperature / top-p tensor draws each row as a scalar call would (same u)."""
    logits = torch.randn(6, 30, generator=_gen(3)) * 3
    logits[2, 5:] = float("-inf")  # a masked row
    temps = torch.tensor([1.0, 0.0, 2.0, 0.5, 1e-6, 1.2])  # greedy rows included
    tops = torch.tensor([0.9, 1.0, 0.5, 1.0, 0.9, 0.95])
    for seed in range(20):
        u = torch.rand(6, generator=_gen(seed))
        rows = sample_field(logits, temps, tops, u=u)
        for r in range(6):
            one = sample_field(logits[r : r + 1], float(temps[r]), float(tops[r]), u=u[r : r + 1])
            assert rows[r] == one[0], (seed, r)
