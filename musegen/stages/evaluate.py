"""The `evaluate` stage: objective metrics of a folder of samples against a reference folder.

Both folders are read recursively (every non-hidden file, as `prepare` lists them). A file
that cannot be used is rejected with a `musegen.core.midi` reason code (not_midi, empty_file,
truncated, corrupt, no_notes, drums_only …) and listed in the output, never a crash. Usable
pieces are cropped to `crop_bars` bars (compression and repetition measures depend on
length) and measured with `musegen.core.metrics`.

The JSON written to `out` holds: per-piece metrics of both sets, per-set mean and std,
MGEval overlap area (OA) and KL per feature with their means, the loop thresholds of the
reference and how many samples exceed them, `proxy_score`, and the rejected files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from musegen import paths
from musegen.config import DataParams, ParamsError, StageConfig
from musegen.core import metrics
from musegen.core.midi import MidiError, Score, load_midi, to_score
from musegen.core.sampling import SampleParams
from musegen.files import from_printable, write_atomic, write_headline
from musegen.stages import choice
from musegen.stages.choice import SelectParams, SelectResult, TuneParams
from musegen.stages.prepare import list_files


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """The `evaluate` section of params.yaml (see the comments there)."""

    max_files: int
    seed: int
    crop_bars: int
    loop_percentile: float
    loop_margin: float
    num_samples: int
    out_dir: str

    def __post_init__(self) -> None:
        if self.max_files < 0 or self.crop_bars < 0:
            raise ParamsError(
                "evaluate.max_files and evaluate.crop_bars must be >= 0 (0 = all), found "
                f"{self.max_files} and {self.crop_bars} (fix params.yaml)"
            )
        if not 50 <= self.loop_percentile < 100:
            raise ParamsError(
                f"evaluate.loop_percentile must be in [50, 100), found {self.loop_percentile} "
                "(fix params.yaml; 95 flags the top 5% of the reference)"
            )
        if self.loop_margin < 0:
            raise ParamsError(
                f"evaluate.loop_margin must be >= 0, found {self.loop_margin} (fix params.yaml)"
            )


def read_piece(path: Path, crop_bars: int) -> Score:
    """A usable Score from `path`, cropped to `crop_bars` bars, or MidiError with a reason."""
    score = metrics.crop(to_score(load_midi(path)), crop_bars)
    if not len(score.notes):
        if score.n_drum_notes:
            raise MidiError(path, "drums_only", f"only drum notes ({score.n_drum_notes})")
        raise MidiError(
            path, "no_notes", f"no pitched notes in the first {crop_bars or 'all'} bars"
        )
    return score


def read_set(
    folder: Path, params: EvaluateParams, label: str
) -> tuple[dict[str, Score], list[dict[str, str]]]:
    """Read every file under `folder` (a seeded random `max_files` of them when set).

    Returns:
        ({relative path: Score} in sorted order, [rejected {set, path, reason, detail}]).

    Raises:
        FileNotFoundError: `folder` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {label} folder not found; pass a folder of MIDI files")
    files = list_files(folder)
    if 0 < params.max_files < len(files):
        pick = np.random.default_rng(params.seed).choice(len(files), params.max_files, False)
        files = [files[i] for i in sorted(pick)]
    scores, rejected = {}, []
    for rel in tqdm(files, desc=f"evaluate {label}", unit="file", leave=False):
        try:
            scores[rel] = read_piece(folder / rel, params.crop_bars)
        except MidiError as exc:
            rejected.append({"set": label, "path": rel, "reason": exc.reason, "detail": exc.detail})
        except Exception as exc:  # anything unexpected in a file is reported, as prepare does
            detail = f"{type(exc).__name__}: {exc}"
            rejected.append({"set": label, "path": rel, "reason": "corrupt", "detail": detail})
    return scores, rejected


def _summary(pieces: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and std (ddof 0) of every metric over a set; empty dicts for an empty set."""
    if not pieces:
        return {"mean": {}, "std": {}}
    table = {k: np.array([m[k] for m in pieces.values()]) for k in metrics.PIECE_METRICS}
    return {
        "mean": {k: float(v.mean()) for k, v in table.items()},
        "std": {k: float(v.std()) for k, v in table.items()},
    }


def loop_checks(
    reference: list[dict[str, float]],
    samples: list[dict[str, float]],
    percentile: float,
    margin: float,
) -> dict[str, dict[str, float]]:
    """Per loop measure: the reference's threshold and the share of samples beyond it.

    A high dup_bar_rate or longest_loop_bars is loopy, so the threshold is the reference's
    `percentile` plus `margin` x its median; a low distinct_4gram_ratio or zlib_ratio is
    loopy, so it is the (100 - percentile) one minus `margin` x its median. The margin keeps
    small differences (zlib sizes move in steps of a few bytes) from counting as loops; with
    a median of 0 (no repeats in the reference) any repeat counts. `penalty` = max(0, share
    beyond - share expected by chance). Without reference pieces or samples every penalty is 0.
    """
    out = {}
    expected = 1 - percentile / 100
    for name, sign in metrics.LOOP_MEASURES.items():
        ref = np.array([m[name] for m in reference])
        smp = np.array([m[name] for m in samples])
        if not len(ref) or not len(smp):
            out[name] = {"threshold": 0.0, "share_beyond": 0.0, "penalty": 0.0}
            continue
        threshold = float(np.percentile(ref, percentile if sign > 0 else 100 - percentile))
        threshold += sign * margin * abs(float(np.median(ref)))
        share = float(np.mean(smp > threshold if sign > 0 else smp < threshold))
        out[name] = {
            "threshold": threshold,
            "share_beyond": share,
            "penalty": max(0.0, share - expected),
        }
    return out


def order_checks(
    reference: list[dict[str, float]], samples: list[dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Per order measure (`metrics.ORDER_METRICS`, each about 0 for music in random order):
    the share of the reference's mean that the samples' mean keeps, clipped to [0, 1].

    A measure the reference shows no order on (mean <= 0.05) cannot judge: it scores 1.
    Without reference pieces or samples every score is 0.
    """
    out = {}
    for name in metrics.ORDER_METRICS:
        ref = np.array([m[name] for m in reference])
        smp = np.array([m[name] for m in samples])
        if not len(ref) or not len(smp):
            out[name] = {"reference": 0.0, "samples": 0.0, "score": 0.0}
            continue
        kept = smp.mean() / ref.mean() if ref.mean() > 0.05 else 1.0
        out[name] = {"reference": float(ref.mean()), "samples": float(smp.mean())}
        out[name]["score"] = float(np.clip(kept, 0.0, 1.0))
    return out


def proxy_score(result: dict[str, Any]) -> float:
    """The automatic listening proxy of an `evaluate` result (higher is better, <= 1).

    Half the mean MGEval overlap area over the features (how close the samples' histograms
    and statistics are to the reference's, in [0, 1]), half the order score (`order_checks`:
    how much of the reference's order the samples keep: voices that move smoothly from onset
    to onset and across bar lines, compared with the piece's own pitches or bars shuffled,
    and long notes on the strong beats), minus the mean
    loop penalty (`loop_checks`: the share of samples beyond the reference's loop threshold
    on each loop measure, less the share expected by chance). Statistics alone are blind to
    order: bars shuffled scored as real music (0.924 vs 0.922, issue 9); the order half tells
    them apart (`ladder`). No source shows the proxy predicts listening scores: check it
    against ratings (Spearman rho).
    """
    penalty = np.mean([v["penalty"] for v in result["loops"].values()])
    return float((result["mean_oa"] + result["order_score"]) / 2 - penalty)


def score_set(
    samples: list[Score],
    ref_features: dict[str, np.ndarray],
    ref_metrics: list[dict[str, float]],
    params: EvaluateParams,
) -> dict[str, Any]:
    """The proxy of `samples` against a reference (its `metrics.set_features` and metrics).

    Returns:
        {"pieces" (piece_metrics per sample), "mgeval", "mean_oa", "mean_kl", "order",
        "order_score", "loops", "proxy_score"}.
    """
    pieces = [metrics.piece_metrics(s, params.seed) for s in samples]
    mg = metrics.mgeval(ref_features, metrics.set_features(list(samples), pieces))
    result: dict[str, Any] = {"pieces": pieces, "mgeval": mg}
    result["mean_oa"] = float(np.mean([v["oa"] for v in mg.values()]))
    result["mean_kl"] = float(np.mean([v["kl"] for v in mg.values()]))
    result["order"] = order_checks(ref_metrics, pieces)
    result["order_score"] = float(np.mean([v["score"] for v in result["order"].values()]))
    result["loops"] = loop_checks(ref_metrics, pieces, params.loop_percentile, params.loop_margin)
    result["proxy_score"] = proxy_score(result)
    return result


#: the proxy's sanity ladder, best first: the pieces, then the same pieces with their bars in
#: a random order, with their pitches permuted among the notes, and uniform random notes
LADDER = ("real", "bars_shuffled", "pitches_shuffled", "random")


def perturb(score: Score, kind: str, rng: np.random.Generator) -> Score:
    """`score` with its order destroyed one way (a rung of LADDER); "real" returns it as is."""
    notes = score.notes.copy()
    if kind == "real" or not len(notes):
        return score
    bar = (notes[:, 0] + metrics.STEP // 2) // metrics.BAR  # the bar of each rounded onset
    if kind == "bars_shuffled":
        moved = (rng.permutation(int(bar.max()) + 1)[bar] - bar) * metrics.BAR
        notes[:, :2] += moved[:, None]
    elif kind == "pitches_shuffled":
        notes[:, 2] = rng.permutation(notes[:, 2])
    elif kind == "random":
        cells = (int(bar.max()) + 1) * metrics.Q
        notes[:, 0] = rng.integers(0, cells, len(notes)) * metrics.STEP
        notes[:, 1] = notes[:, 0] + rng.integers(1, 9, len(notes)) * metrics.STEP
        notes[:, 2] = rng.integers(21, 109, len(notes))
    else:
        raise ValueError(f"perturb: unknown kind {kind!r} (expected one of {LADDER})")
    return dataclasses.replace(score, notes=notes[np.lexsort((notes[:, 2], notes[:, 0]))])


def ladder(
    pieces: list[Score],
    ref_features: dict[str, np.ndarray],
    ref_metrics: list[dict[str, float]],
    params: EvaluateParams,
) -> dict[str, dict[str, float]]:
    """The proxy of `pieces` and of their perturbations (LADDER) against a reference.

    A proxy that hears music scores them in LADDER's order. Each rung: `proxy_score` of the
    set, and the mean and standard deviation over pieces of each piece's own proxy (a set of
    one): the spread across pieces.
    """
    rng = np.random.default_rng(params.seed)
    out = {}
    for kind in LADDER:
        changed = [perturb(s, kind, rng) for s in pieces]
        each = [score_set([s], ref_features, ref_metrics, params)["proxy_score"] for s in changed]
        whole = score_set(changed, ref_features, ref_metrics, params)["proxy_score"]
        out[kind] = {"proxy_score": whole, "mean": float(np.mean(each)), "sd": float(np.std(each))}
    return out


def evaluate(samples: Path, reference: Path, out: Path, params: EvaluateParams) -> dict[str, Any]:
    """Measure the MIDI under `samples` against `reference`; write the result JSON to `out`.

    Args:
        samples: folder of generated MIDI (read recursively).
        reference: folder of training or held-out MIDI.
        out: the JSON file to write (parents created).
        params: the `evaluate` section.

    Returns:
        The result written to `out`: params, per set {pieces, mean, std, n_ok}, mgeval
        {feature: {oa, kl, note}}, mean_oa, mean_kl, loops, proxy_score, rejected.

    Raises:
        FileNotFoundError: a folder is missing (bad files inside one are rejected, not raised).
    """
    result: dict[str, Any] = {"params": dataclasses.asdict(params), "rejected": []}
    scores = {}
    for label, folder in (("samples", samples), ("reference", reference)):
        scores[label], rejected = read_set(folder, params, label)
        result[label] = {"folder": str(folder), "n_ok": len(scores[label])}
        result[label]["n_rejected"] = len(rejected)
        result["rejected"] += rejected
    ref = list(scores["reference"].values())
    ref_metrics = [metrics.piece_metrics(s, params.seed) for s in ref]
    ref_features = metrics.set_features(ref, ref_metrics)
    scored = score_set(list(scores["samples"].values()), ref_features, ref_metrics, params)
    for label, values in (("samples", scored.pop("pieces")), ("reference", ref_metrics)):
        pieces = dict(zip(scores[label], values, strict=True))
        result[label] |= _summary(pieces) | {"pieces": pieces}
    result |= scored
    # the samples against their own perturbations: does their order count (and does the proxy
    # hear it)? On real pieces this is the proxy's sanity check: real > ... > random
    generated = list(scores["samples"].values())
    result["ladder"] = ladder(generated, ref_features, ref_metrics, params) if generated else {}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # atomic: DVC never sees a half-written metrics file
    write_atomic(out, json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result


def evaluate_model(
    checkpoint: Path,
    sample: Any,
    manifest: Path,
    raw_dir: Path,
    params: EvaluateParams,
) -> dict[str, Any]:
    """The DVC stage: generated music from `checkpoint` against the held-out test split.

    The only stage that reads the test split; `checkpoint` is the STEP `musegen select` chose
    (on the valid split) and `sample` its tuned sampling. Generates `num_samples` pieces of
    `crop_bars` bars (seeds seed .. seed + n - 1) with `sample` into out_dir/samples/, copies
    the manifest's test-split files to out_dir/reference/, runs `evaluate`, and writes the
    full result to out_dir/details.json and the headline numbers (mean OA/KL, proxy score,
    per-feature OA, loop flags, the manifest rows read) to out_dir/metrics.json.

    Returns:
        The headline metrics.
    """
    import shutil

    import pandas as pd

    from musegen.core.generate import GenerateParams, load_model, write_samples

    out = Path(params.out_dir)
    samples, reference = out / "samples", out / "reference"
    for folder in (samples, reference):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    rows = pd.read_csv(manifest, keep_default_na=False)
    held_out = rows[(rows.status == "ok") & (rows.split == "test")]
    if held_out.empty:
        raise FileNotFoundError(f"{manifest}: no ok test-split file to compare against")
    for rel in held_out.path:
        shutil.copy(Path(raw_dir) / from_printable(rel), reference / rel.replace("/", "__"))
    loaded = load_model(checkpoint)
    # prompt_bars is unused without a prompt, but GenerateParams checks it is >= 1
    caps = GenerateParams(
        checkpoint=str(checkpoint), num_samples=params.num_samples, max_bars=params.crop_bars,
        min_bars=params.crop_bars, max_minutes=0, max_words=64 * params.crop_bars, prompt_bars=1,
        out_dir=str(samples), device="auto",
    )  # fmt: skip
    write_samples(loaded, sample, caps, samples, seed=params.seed, progress=False)
    result = evaluate(samples, reference, out / "details.json", params)
    headline = {
        "checkpoint_step": loaded.step,
        "n_samples": result["samples"]["n_ok"],
        "n_reference": result["reference"]["n_ok"],
        "proxy_score": result["proxy_score"],
        "mean_oa": result["mean_oa"],
        "order_score": result["order_score"],
        "mean_kl": result["mean_kl"],
        "oa": {k: v["oa"] for k, v in result["mgeval"].items()},
        "ladder": {k: v["proxy_score"] for k, v in result["ladder"].items()},
        "split": "test",
        "pieces": sorted(held_out.path),  # the manifest rows read
    }
    paths.metrics(out).write_text(json.dumps(headline, indent=2) + "\n")
    write_headline(paths.metrics(out), test_score=result["proxy_score"])
    return headline


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(StageConfig):
    """What the evaluate stage reads: its section, the test split's files, and the STEP and
    sampling select and tune chose (`choice`)."""

    evaluate: EvaluateParams
    data: DataParams
    sample: SampleParams
    tune: TuneParams
    select: SelectParams


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    """The headline of evaluate.out_dir/metrics.json: the STEP, the set sizes, the scores."""

    metrics: Path
    checkpoint_step: int
    n_samples: int
    n_reference: int
    proxy_score: float
    mean_oa: float
    order_score: float

    @classmethod
    def read(cls, params: EvaluateConfig, root: Path | str = ".") -> EvaluateResult:
        """evaluate.out_dir/metrics.json (in the repository at `root`)."""
        path = paths.metrics(Path(root, params.evaluate.out_dir))
        m = json.loads(path.read_text())
        names = [f.name for f in dataclasses.fields(cls)][1:]
        return cls(path, **{n: m[n] for n in names})


def compare(
    params: EvaluateConfig, samples: Path, reference: Path, out: Path | None = None
) -> dict[str, Any]:
    """Any two folders, not the DVC stage: `evaluate` with its result at `out` (default
    evaluate.out_dir/metrics.json)."""
    out = out or paths.metrics(params.evaluate.out_dir)
    return evaluate(samples, reference, out, params.evaluate)


def run(params: EvaluateConfig) -> EvaluateResult:
    """The evaluate stage: the selected STEP with its tuned sampling against the test split
    (`evaluate_model`)."""
    data, checkpoint = params.data, SelectResult.read(params).checkpoint
    sample = choice.sampling(params)
    evaluate_model(checkpoint, sample, data.manifest, data.raw_dir, params.evaluate)
    return EvaluateResult.read(params)
