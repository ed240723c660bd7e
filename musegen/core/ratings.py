"""People's ratings of sweep clips: the DVC-tracked table `musegen select` reads.

The blind sweep page (`musegen sweep --blind`) exports a JSON file per rater::

    {"format": "musegen-sweep-ratings/1", "page": "...", "blind": true, "rater": "ana",
     "ratings": [{"clip": "<16 hex>", "prompt": 0, "score": 4, "time": "2026-...Z"}, ...]}

`add` checks the whole file before anything is written (a bad file is refused with one line
naming it and the reason; the table is untouched), maps each clip hash to its column
(STEP or the real anchor) and prompt through the sweep's metrics.json, and merges the rows
into `<select.ratings_dir>/ratings.csv`: one row per (rater, clip); the same row again is a
duplicate and ignored, a newer score of the same clip by the same rater replaces the older.

Columns: rater, clip, step (empty for the real anchor), column, prompt (the prompt song's
manifest path), score (1-5), time (ISO 8601, when the button was clicked), page.

Ratings count only for clips of the current sweep (`summary`): a retrained model makes new
clips with new hashes, so ratings of an older model's music stop deciding by themselves.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FORMAT = "musegen-sweep-ratings/1"
TABLE = "ratings.csv"
COLUMNS = ("rater", "clip", "step", "column", "prompt", "score", "time", "page")
SCORES = (1, 2, 3, 4, 5)


class RatingsError(ValueError):
    """A ratings file that cannot be merged; the message names the file and the reason."""


def clip_index(sweep_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """clip hash -> {column, step (None for real), prompt (manifest path)} of a sweep."""
    out = {}
    for key, col in sweep_metrics.get("columns", {}).items():
        for row, clip in enumerate(col.get("clips", [])):
            prompt = sweep_metrics["prompts"][row]
            out[clip] = {"column": key, "step": col.get("step"), "prompt": prompt}
    return out


def read_table(ratings_dir: Path) -> pd.DataFrame:
    """The ratings table (empty with the right columns when there is none yet)."""
    path = Path(ratings_dir) / TABLE
    if not path.is_file():
        return pd.DataFrame(columns=list(COLUMNS))
    table = pd.read_csv(path, dtype={"clip": str, "rater": str, "page": str}, keep_default_na=False)
    return table[list(COLUMNS)]


def _parse(path: Path, index: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of one export file, or RatingsError naming the file and the first problem."""

    def bad(reason: str) -> RatingsError:
        return RatingsError(f"{path}: {reason}")

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise bad("file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f'not a sweep ratings export (expected "format": "{FORMAT}")')
    if data.get("blind") is not True:
        raise bad("not from the blind page; rate on the page of `musegen sweep --blind`")
    rater = data.get("rater")
    if not isinstance(rater, str) or not rater.strip():
        raise bad('no "rater" name; type one on the page and export again')
    ratings = data.get("ratings")
    if not isinstance(ratings, list) or not ratings:
        raise bad('no "ratings" list, or it is empty')
    rows = []
    for i, r in enumerate(ratings):
        if not isinstance(r, dict):
            raise bad(f"rating {i} is not an object")
        clip, score, when = r.get("clip"), r.get("score"), r.get("time")
        if clip not in index:
            raise bad(
                f"rating {i}: clip {clip!r} is not in the current sweep (its metrics.json); "
                "a page from another sweep? rate the current reports/sweep page"
            )
        if isinstance(score, bool) or score not in SCORES:
            raise bad(f"rating {i}: score {score!r}; expected an integer 1-5")
        try:
            datetime.fromisoformat(str(when).replace("Z", "+00:00"))
        except ValueError:
            raise bad(f"rating {i}: time {when!r} is not an ISO 8601 time") from None
        where = index[clip]
        step = "" if where["step"] is None else int(where["step"])
        rows.append(
            {
                "rater": rater.strip(),
                "clip": clip,
                "step": step,
                "column": where["column"],
                "prompt": where["prompt"],
                "score": int(score),
                "time": str(when),
                "page": str(data.get("page", "")),
            }
        )
    return rows


def add(files: list[Path], ratings_dir: Path, sweep_metrics: Path) -> dict[str, int]:
    """Merge rating exports into the table; all files are checked before anything is written.

    Returns:
        {"added": new or changed rows, "duplicates": rows already in the table, "total": rows}.

    Raises:
        RatingsError: a file is unreadable or invalid (the table is not touched).
        FileNotFoundError: no sweep metrics (run the sweep first).
    """
    if not Path(sweep_metrics).is_file():
        raise FileNotFoundError(f"{sweep_metrics}: no sweep results; run `musegen sweep` first")
    index = clip_index(json.loads(Path(sweep_metrics).read_text()))
    new = [row for f in files for row in _parse(Path(f), index)]
    table = read_table(ratings_dir)
    old = {tuple(str(v) for v in row) for row in table.itertuples(index=False)}
    fresh = [r for r in new if tuple(str(r[c]) for c in COLUMNS) not in old]
    merged = pd.concat([table, pd.DataFrame(fresh, columns=list(COLUMNS))], ignore_index=True)
    # one row per (rater, clip): the latest time wins
    merged = merged.sort_values("time", kind="stable").drop_duplicates(
        ["rater", "clip"], keep="last"
    )
    out = Path(ratings_dir) / TABLE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    merged.to_csv(tmp, index=False)
    tmp.replace(out)  # atomic: a crash never leaves half a table
    return {"added": len(fresh), "duplicates": len(new) - len(fresh), "total": len(merged)}


def summary(table: pd.DataFrame, sweep_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per sweep column (step_<STEP>, real): ratings of its current clips, mean and 95% CI.

    Returns:
        {column key: {"n", "mean", "ci95": [low, high]}} (mean None and ci95 None without
        ratings; ci95 None with one rating). The interval is mean +- t(0.975, n-1) * sd/sqrt(n).
    """
    from scipy.stats import t as student

    index = clip_index(sweep_metrics)
    current = table[table["clip"].isin(list(index))]
    columns = current["clip"].map(lambda c: index[c]["column"])
    out = {}
    for key in sweep_metrics.get("columns", {}):
        scores = np.asarray(current["score"][columns == key], float)
        n = len(scores)
        entry: dict[str, Any] = {"n": n, "mean": None, "ci95": None}
        if n:
            entry["mean"] = float(scores.mean())
        if n > 1:
            half = student.ppf(0.975, n - 1) * scores.std(ddof=1) / math.sqrt(n)
            entry["ci95"] = [float(scores.mean() - half), float(scores.mean() + half)]
        out[key] = entry
    return out


def log_to_sweep_runs(stats: dict[str, dict[str, Any]], sweep_metrics: dict[str, Any]) -> int:
    """Log rating_count / rating_mean to each STEP's sweep child run; returns runs updated.

    A run missing from the store (another store, deleted) is skipped with a warning.
    """
    import warnings

    runs = {
        key: col["mlflow_run_id"]
        for key, col in sweep_metrics.get("columns", {}).items()
        if col.get("mlflow_run_id") and key in stats
    }
    if not runs:  # no store touched (or created) for a sweep that logged nothing
        return 0
    import mlflow
    from musegen import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    done = 0
    for key, run_id in runs.items():
        try:
            client.log_metric(run_id, "rating_count", stats[key]["n"])
            if stats[key]["mean"] is not None:
                client.log_metric(run_id, "rating_mean", stats[key]["mean"])
        except mlflow.exceptions.MlflowException as exc:
            warnings.warn(f"sweep run {run_id} ({key}): ratings not logged: {exc}", stacklevel=2)
            continue
        done += 1
    return done
