"""The `select` stage: which STEP the DAG tunes, evaluates and registers.

It reads the sweep (every kept STEP continuing the same valid-split prompts with the base
sampling: `sweep_score` is the listening proxy, `valid_loss` the training loss at that STEP)
and people's ratings of the sweep's clips (`musegen ratings add`), and picks one STEP by
`select.by`:

- ``ratings``: people decide once they have said enough about the current sweep's clips.
  Pairwise choices first: with at least `select.min_ratings` choices, the STEP with the
  highest Bradley-Terry strength (`ratings.bradley_terry`, fitted over every column, the
  real anchor included). Else scores: with at least `select.min_ratings` scores of STEP
  clips, the highest mean score. Ties go to the proxy. With fewer of both, the proxy
  decides and the report says so.
- ``proxy``: the highest sweep score. ``valid_loss``: the lowest valid loss.
- ``step``: `select.step`, which must have a checkpoint.

A person's choice beats the rule: `musegen select --step N` (or the answer to the served
Prefect pipeline's pause) writes `<select.ratings_dir>/decision.json` with the STEP and its
clip hashes in the current sweep; select honours it while those clips are the sweep's (a
retrained model makes new clips, and the rule decides again). The file sits in the select
stage's DVC dependency, so `dvc repro` records the decision and never asks anyone.

Writes `select.report` (reports/select/choice.json): the STEP, its checkpoint, what decided
and why, and one row per swept STEP (valid loss, proxy score, ratings n / mean / 95% CI) —
the table a person sees when the served Prefect pipeline pauses to ask (flows/pipeline.py).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from musegen import paths
from musegen.config import StageConfig
from musegen.core import ratings as rt
from musegen.files import write_headline
from musegen.stages.choice import SelectParams, SelectResult
from musegen.stages.sweep import SweepParams
from musegen.stages.train import TrainParams

DECISION = "decision.json"


def candidates(sweep_metrics: dict[str, Any], table: Any) -> dict[int, dict[str, Any]]:
    """STEP -> {valid_loss, proxy, ratings: {n, mean, ci95}, pairs: {n, wins, strength, se}}
    for every swept STEP (ratings: scores; pairs: pairwise choices)."""
    stats, pairs = rt.summary(table, sweep_metrics), rt.pair_summary(table, sweep_metrics)
    return {
        int(col["step"]): {
            "valid_loss": col.get("valid_loss"),
            "proxy": col["sweep_score"],
            "ratings": stats[key],
            "pairs": pairs[key],
        }
        for key, col in sweep_metrics["columns"].items()
        if col.get("step") is not None
    }


def decide(
    params: SelectParams, table: dict[int, dict[str, Any]], num_pairs: int = 0
) -> tuple[int, str, str]:
    """(STEP, what decided: pairs | ratings | proxy | valid_loss | step, a one-line reason).

    `num_pairs`: the current sweep's pairwise choices (those with the real anchor count too).
    """
    by_proxy = max(table, key=lambda s: table[s]["proxy"])
    if params.by == "step":
        return params.step, "step", f"select.step = {params.step}"
    if params.by == "valid_loss":
        losses = {s: v["valid_loss"] for s, v in table.items() if v["valid_loss"] is not None}
        if not losses:
            raise ValueError("no swept STEP has a valid loss; set select.by to proxy or step")
        best = min(losses, key=losses.get)
        return best, "valid_loss", f"lowest valid loss {losses[best]:.4f}"
    if params.by == "ratings":
        if num_pairs >= params.min_ratings:
            best = max(table, key=lambda s: (table[s]["pairs"]["strength"], table[s]["proxy"]))
            r = table[best]["pairs"]
            return (
                best,
                "pairs",
                (
                    f"highest Bradley-Terry strength {r['strength']:+.2f} (se {r['se']:.2f}; won "
                    f"{r['wins']} of {r['n']} choices; {num_pairs} choices in all)"
                ),
            )
        n = sum(v["ratings"]["n"] for v in table.values())
        if n >= params.min_ratings:
            rated = [s for s, v in table.items() if v["ratings"]["n"]]
            best = max(rated, key=lambda s: (table[s]["ratings"]["mean"], table[s]["proxy"]))
            r = table[best]["ratings"]
            return best, "ratings", f"highest mean rating {r['mean']:.2f} of {r['n']} ({n} in all)"
        reason = (
            f"{n} of select.min_ratings = {params.min_ratings} ratings and {num_pairs} "
            "pairwise choices: the proxy decides; "
        )
    else:
        reason = ""
    return by_proxy, "proxy", reason + f"highest sweep score {table[by_proxy]['proxy']:.4f}"


def record_decision(ratings_dir: Path, sweep_metrics: Path, step: int, who: str) -> Path:
    """Write a person's choice of STEP (with its clips in the current sweep) for `select`.

    Raises:
        ValueError: the STEP is not in the sweep.
    """
    sweep = json.loads(Path(sweep_metrics).read_text())
    col = sweep["columns"].get(f"step_{step}")
    if col is None:
        swept = sorted(c["step"] for c in sweep["columns"].values() if c.get("step") is not None)
        raise ValueError(f"{sweep_metrics}: STEP {step} was not swept (swept: {swept})")
    path = Path(ratings_dir) / DECISION
    path.parent.mkdir(parents=True, exist_ok=True)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    path.write_text(json.dumps({"step": step, "clips": col["clips"], "who": who, "time": when}))
    return path


def _decision(ratings_dir: Path, sweep: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded person's choice while it is about the current sweep's clips, else None."""
    path = Path(ratings_dir) / DECISION
    if not path.is_file():
        return None
    decision = json.loads(path.read_text())
    col = sweep["columns"].get(f"step_{decision.get('step')}", {})
    return decision if col.get("clips") == decision.get("clips") else None


def select(
    params: SelectParams, sweep_metrics: Path, ckpt_dir: Path, *, step: int | None = None
) -> dict[str, Any]:
    """Pick the STEP and write `params.report`; with `step`, first record it as a person's choice.

    Args:
        params: the `select` section.
        sweep_metrics: the sweep's metrics.json.
        ckpt_dir: train.out_dir/checkpoints (the chosen STEP must have step_<STEP>.pt).
        step: a STEP a person chose (`record_decision`); None = the recorded choice if it is
            current, else `params.by`.

    Returns:
        The report: step, checkpoint, by, decided_by, reason, num_ratings, num_pairs, steps
            (each STEP's numbers, `candidates`), sweep_page.

    Raises:
        FileNotFoundError: no sweep metrics, or no checkpoint for the STEP.
    """
    if not Path(sweep_metrics).is_file():
        raise FileNotFoundError(f"{sweep_metrics}: no sweep results; run `musegen sweep` first")
    if step is not None:
        record_decision(Path(params.ratings_dir), sweep_metrics, step, "musegen select --step")
    sweep = json.loads(Path(sweep_metrics).read_text())
    ratings = rt.read_table(Path(params.ratings_dir))
    table = candidates(sweep, ratings)
    num_pairs = rt.count_pairs(ratings, sweep)
    decision = _decision(Path(params.ratings_dir), sweep)
    if decision is None:
        chosen, decided_by, reason = decide(params, table, num_pairs)
    else:
        chosen, decided_by = int(decision["step"]), "person"
        reason = f"chosen by a person ({decision['who']}, {decision['time']})"
    path = paths.step_checkpoint(ckpt_dir, chosen)
    if not path.is_file():
        found = list(paths.step_checkpoints(ckpt_dir))
        raise FileNotFoundError(f"{path}: no checkpoint for STEP {chosen} (found {found})")
    report = {
        "step": chosen,
        "checkpoint": str(path),
        "by": params.by,
        "decided_by": decided_by,
        "reason": reason,
        "num_ratings": sum(v["ratings"]["n"] for v in table.values()),
        "num_pairs": num_pairs,
        "steps": {str(s): v for s, v in sorted(table.items())},
        "sweep_page": sweep.get("page"),
    }
    out = Path(params.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    write_headline(out, step=chosen)
    return report


@dataclasses.dataclass(frozen=True)
class SelectConfig(StageConfig):
    """What the select stage reads: its section, the sweep's metrics, the checkpoints."""

    select: SelectParams
    sweep: SweepParams
    train: TrainParams


def run(params: SelectConfig, step: int | None = None) -> SelectResult:
    """The select stage: pick the STEP (a person's `step` first; see `select`)."""
    ckpt_dir = paths.checkpoints(params.train.out_dir)
    select(params.select, Path(params.sweep.metrics_file), ckpt_dir, step=step)
    return SelectResult.read(params)
