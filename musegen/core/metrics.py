"""Objective music metrics: per-piece measures on a Score and MGEval set-level distances.

Per piece (`piece_metrics`): MusPy-style statistics (Dong et al. 2020, muspy.metrics), the
MusDr H1/H4 pitch-class entropies and grooving similarity GS (Wu & Yang 2020, used by the CP
and Jazz Transformer papers) and four loop detectors. Sources and formulas are in
research/evaluation-and-audio.md section 1. All positions use the CP grid: 4/4 bars of 1920
ticks, onsets rounded to the nearest 16th (120 ticks), bar b = 16th // 16, position = 16th % 16.

Every value is a finite float. Pieces too small for a measure get the value that means "no
evidence": an empty piece has 0 for counts, entropies and rates, empty_beat_rate 1, GS 1, and
the loop measures say "no repetition" (dup 0, longest 0, distinct-4gram 1, zlib ratio 1).

Per set (`mgeval`): Yang & Lerch (2020) absolute features per piece, intra-set distances of
the reference set, inter-set distances reference x samples, one Gaussian KDE on each evaluated
on ONE common grid; overlap area OA and KL(intra || inter) (see `compare`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import numpy as np
from scipy.stats import gaussian_kde

from musegen.core.midi import BAR_TICKS, TICKS_PER_BEAT, Score

BAR = BAR_TICKS  # 1920 ticks: a 4/4 bar
STEP = TICKS_PER_BEAT // 4  # 120 ticks: a 16th, the CP position grid
Q = BAR // STEP  # 16 positions a bar (GS uses Q = 16 on the CP grid; MusDr uses 64)
GS_MAX_PAIRS = 1000  # MusDr caps the bar pairs of GS at 1000 random ones
DUP_LOOKBACK = 8  # dup_bar_rate: a bar equal to one of the 8 previous is a duplicate
LOOP_LAGS = (1, 2, 4)  # longest_loop_bars: repeats at a lag of 1, 2 or 4 bars
# muspy.metrics.pitch_in_scale_rate masks, rolled by the tonic for the 24 keys.
MAJOR = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], bool)
MINOR = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], bool)
SCALES = np.array([np.roll(m, k) for m in (MAJOR, MINOR) for k in range(12)])  # (24, 12)
#: loop measures and the direction in which they flag a loop (+1: high is loopy).
LOOP_MEASURES = {
    "dup_bar_rate": 1,
    "longest_loop_bars": 1,
    "distinct_4gram_ratio": -1,
    "zlib_ratio": -1,
}


def _grid(notes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bar, position, onset in 16ths) of every note, onsets rounded to the nearest 16th."""
    q = (notes[:, 0] + STEP // 2) // STEP
    return q // Q, q % Q, q


def crop(score: Score, n_bars: int) -> Score:
    """The first `n_bars` bars of `score` (by rounded onset); ends are cut at the crop line.

    Compression and repetition measures depend on length, so sets are compared on equal crops.
    `n_bars` <= 0 returns the score unchanged.
    """
    if n_bars <= 0 or not len(score.notes):
        return score
    bar, _, _ = _grid(score.notes)
    notes = score.notes[bar < n_bars].copy()
    notes[:, 1] = np.minimum(notes[:, 1], n_bars * BAR)
    notes[:, 1] = np.maximum(notes[:, 1], notes[:, 0] + 1)  # a note rounded into the crop
    return replace(score, notes=notes)


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy in bits, -sum p log2 p, of a count histogram (0 for an empty one)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def windowed_pc_entropy(bar: np.ndarray, pitch: np.ndarray, n_bars: int, w: int) -> float:
    """MusDr H_w: mean pitch-class entropy over windows of w bars, stride 1, empty ones skipped.

    A piece shorter than w bars is one window (w = n_bars).
    """
    hist = np.zeros((max(n_bars, 1), 12))  # note-on counts per bar and pitch class
    np.add.at(hist, (bar, pitch % 12), 1)
    w = min(w, len(hist))
    csum = np.vstack([np.zeros(12), np.cumsum(hist, axis=0)])
    windows = csum[w:] - csum[:-w]  # (n_windows, 12)
    values = [entropy(h) for h in windows if h.sum() > 0]
    return float(np.mean(values)) if values else 0.0


def grooving_similarity(onsets: np.ndarray, seed: int = 0) -> float:
    """MusDr GS: mean over bar pairs of 1 - |XOR(onsets_a, onsets_b)| / Q.

    Args:
        onsets: bool (n_bars, Q), True where a note starts at that 16th of that bar.
        seed: picks GS_MAX_PAIRS random pairs when there are more (numpy default_rng).

    Returns:
        GS in [0, 1]; 1.0 for fewer than two bars (nothing to disagree with).
    """
    n = len(onsets)
    if n < 2:
        return 1.0
    a, b = np.triu_indices(n, k=1)  # all pairs a < b (combinations)
    if len(a) > GS_MAX_PAIRS:
        pick = np.random.default_rng(seed).choice(len(a), GS_MAX_PAIRS, replace=False)
        a, b = a[pick], b[pick]
    return float(np.mean(1.0 - (onsets[a] ^ onsets[b]).sum(axis=1) / onsets.shape[1]))


def _bars(bar: np.ndarray, pos: np.ndarray, pitch: np.ndarray, n_bars: int) -> list[frozenset]:
    """bars[i] = the set of (position, pitch) in bar i (the loop detectors' unit)."""
    out: list[set] = [set() for _ in range(n_bars)]
    for b, p, k in zip(bar.tolist(), pos.tolist(), pitch.tolist(), strict=True):
        out[b].add((p, k))
    return [frozenset(s) for s in out]


def dup_bar_rate(bars: list[frozenset]) -> float:
    """Share of bars i >= 1 equal to one of the DUP_LOOKBACK previous bars (empty bars never)."""
    if len(bars) < 2:
        return 0.0
    dup = sum(bool(x) and x in bars[max(0, i - DUP_LOOKBACK) : i] for i, x in enumerate(bars))
    return dup / (len(bars) - 1)


def longest_loop_bars(bars: list[frozenset]) -> int:
    """Longest run of bars i with bars[i] == bars[i - k] (non-empty), plus k, over k in 1, 2, 4.

    A 2-bar pattern played 16 times gives 30 + 2 = 32: the whole piece. 0 without a repeat.
    """
    best = 0
    for k in LOOP_LAGS:
        run = 0
        for i in range(k, len(bars)):
            run = run + 1 if bars[i] and bars[i] == bars[i - k] else 0
            best = max(best, run + k if run else 0)
    return best


def distinct_4gram_ratio(tokens: list[tuple[int, int]]) -> float:
    """Unique / total 4-grams of (pitch, position) tokens in note order; 1.0 below 4 notes."""
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def zlib_ratio(bar: np.ndarray, pos: np.ndarray, notes: np.ndarray) -> float:
    """zlib level-9 compressed size / raw size of a REMI-like byte stream; 1.0 when empty.

    The stream is, per bar, a 0xFF bar byte, then per note its position, pitch and duration
    in 16ths (1..254) as one byte each. Lower means more repetition; compare equal lengths.
    """
    if not len(notes):
        return 1.0
    dur = np.clip((notes[:, 1] - notes[:, 0] + STEP // 2) // STEP, 1, 254)
    order = np.lexsort((notes[:, 2], pos, bar))
    raw = bytearray()
    last = -1
    for i in order.tolist():
        while last < bar[i]:  # one bar byte for every bar, empty ones included
            raw.append(0xFF)
            last += 1
        raw += bytes((int(pos[i]), int(notes[i, 2]), int(dur[i])))
    return len(zlib.compress(bytes(raw), 9)) / len(raw)


ORDER_SHUFFLES = 32  # random reorderings of a piece that its own order is measured against
Z_CLIP = 5.0  # order z-scores are clipped to +/- this (a near-constant null is not infinite)


def _z(observed: float, null: np.ndarray) -> float:
    """How many null standard deviations `observed` (a cost) lies below the null's mean."""
    sd = float(null.std())
    z = (float(null.mean()) - observed) / sd if sd > 1e-9 else 0.0
    return float(np.clip(z, -Z_CLIP, Z_CLIP))


def pitch_order(q: np.ndarray, pitch: np.ndarray, seed: int = 0) -> float:
    """How much more smoothly the piece's voices move than its own pitches shuffled (a z-score;
    about 0 for pitches in random order, 0.0 below 3 onsets).

    The cost of an order is the mean voice-leading step between consecutive onsets: over the
    next onset's pitches, the distance to the nearest pitch of the onset before (semitones).
    The null: ORDER_SHUFFLES random permutations of the pitches over the same rhythm.

    Args:
        q, pitch: per note, sorted by onset (q, in 16ths), as `piece_metrics` holds them.
    """
    starts = np.flatnonzero(np.diff(q, prepend=-1))
    if len(starts) < 3:
        return 0.0
    # every (note b of onset g + 1, note a of onset g) pair, b-major: costs for any pitch order
    edge = np.append(starts, len(q))
    b_idx = np.concatenate(
        [
            np.repeat(np.arange(edge[g + 1], edge[g + 2]), edge[g + 1] - edge[g])
            for g in range(len(starts) - 1)
        ]
    )
    a_idx = np.concatenate(
        [
            np.tile(np.arange(edge[g], edge[g + 1]), edge[g + 2] - edge[g + 1])
            for g in range(len(starts) - 1)
        ]
    )
    first_of_b = np.flatnonzero(np.diff(b_idx, prepend=-1))  # reduceat starts per note b

    def cost(p: np.ndarray) -> np.ndarray:  # p: (K, N) pitch orders -> (K,) mean step
        nearest = np.minimum.reduceat(np.abs(p[:, b_idx] - p[:, a_idx]), first_of_b, axis=1)
        return nearest.mean(1)

    rng = np.random.default_rng(seed)
    null = cost(np.array([rng.permutation(pitch) for _ in range(ORDER_SHUFFLES)]))
    return _z(float(cost(pitch[None])[0]), null)


def bar_order(q: np.ndarray, pitch: np.ndarray, seed: int = 0) -> float:
    """How much more smoothly the piece crosses its bar lines than its own bars in random
    orders (a z-score; about 0 for shuffled or reversed bars, 0.0 below 3 bars with notes).

    The cost of a bar order is the sum over bar lines of the voice-leading step from the last
    onset of one bar to the first onset of the next (as in `pitch_order`). The null:
    ORDER_SHUFFLES random orders of the bars that hold notes.
    """
    bar = q // Q
    bars = np.unique(bar)
    n = len(bars)
    if n < 3:
        return 0.0
    first = [pitch[q == q[bar == b].min()] for b in bars]
    last = [pitch[q == q[bar == b].max()] for b in bars]
    # step[i, j]: from the end of bar i to the start of bar j
    step = np.array([[np.abs(f[:, None] - e).min(1).mean() for f in first] for e in last])
    rng = np.random.default_rng(seed)
    orders = np.array([rng.permutation(n) for _ in range(ORDER_SHUFFLES)])  # (K, n)
    null = step[orders[:, :-1], orders[:, 1:]].sum(1)
    return _z(float(step[np.arange(n - 1), np.arange(1, n)].sum()), null)


def meter(notes: np.ndarray) -> float:
    """Beats 1 and 3 minus beats 2 and 4: the `onset_profile` share of note durations that
    starts on the strong beats, less the weak ones (about 0.2 in real 4/4 music, negative
    shifted by a beat, about 0 shifted by an 8th or with onsets anywhere)."""
    profile = onset_profile(notes)
    return float(profile[[0, 2 * Q // 4]].sum() - profile[[Q // 4, 3 * Q // 4]].sum())


def onset_profile(notes: np.ndarray) -> np.ndarray:
    """Where in the bar sound starts: each 16th position's share of the note durations
    starting there (16 values, sum 1; zeros when empty). Long notes on strong beats make the
    meter; a piece shifted by a beat or an 8th moves its weight to other positions.
    """
    _, pos, _ = _grid(notes)
    weight = np.bincount(pos, weights=notes[:, 1] - notes[:, 0], minlength=Q).astype(float)
    return weight / weight.sum() if weight.sum() > 0 else weight


def _merge(start: np.ndarray, end: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of the intervals [start, end) that share a key (overlapping ones merged)."""
    out_s, out_e = [], []
    order = np.lexsort((start, key))
    last_key, cur_s, cur_e = None, 0, 0
    for k, s, e in zip(
        key[order].tolist(), start[order].tolist(), end[order].tolist(), strict=True
    ):
        if k == last_key and s <= cur_e:
            cur_e = max(cur_e, e)
            continue
        if last_key is not None:
            out_s.append(cur_s)
            out_e.append(cur_e)
        last_key, cur_s, cur_e = k, s, e
    out_s.append(cur_s)
    out_e.append(cur_e)
    return np.array(out_s), np.array(out_e)


def _sounding(notes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pitches sounding, length in 16ths) of each constant stretch of the binary piano roll.

    Same as counting the rows of a (n_steps, 128) roll on the 16th grid from step 0, with a
    note covering [start, end) and at least one step, but in O(N log N) whatever the lengths
    (a 10-hour note costs no more than a short one).
    """
    start = (notes[:, 0] + STEP // 2) // STEP
    end = np.maximum((notes[:, 1] + STEP // 2) // STEP, start + 1)
    s, e = _merge(start, end, notes[:, 2])  # one pitch held twice sounds once (binary roll)
    edges = np.unique(np.concatenate([[0], s, e]))
    delta = np.zeros(len(edges), np.int64)
    np.add.at(delta, np.searchsorted(edges, s), 1)
    np.add.at(delta, np.searchsorted(edges, e), -1)
    return np.cumsum(delta)[:-1], np.diff(edges)


def piece_metrics(score: Score, seed: int = 0, poly_threshold: int = 2) -> dict[str, float]:
    """Every per-piece metric of `score` as a flat dict of finite floats.

    Args:
        score: the piece (notes at 480 ticks per beat); read as 4/4 whatever its meter.
        seed: seeds the GS pair sample (only used past GS_MAX_PAIRS pairs).
        poly_threshold: polyphony_rate counts steps with more than this many pitches
            (muspy's default 2, i.e. three or more).

    Returns:
        h1, h4 (MusDr windowed pitch-class entropy, bits), gs (grooving similarity, Q=16),
        pitch_class_entropy (whole piece, note counts, bits), scale_consistency (max over 24
        keys of the in-scale note share), pitch_range (semitones), n_pitch_classes,
        polyphony (mean pitches over sounding 16ths), polyphony_rate, empty_beat_rate,
        notes_per_bar, mean_ioi (beats between distinct onsets), n_bars, the order measures
        pitch_order, bar_order (z-scores against the piece's own pitches or bars shuffled)
        and meter, and the loop measures dup_bar_rate, longest_loop_bars,
        distinct_4gram_ratio, zlib_ratio.
    """
    notes = score.notes
    n = len(notes)
    if n == 0:
        out = dict.fromkeys(PIECE_METRICS, 0.0)
        out.update(empty_beat_rate=1.0, gs=1.0, distinct_4gram_ratio=1.0, zlib_ratio=1.0)
        return out
    bar, pos, q = _grid(notes)
    order = np.lexsort((notes[:, 2], q))  # note order: onset, then pitch (low to high)
    bar, pos, q, pitch = bar[order], pos[order], q[order], notes[order, 2]
    n_bars = int(bar.max()) + 1
    pc_counts = np.bincount(pitch % 12, minlength=12)

    onsets = np.zeros((n_bars, Q), bool)
    onsets[bar, pos] = True
    count, steps = _sounding(notes)  # pitches on, over stretches of `steps` 16ths
    # Beats with a sounding note, half-open [start, end) (muspy counts a note ending exactly on
    # a beat as sounding in it; we do not). n_beats covers the last note off.
    n_beats = max(1, -(-int(notes[:, 1].max()) // TICKS_PER_BEAT))
    first = notes[:, 0] // TICKS_PER_BEAT
    b_s, b_e = _merge(first, np.maximum(first + 1, -(-notes[:, 1] // TICKS_PER_BEAT)), 0 * first)
    busy_beats = int((b_e - b_s).sum())
    distinct_onsets = np.unique(notes[:, 0])
    bars = _bars(bar, pos, pitch, n_bars)
    in_scale = (SCALES.astype(int) @ pc_counts) / n  # (24,) share of notes in each key

    return {
        "h1": windowed_pc_entropy(bar, pitch, n_bars, 1),
        "h4": windowed_pc_entropy(bar, pitch, n_bars, 4),
        "gs": grooving_similarity(onsets, seed),
        "pitch_class_entropy": entropy(pc_counts),
        "scale_consistency": float(in_scale.max()),
        "pitch_range": float(pitch.max() - pitch.min()),
        "n_pitch_classes": float(np.count_nonzero(pc_counts)),
        "polyphony": float((count * steps).sum() / steps[count > 0].sum()),
        "polyphony_rate": float(steps[count > poly_threshold].sum() / steps.sum()),
        "empty_beat_rate": 1.0 - busy_beats / n_beats,
        "notes_per_bar": n / n_bars,
        "mean_ioi": float(np.diff(distinct_onsets).mean() / TICKS_PER_BEAT)
        if len(distinct_onsets) > 1
        else 0.0,
        "n_bars": float(n_bars),
        "pitch_order": pitch_order(q, pitch, seed),
        "bar_order": bar_order(q, pitch, seed),
        "meter": meter(notes),
        "dup_bar_rate": dup_bar_rate(bars),
        "longest_loop_bars": float(longest_loop_bars(bars)),
        "distinct_4gram_ratio": distinct_4gram_ratio(
            list(zip(pitch.tolist(), pos.tolist(), strict=True))
        ),
        "zlib_ratio": zlib_ratio(bar, pos, notes[order]),
    }


#: per-piece measures of order (bars, beats and pitches in their places): the statistics above
#: stay the same when bars are shuffled, these do not (compared by `evaluate.order_checks`)
ORDER_METRICS = ("pitch_order", "bar_order", "meter")

PIECE_METRICS = (
    "h1",
    "h4",
    "gs",
    "pitch_class_entropy",
    "scale_consistency",
    "pitch_range",
    "n_pitch_classes",
    "polyphony",
    "polyphony_rate",
    "empty_beat_rate",
    "notes_per_bar",
    "mean_ioi",
    "n_bars",
    *ORDER_METRICS,
    *LOOP_MEASURES,
)

# ---- MGEval (Yang & Lerch 2020) -------------------------------------------------------------

# note_length_hist classes in ticks at 480/beat, mgeval's order: whole, half, quarter, 8th,
# 16th, dotted half, dotted quarter, dotted 8th, dotted 16th, half, quarter and 8th triplets.
NOTE_LENGTHS = np.array([1920, 960, 480, 240, 120, 1440, 720, 360, 180, 320, 160, 80])
#: per-piece metrics also compared as set features: the tuner objective's list (research
#: section 1) less pitch range and IOI, which MGEval's pitch_range and avg_ioi already are.
OBJECTIVE_METRICS = (
    "h1",
    "h4",
    "gs",
    "pitch_class_entropy",
    "scale_consistency",
    "polyphony",
    "n_pitch_classes",
    "notes_per_bar",
)


def mgeval_features(score: Score) -> dict[str, np.ndarray]:
    """MGEval's absolute per-piece features (whole-piece ones; bar-level ones are left out).

    Transitions and pitch shifts follow note order (onset, then pitch), a simplification of
    mgeval's pretty_midi transition matrix (which pairs a note with those starting near its
    end). Histograms and the transition matrix are normalised to sum 1 (zeros when empty).
    """
    notes = score.notes[np.lexsort((score.notes[:, 2], score.notes[:, 0]))]
    pitch = notes[:, 2]
    n = len(notes)
    pc = pitch % 12
    trans = np.zeros((12, 12))
    np.add.at(trans, (pc[:-1], pc[1:]), 1)
    lengths = np.zeros(12)
    if n:
        length_class = np.abs((notes[:, 1] - notes[:, 0])[:, None] - NOTE_LENGTHS).argmin(1)
        np.add.at(lengths, length_class, 1)
    onsets = np.unique(notes[:, 0])

    def norm(h: np.ndarray) -> np.ndarray:
        return h / h.sum() if h.sum() else h

    return {
        "total_used_pitch": np.array([len(np.unique(pitch))], float),
        "total_pitch_class_histogram": norm(np.bincount(pc, minlength=12).astype(float)),
        "pitch_class_transition_matrix": norm(trans).ravel(),
        "pitch_range": np.array([np.ptp(pitch) if n else 0], float),
        "avg_pitch_shift": np.array([np.abs(np.diff(pitch)).mean() if n > 1 else 0.0]),
        "total_used_note": np.array([n], float),
        "avg_ioi": np.array([np.diff(onsets).mean() / TICKS_PER_BEAT if len(onsets) > 1 else 0]),
        "note_length_hist": norm(lengths),
    }


def set_features(scores: list[Score], metrics: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """Stack per-piece features into {feature: (n_pieces, dim)}: MGEval ones, the
    `onset_profile` (a rhythm histogram MGEval lacks) and OBJECTIVE_METRICS (prefixed `m_`).

    `metrics` are the pieces' `piece_metrics`, in the order of `scores`.
    """
    per_piece = [mgeval_features(s) for s in scores]
    template = mgeval_features(Score(notes=np.zeros((0, 4), np.int64)))  # names and sizes
    out = {
        k: np.array([f[k] for f in per_piece]).reshape(len(scores), len(v))
        for k, v in template.items()
    }
    for k in OBJECTIVE_METRICS:
        out[f"m_{k}"] = np.array([[m[k]] for m in metrics], float).reshape(len(metrics), 1)
    out["onset_profile"] = np.array([onset_profile(s.notes) for s in scores]).reshape(-1, Q)
    return out


def intra_distances(a: np.ndarray) -> np.ndarray:
    """Euclidean distances between every ordered pair i != j of rows of `a` (n(n-1) values)."""
    d = np.linalg.norm(a[:, None, :] - a[None, :, :], axis=-1)
    return d[~np.eye(len(a), dtype=bool)]


def inter_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between every a_i and b_j (n*m values)."""
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1).ravel()


GRID_POINTS = 1000  # the common evaluation grid of both KDEs
EPS = 1e-10  # density floor inside the KL log
KL_DISJOINT = float(-math.log(EPS))  # KL reported for disjoint point masses (~23.03 nats)


def _gaussian(center: float, bw: float):
    """Density of N(center, bw^2): a constant sample smoothed at a borrowed bandwidth."""

    def density(x: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * ((x - center) / bw) ** 2) / (bw * math.sqrt(2 * math.pi))

    return density


def compare(intra: np.ndarray, inter: np.ndarray) -> tuple[float, float, str]:
    """Overlap area and KL(intra || inter) of two distance samples on ONE common grid.

    Both densities are scipy gaussian_kde fits (Scott's rule) evaluated on GRID_POINTS points
    over the joint min..max padded by three bandwidths (so OA of a set against itself is near
    1, not cut at the range ends). OA = trapezoid integral of min(p, q); KL = trapezoid
    integral of p log(p / q) (nats) with both floored at EPS. (mgeval's own kl_dist evaluates
    the two KDEs on different grids; this does not.)

    Degenerate cases, each with a fixed result and a note:
    - an empty sample: OA 0, KL KL_DISJOINT ("too_few").
    - both samples constant: equal values give OA 1, KL 0; different values OA 0,
      KL_DISJOINT ("constant").
    - one sample constant or of one value (gaussian_kde cannot fit zero variance): it becomes
      a Gaussian with the other sample's bandwidth ("one_constant").

    Returns:
        (oa, kl, note) with note "" in the ordinary case.
    """
    if not len(intra) or not len(inter):
        return 0.0, KL_DISJOINT, "too_few"
    flat_p, flat_q = np.ptp(intra) == 0, np.ptp(inter) == 0
    if flat_p and flat_q:
        same = math.isclose(intra[0], inter[0], rel_tol=1e-9, abs_tol=1e-12)
        return (1.0, 0.0, "constant") if same else (0.0, KL_DISJOINT, "constant")
    fitted = gaussian_kde(inter if flat_p else intra)
    bw = float(np.sqrt(fitted.covariance[0, 0]))  # both share it when one is constant
    if flat_p:
        p, q = _gaussian(float(intra[0]), bw), fitted
    elif flat_q:
        p, q = fitted, _gaussian(float(inter[0]), bw)
    else:
        p, q = fitted, gaussian_kde(inter)
        bw = max(bw, float(np.sqrt(q.covariance[0, 0])))
    x = np.linspace(
        min(intra.min(), inter.min()) - 3 * bw, max(intra.max(), inter.max()) + 3 * bw, GRID_POINTS
    )
    px, qx = p(x), q(x)
    oa = float(np.trapezoid(np.minimum(px, qx), x))
    pf, qf = np.maximum(px, EPS), np.maximum(qx, EPS)
    kl = float(np.trapezoid(pf * np.log(pf / qf), x))
    return min(oa, 1.0), max(kl, 0.0), "one_constant" if flat_p or flat_q else ""


def mgeval(
    reference: dict[str, np.ndarray], samples: dict[str, np.ndarray]
) -> dict[str, dict[str, float | str]]:
    """MGEval per feature: intra-set distances of `reference`, inter-set reference x samples.

    Args:
        reference, samples: `set_features` outputs (same feature names).

    Returns:
        {feature: {"oa", "kl", "note"}}; a reference of fewer than 2 pieces (no intra pair) or
        an empty sample set gives OA 0, KL KL_DISJOINT with note "too_few".
    """
    out: dict[str, dict[str, float | str]] = {}
    for name, ref in reference.items():
        smp = samples[name]
        if len(ref) < 2 or len(smp) < 1:
            oa, kl, note = 0.0, KL_DISJOINT, "too_few"
        else:
            oa, kl, note = compare(intra_distances(ref), inter_distances(ref, smp))
        out[name] = {"oa": oa, "kl": kl, "note": note}
    return out
