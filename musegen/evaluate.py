"""The `evaluate` stage: objective metrics of a folder of samples against a reference folder.

Both folders are read recursively (every non-hidden file, as `prepare` lists them). A file
that cannot be used is rejected with a `musegen.midi` reason code (not_midi, empty_file,
truncated, corrupt, no_notes, drums_only …) and listed in the output, never a crash. Usable
pieces are cropped to `crop_bars` bars (compression and repetition measures depend on
length) and measured with `musegen.metrics`.

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

from musegen import metrics
from musegen.config import ParamsError
from musegen.midi import MidiError, Score, load_midi, to_score
from musegen.prepare import list_files


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


def proxy_score(result: dict[str, Any]) -> float:
    """The automatic listening proxy of an `evaluate` result (higher is better, <= 1).

    Mean MGEval overlap area over the features (how close the samples' statistics are to the
    reference's, in [0, 1]) minus the mean loop penalty (`loop_checks`: the share of samples
    beyond the reference's loop threshold on each loop measure, less the share expected by
    chance). A set beyond the thresholds on every measure loses loop_percentile/100 (0.95).
    No source shows it predicts listening scores: check it against ratings (Spearman rho).
    """
    penalty = np.mean([v["penalty"] for v in result["loops"].values()])
    return float(result["mean_oa"] - penalty)


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
    features, pieces = {}, {}
    for label, folder in (("samples", samples), ("reference", reference)):
        scores, rejected = read_set(folder, params, label)
        pieces[label] = {rel: metrics.piece_metrics(s, params.seed) for rel, s in scores.items()}
        features[label] = metrics.set_features(list(scores.values()), list(pieces[label].values()))
        result[label] = {"folder": str(folder), "n_ok": len(scores), "n_rejected": len(rejected)}
        result[label] |= _summary(pieces[label]) | {"pieces": pieces[label]}
        result["rejected"] += rejected
    result["mgeval"] = metrics.mgeval(features["reference"], features["samples"])
    result["mean_oa"] = float(np.mean([v["oa"] for v in result["mgeval"].values()]))
    result["mean_kl"] = float(np.mean([v["kl"] for v in result["mgeval"].values()]))
    result["loops"] = loop_checks(
        list(pieces["reference"].values()),
        list(pieces["samples"].values()),
        params.loop_percentile,
        params.loop_margin,
    )
    result["proxy_score"] = proxy_score(result)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    tmp.replace(out)  # atomic: DVC never sees a half-written metrics file
    return result


def evaluate_model(
    checkpoint: Path,
    sample: Any,
    manifest: Path,
    raw_dir: Path,
    params: EvaluateParams,
) -> dict[str, Any]:
    """The DVC stage: generated music from `checkpoint` against the held-out test split.

    Generates `num_samples` pieces of `crop_bars` bars (seeds seed .. seed + n - 1) with the
    sampling settings `sample` (the tuned ones when the tune stage wrote them) into
    out_dir/samples/, copies the manifest's test-split files to out_dir/reference/, runs
    `evaluate`, and writes the full result to out_dir/details.json and the headline numbers
    (mean OA/KL, proxy score, per-feature OA, loop flags) to out_dir/metrics.json for
    `dvc metrics show`.

    Returns:
        The headline metrics.
    """
    import shutil

    import pandas as pd

    from musegen.generate import GenerateParams, load_model, write_samples

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
        shutil.copy(Path(raw_dir) / rel, reference / rel.replace("/", "__"))
    loaded = load_model(checkpoint)
    caps = GenerateParams(
        checkpoint=str(checkpoint), num_samples=params.num_samples, max_bars=params.crop_bars,
        min_bars=params.crop_bars, max_minutes=0, max_words=64 * params.crop_bars, prompt_bars=0,
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
        "mean_kl": result["mean_kl"],
        "oa": {k: v["oa"] for k, v in result["mgeval"].items()},
    }
    (out / "metrics.json").write_text(json.dumps(headline, indent=2) + "\n")
    return headline
