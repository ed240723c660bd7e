"""Per-piece metrics on constructed pieces with known answers, and MGEval set distances.

The three synthetic cases of research/evaluation-and-audio.md section 1 are built here,
deterministically: a varied diatonic melody (16 bars), a 2-bar arpeggio loop played 16 times
(32 bars) and a random piece (random 16ths, chromatic pitches, random lengths).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from musegen.core import metrics
from musegen.core.midi import Score, load_midi, to_score

BAR, EIGHTH = 1920, 240
# Loop bars: C-major and G-major arpeggios, 8 eighths each (pitch classes 3 + 3 + 2 each).
LOOP_A = (60, 64, 67, 72, 76, 79, 84, 88)
LOOP_B = (67, 71, 74, 79, 83, 86, 91, 95)


def score(rows: list[tuple[int, int, int, int]]) -> Score:
    """A Score from [start, end, pitch, velocity] rows, sorted as musegen.core.midi sorts them."""
    notes = np.array(rows, np.int64).reshape(-1, 4)
    return Score(notes=notes[np.lexsort((notes[:, 1], notes[:, 2], notes[:, 0]))])


def eighths(bar: int, pitches: tuple[int, ...] | list[int]) -> list[tuple[int, int, int, int]]:
    """One bar of eighth notes with these pitches."""
    return [
        (bar * BAR + k * EIGHTH, bar * BAR + (k + 1) * EIGHTH, p, 80) for k, p in enumerate(pitches)
    ]


def loop_piece(n_repeats: int = 16) -> Score:
    """The 2-bar loop: A B A B … (2 * n_repeats bars)."""
    return score([r for b in range(2 * n_repeats) for r in eighths(b, LOOP_B if b % 2 else LOOP_A)])


def varied_piece(seed: int = 1, n_bars: int = 16) -> Score:
    """Eighth notes drawn from the C-major scale (G3..C6): rhythm steady, no bar repeats."""
    rng = np.random.default_rng(seed)
    scale = [p for p in range(55, 85) if metrics.MAJOR[p % 12]]
    return score([r for b in range(n_bars) for r in eighths(b, rng.choice(scale, 8).tolist())])


def random_piece(seed: int = 2, n_bars: int = 16) -> Score:
    """8 notes a bar at random 16ths, chromatic pitches 36..96, random lengths of 1-8 16ths."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(n_bars):
        for _ in range(8):
            start = b * BAR + int(rng.integers(16)) * 120
            rows.append(
                (start, start + int(rng.integers(1, 9)) * 120, int(rng.integers(36, 97)), 80)
            )
    return score(rows)


def h(counts: list[int]) -> float:
    """Entropy in bits of a count histogram, written out for expected values."""
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_loop_exact_values():
    m = metrics.piece_metrics(loop_piece())
    assert m["n_bars"] == 32
    assert m["dup_bar_rate"] == pytest.approx(30 / 31)  # bars 2..31 repeat bar i-2
    assert m["longest_loop_bars"] == 32  # run of 30 at lag 2, plus 2
    # 16 distinct (pitch, position) tokens a period: 16 unique 4-grams out of 256 - 3.
    assert m["distinct_4gram_ratio"] == pytest.approx(16 / 253)
    assert m["gs"] == 1.0 and m["scale_consistency"] == 1.0
    assert m["h1"] == pytest.approx(h([3, 3, 2]))  # 1.561, research table 1.56
    # Every 4-bar window holds A A B B: C 6, E 6, G 4 + 6, B 6, D 4 of 32 notes.
    assert m["h4"] == pytest.approx(h([6, 6, 10, 6, 4]))
    assert m["pitch_class_entropy"] == pytest.approx(h([6, 6, 10, 6, 4]))
    assert m["notes_per_bar"] == 8 and m["mean_ioi"] == 0.5 and m["polyphony"] == 1.0
    assert m["zlib_ratio"] < 0.15  # research table 0.09


def test_research_table_ordering():
    v, lp, r = (metrics.piece_metrics(s) for s in (varied_piece(), loop_piece(), random_piece()))
    for m in (v, r):
        assert m["dup_bar_rate"] == 0 and m["longest_loop_bars"] == 0
        assert m["distinct_4gram_ratio"] >= 0.95
    assert lp["zlib_ratio"] < v["zlib_ratio"] < r["zlib_ratio"]  # table: 0.09 < 0.57 < 0.83
    assert lp["distinct_4gram_ratio"] < 0.1
    assert lp["h1"] < v["h1"] < r["h1"]  # table: 1.56 < 2.31 < 2.38
    assert r["gs"] < 0.9 and v["gs"] == lp["gs"] == 1.0  # GS does not detect loops
    assert r["scale_consistency"] < 0.8 and v["scale_consistency"] == 1.0
    assert r["n_pitch_classes"] == 12 and v["n_pitch_classes"] == 7


def test_polyphony_beats_and_ioi_by_hand():
    # C-E-G on beat 1, G4 on beat 2, beat 3 silent, C5 on beat 4.
    s = score([(0, 480, 60, 80), (0, 480, 64, 80), (0, 480, 67, 80), (480, 960, 67, 80)])
    s = score([*s.notes.tolist(), (1440, 1920, 72, 80)])
    m = metrics.piece_metrics(s)
    # 16ths sounding: 3 x 4 steps, 1 x 4, 0 x 4, 1 x 4.
    assert m["polyphony"] == pytest.approx(20 / 12)
    assert m["polyphony_rate"] == pytest.approx(4 / 16)  # more than 2 pitches (muspy default)
    assert metrics.piece_metrics(s, poly_threshold=0)["polyphony_rate"] == pytest.approx(12 / 16)
    assert m["empty_beat_rate"] == pytest.approx(1 / 4)
    assert m["mean_ioi"] == pytest.approx(1.5)  # onsets at beats 0, 1, 3
    assert m["pitch_range"] == 12 and m["n_pitch_classes"] == 3 and m["notes_per_bar"] == 5
    assert m["scale_consistency"] == 1.0 and m["h1"] == pytest.approx(h([2, 2, 1]))


def test_polyphony_matches_a_binary_piano_roll():
    # Random chords with held, overlapping and repeated pitches, against muspy's definition
    # written out on a (steps, 128) boolean roll.
    rng = np.random.default_rng(5)
    start = rng.integers(0, 64, 200) * 120 + rng.integers(-50, 50, 200).clip(0)
    rows = [
        (s, s + int(d), int(p), 80)
        for s, d, p in zip(
            start, rng.integers(1, 2000, 200), rng.integers(58, 66, 200), strict=True
        )
    ]
    roll = np.zeros((200, 128), bool)
    for s, e, p, _ in rows:
        a = (s + 60) // 120
        roll[a : max((e + 60) // 120, a + 1), p] = True
    roll = roll[: max(np.flatnonzero(roll.any(1))) + 1]
    on = roll.sum(1)
    m = metrics.piece_metrics(score(rows))
    assert m["polyphony"] == pytest.approx(on.sum() / np.count_nonzero(on))
    assert m["polyphony_rate"] == pytest.approx(np.mean(on > 2))


def test_ten_hour_note_is_cheap():
    m = metrics.piece_metrics(score([(0, 480 * 72_000, 60, 80), (480, 960, 64, 80)]))
    assert m["polyphony"] == pytest.approx((72_000 * 4 + 4) / (72_000 * 4))
    assert m["empty_beat_rate"] == 0 and m["n_bars"] == 1


def test_grooving_similarity_known_pairs():
    g = np.zeros((3, 16), bool)
    g[:, [0, 4, 8]] = True
    g[1, 12] = True  # bar 1 differs from bars 0 and 2 by one onset; 0 and 2 agree
    assert metrics.grooving_similarity(g) == pytest.approx((15 / 16 + 1 + 15 / 16) / 3)
    many = np.random.default_rng(0).random((60, 16)) < 0.3  # 1770 pairs: capped at 1000
    a, b = metrics.grooving_similarity(many, seed=3), metrics.grooving_similarity(many, seed=3)
    assert a == b and 0.4 < a < 0.8


def test_onsets_round_to_nearest_sixteenth():
    # A note at tick 1910 is played 10 ticks early: it is the downbeat of bar 1.
    m = metrics.piece_metrics(score([(0, 240, 60, 80), (1910, 2100, 60, 80)]))
    assert m["n_bars"] == 2 and m["dup_bar_rate"] == 1.0
    assert m["longest_loop_bars"] == 2  # bar 1 == bar 0: a run of 1 at lag 1, plus 1


@pytest.mark.parametrize(
    "rows",
    [[], [(0, 480, 60, 80)], [(0, 100, 60, 80), (1920 * 40, 1920 * 40 + 60, 61, 80)]],
    ids=["empty", "one-note", "sparse"],
)
def test_degenerate_pieces_are_finite(rows):
    m = metrics.piece_metrics(score(rows))
    assert set(m) == set(metrics.PIECE_METRICS)
    assert all(math.isfinite(v) for v in m.values())
    assert m["dup_bar_rate"] == 0 and m["distinct_4gram_ratio"] == 1.0 and m["gs"] <= 1.0
    if not rows:
        assert m["empty_beat_rate"] == 1.0 and m["zlib_ratio"] == 1.0 and m["h1"] == 0


def test_crop_keeps_first_bars():
    cropped = metrics.crop(loop_piece(), 8)
    m = metrics.piece_metrics(cropped)
    assert m["n_bars"] == 8 and m["longest_loop_bars"] == 8
    assert cropped.notes[:, 1].max() <= 8 * BAR
    assert (
        metrics.crop(loop_piece(), 0) is not None
        and len(metrics.crop(loop_piece(), 0).notes) == 256
    )


def test_real_piece_is_sane():
    from miditoolkit.midi.utils import example_midi_file

    m = metrics.piece_metrics(to_score(load_midi(example_midi_file())))
    assert all(math.isfinite(v) for v in m.values())
    assert 0.9 < m["scale_consistency"] <= 1 and 1.5 < m["h1"] < 3.58  # tonal pop piece
    assert m["dup_bar_rate"] < 0.2 and m["distinct_4gram_ratio"] > 0.8


# ---- MGEval -------------------------------------------------------------------------------


def test_compare_gaussians_known_answer():
    x = norm.ppf(np.linspace(0.0005, 0.9995, 2000))  # deterministic N(0, 1) sample
    oa, kl, note = metrics.compare(x, x + 2.0)
    # Two unit Gaussians 2 apart: OA = 2 Phi(-1) = 0.317, KL = d^2 / 2 = 2 (KDE smoothing
    # widens both by sqrt(1 + h^2), h = 2000^-0.2: OA 0.329, KL 1.91).
    assert oa == pytest.approx(2 * norm.cdf(-1), abs=0.02) and note == ""
    # KL is tail-sensitive: the sample stops at +-3.3 sd, so q's far-left tail is thinner
    # than a Gaussian's and KL comes out a little above 2 (2.18).
    assert 1.8 < kl < 2.4
    same_oa, same_kl, _ = metrics.compare(x, x)
    assert same_oa > 0.99 and same_kl < 1e-6
    # OA is symmetric in its arguments (one shared grid); KL(p||q) is not in general.
    y = np.concatenate([x, x[:500] * 0.5 + 3])
    assert metrics.compare(x, y)[0] == pytest.approx(metrics.compare(y, x)[0], abs=1e-12)


def test_compare_degenerate_cases():
    assert metrics.compare(np.ones(5), np.ones(7)) == (1.0, 0.0, "constant")
    assert metrics.compare(np.ones(5), np.full(7, 3.0)) == (0.0, metrics.KL_DISJOINT, "constant")
    assert metrics.compare(np.array([]), np.ones(3))[2] == "too_few"
    oa, kl, note = metrics.compare(np.zeros(4), np.linspace(-1, 1, 50))
    assert note == "one_constant" and 0 < oa < 1 and math.isfinite(kl)


def _features(pieces: list[Score]) -> dict[str, np.ndarray]:
    return metrics.set_features(pieces, [metrics.piece_metrics(p) for p in pieces])


def test_mgeval_self_shifted_and_small_sets():
    ref = _features([varied_piece(seed) for seed in range(12)])
    same = metrics.mgeval(ref, ref)
    assert np.mean([v["oa"] for v in same.values()]) > 0.85
    assert all(v["kl"] < 0.5 for v in same.values())
    shifted = _features([random_piece(seed) for seed in range(12)])
    far = metrics.mgeval(ref, shifted)
    for name in ("total_pitch_class_histogram", "m_gs", "m_scale_consistency", "pitch_range"):
        assert far[name]["oa"] < same[name]["oa"] - 0.3, name
    one = metrics.mgeval(_features([varied_piece(0)]), ref)
    assert all(v == {"oa": 0.0, "kl": metrics.KL_DISJOINT, "note": "too_few"} for v in one.values())
    # Identical pieces on both sides: every distance is 0, a documented OA of 1.
    clones = _features([loop_piece(4)] * 3)
    assert all(v["oa"] == 1.0 and v["kl"] == 0.0 for v in metrics.mgeval(clones, clones).values())
