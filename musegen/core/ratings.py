"""People's ratings of sweep clips: the DVC-tracked table `musegen select` reads.

The blind sweep page (`musegen sweep --blind`) exports a JSON file per rater: scores (1-5 per
clip) and pairwise choices (the rater's best clip of a prompt row beats each other clip of
that row)::

    {"format": "musegen-sweep-ratings/2", "page": "...", "blind": true, "rater": "ana",
     "ratings": [{"clip": "<16 hex>", "prompt": 0, "score": 4, "time": "2026-...Z"}, ...],
     "choices": [{"winner": "<16 hex>", "loser": "<16 hex>", "prompt": 0, "time": "..."}]}

Format 1 (scores only, no "choices") is still read. Either list may be empty, not both.

`add` checks the whole file before anything is written (a bad file is refused with one line
naming it and the reason; the table is untouched), maps each clip hash to its column
(STEP or the real anchor) and prompt through the sweep's metrics.json, and merges the rows
into `<select.ratings_dir>/ratings.csv`. A score is one row per (rater, clip); a choice is
one row per (rater, pair of clips), in either order. The same row again is a duplicate and
ignored; a newer score of the same clip, or a newer choice between the same two clips, by
the same rater replaces the older.

Columns: rater, clip, step (empty for the real anchor), column, prompt (the prompt song's
manifest path), score (1-5; empty for a choice), beats (a choice: the losing clip's hash;
empty for a score), beats_column (its column), time (ISO 8601, when the button was
clicked), page.

Ratings count only for clips of the current sweep (`summary`, `pair_summary`): a retrained
model makes new clips with new hashes, so ratings of an older model's music stop deciding
by themselves.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FORMAT = "musegen-sweep-ratings/2"
FORMATS = ("musegen-sweep-ratings/1", FORMAT)
TABLE = "ratings.csv"
COLUMNS = (
    "rater", "clip", "step", "column", "prompt", "score", "beats", "beats_column", "time", "page"
)  # fmt: skip
SCORES = (1, 2, 3, 4, 5)
#: Bradley-Terry prior: each clip column also wins and loses this many times against a
#: reference of strength 1 (log strength 0), so a column that never lost stays finite
BT_PRIOR = 1.0


class RatingsError(ValueError):
    """A ratings file that cannot be merged; the message names the file and the reason."""


def clip_index(sweep_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """clip hash -> {column, step (None for real), row, prompt (manifest path)} of a sweep."""
    out = {}
    for key, col in sweep_metrics.get("columns", {}).items():
        for row, clip in enumerate(col.get("clips", [])):
            prompt = sweep_metrics["prompts"][row]
            out[clip] = {"column": key, "step": col.get("step"), "row": row, "prompt": prompt}
    return out


def read_table(ratings_dir: Path) -> pd.DataFrame:
    """The ratings table, every cell a string (empty with the right columns when there is
    none yet; a table written before choices existed gets empty beats columns)."""
    path = Path(ratings_dir) / TABLE
    if not path.is_file():
        return pd.DataFrame(columns=list(COLUMNS))
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return table.reindex(columns=list(COLUMNS), fill_value="")


def _parse(path: Path, index: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """The rows of one export file, or RatingsError naming the file and the first problem."""

    def bad(reason: str) -> RatingsError:
        return RatingsError(f"{path}: {reason}")

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise bad("file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") not in FORMATS:
        raise bad(f'not a sweep ratings export (expected "format": "{FORMAT}")')
    if data.get("blind") is not True:
        raise bad("not from the blind page; rate on the page of `musegen sweep --blind`")
    rater = data.get("rater")
    if not isinstance(rater, str) or not rater.strip():
        raise bad('no "rater" name; type one on the page and export again')
    ratings, choices = data.get("ratings", []), data.get("choices", [])
    if not isinstance(ratings, list) or not isinstance(choices, list) or not ratings + choices:
        raise bad('no "ratings" or "choices" list, or both are empty')

    def known(what: str, clip: object) -> dict[str, Any]:
        if not isinstance(clip, str) or clip not in index:
            raise bad(
                f"{what}: clip {clip!r} is not in the current sweep (its metrics.json); "
                "a page from another sweep? rate the current reports/sweep page"
            )
        return index[clip]

    def iso(what: str, when: object) -> str:
        try:
            datetime.fromisoformat(str(when).replace("Z", "+00:00"))
        except ValueError:
            raise bad(f"{what}: time {when!r} is not an ISO 8601 time") from None
        return str(when)

    base = {"rater": rater.strip(), "page": str(data.get("page", ""))}
    rows = []
    for i, r in enumerate(ratings):
        if not isinstance(r, dict):
            raise bad(f"rating {i} is not an object")
        where = known(f"rating {i}", r.get("clip"))
        score = r.get("score")
        if isinstance(score, bool) or score not in SCORES:
            raise bad(f"rating {i}: score {score!r}; expected an integer 1-5")
        rows.append(
            base
            | _where(r["clip"], where)
            | {"score": str(int(score)), "beats": "", "beats_column": ""}
            | {"time": iso(f"rating {i}", r.get("time"))}
        )
    for i, c in enumerate(choices):
        if not isinstance(c, dict):
            raise bad(f"choice {i} is not an object")
        win, lose = known(f"choice {i}", c.get("winner")), known(f"choice {i}", c.get("loser"))
        if c["winner"] == c["loser"]:
            raise bad(f"choice {i}: clip {c['winner']!r} cannot beat itself")
        if win["row"] != lose["row"]:
            raise bad(
                f"choice {i}: clips of different prompts ({win['prompt']} vs "
                f"{lose['prompt']}); a choice compares two clips of one prompt row"
            )
        rows.append(
            base
            | _where(c["winner"], win)
            | {"score": "", "beats": c["loser"], "beats_column": lose["column"]}
            | {"time": iso(f"choice {i}", c.get("time"))}
        )
    return rows


def _where(clip: str, where: dict[str, Any]) -> dict[str, str]:
    step = "" if where["step"] is None else str(int(where["step"]))
    return {"clip": clip, "step": step, "column": where["column"], "prompt": where["prompt"]}


def _key(table: pd.DataFrame) -> pd.DataFrame:
    """What each row is about: (rater, clip) for a score (beats empty), (rater, the pair in
    either order) for a choice; a newer row with the same key replaces the older."""
    pair = table[["clip", "beats"]]
    return pd.DataFrame({"rater": table["rater"], "a": pair.min(axis=1), "b": pair.max(axis=1)})


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
    old = {tuple(row) for row in table.itertuples(index=False)}
    fresh = [r for r in new if tuple(r[c] for c in COLUMNS) not in old]
    merged = pd.concat([table, pd.DataFrame(fresh, columns=list(COLUMNS))], ignore_index=True)
    # one row per key: the latest time wins
    merged = merged.sort_values("time", kind="stable")
    merged = merged[~_key(merged).duplicated(keep="last")]
    out = Path(ratings_dir) / TABLE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    merged.to_csv(tmp, index=False)
    tmp.replace(out)  # atomic: a crash never leaves half a table
    return {"added": len(fresh), "duplicates": len(new) - len(fresh), "total": len(merged)}


def _current(table: pd.DataFrame, index: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The rows about the current sweep's clips (a choice: both clips)."""
    keep = table["clip"].isin(list(index)) & (
        (table["beats"] == "") | table["beats"].isin(list(index))
    )
    return table[keep]


def count_pairs(table: pd.DataFrame, sweep_metrics: dict[str, Any]) -> int:
    """The pairwise choices between the current sweep's clips."""
    current = _current(table, clip_index(sweep_metrics))
    return int((current["beats"] != "").sum())


def summary(table: pd.DataFrame, sweep_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per sweep column (step_<STEP>, real): scores of its current clips, mean and 95% CI.

    Returns:
        {column key: {"n", "mean", "ci95": [low, high]}} (mean None and ci95 None without
        scores; ci95 None with one score). The interval is mean +- t(0.975, n-1) * sd/sqrt(n).
    """
    from scipy.stats import t as student

    index = clip_index(sweep_metrics)
    current = _current(table, index)
    current = current[(current["beats"] == "") & (current["score"] != "")]
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


def bradley_terry(
    wins: np.ndarray, prior: float = BT_PRIOR, tol: float = 1e-10, max_iter: int = 10_000
) -> tuple[np.ndarray, np.ndarray]:
    """Bradley-Terry strengths from a win matrix, by Hunter's (2004) MM iteration.

    P(i beats j) = w_i / (w_i + w_j). Each player also plays `prior` virtual wins and
    `prior` virtual losses against a reference of strength 1, a prior that keeps every
    strength finite (a player that never lost, or never played) and pins the scale.

    Args:
        wins: (n, n), wins[i, j] = times i beat j.
        prior: virtual games won and lost against the reference (> 0).

    Returns:
        (log strengths minus their mean, their standard errors from the observed
        information), each (n,): a player at +1 beats one at 0 with odds e : 1.
    """
    wins = np.asarray(wins, float)
    games = wins + wins.T
    won = wins.sum(axis=1) + prior
    w = np.ones(len(wins))
    for _ in range(max_iter):
        denom = (games / (w[:, None] + w[None, :])).sum(axis=1) + 2 * prior / (w + 1)
        new = won / denom
        done = np.max(np.abs(np.log(new) - np.log(w))) < tol
        w = new
        if done:
            break
    p = w[:, None] / (w[:, None] + w[None, :])
    info = -games * p * p.T  # off-diagonal: -n_ij p_ij p_ji
    np.fill_diagonal(info, 0.0)
    info[np.diag_indices_from(info)] = -info.sum(axis=1) + 2 * prior * w / (w + 1) ** 2
    center = np.eye(len(w)) - 1.0 / len(w)  # strengths relative to their mean
    cov = center @ np.linalg.inv(info) @ center.T
    return center @ np.log(w), np.sqrt(np.clip(np.diag(cov), 0.0, None))


def pair_summary(table: pd.DataFrame, sweep_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per sweep column: its current pairwise choices and Bradley-Terry strength.

    Returns:
        {column key: {"n": choices it was in, "wins", "strength": Bradley-Terry log
        strength relative to the columns' mean (higher is preferred), "se"}}; strength
        and se are None while no current choice exists.
    """
    index = clip_index(sweep_metrics)
    keys = list(sweep_metrics.get("columns", {}))
    current = _current(table, index)
    current = current[current["beats"] != ""]
    pos = {k: i for i, k in enumerate(keys)}
    wins = np.zeros((len(keys), len(keys)))
    for win, lose in zip(current["clip"], current["beats"], strict=True):
        wins[pos[index[win]["column"]], pos[index[lose]["column"]]] += 1
    fit = bradley_terry(wins) if len(current) else None
    out = {}
    for k, i in pos.items():
        entry: dict[str, Any] = {
            "n": int(wins[i].sum() + wins[:, i].sum()),
            "wins": int(wins[i].sum()),
        }
        entry["strength"] = None if fit is None else float(fit[0][i])
        entry["se"] = None if fit is None else float(fit[1][i])
        out[k] = entry
    return out


def log_to_sweep_runs(
    stats: dict[str, dict[str, Any]],
    pairs: dict[str, dict[str, Any]],
    sweep_metrics: dict[str, Any],
) -> int:
    """Log each STEP's ratings to its sweep child run; returns runs updated.

    Metrics: rating_count, rating_mean (scores: `summary`), pair_count, pair_wins,
    bt_strength (choices: `pair_summary`); a mean or strength only when it exists. A run
    missing from the store (another store, deleted) is skipped with a warning.
    """
    import time
    import warnings

    runs = {
        key: col["mlflow_run_id"]
        for key, col in sweep_metrics.get("columns", {}).items()
        if col.get("mlflow_run_id") and key in stats
    }
    if not runs:  # no store touched (or created) for a sweep that logged nothing
        return 0
    import mlflow
    from mlflow.entities import Metric
    from musegen import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    done = 0
    for key, run_id in runs.items():
        s, p = stats[key], pairs.get(key, {})
        values = {
            "rating_count": s["n"],
            "rating_mean": s["mean"],
            "pair_count": p.get("n", 0),
            "pair_wins": p.get("wins", 0),
            "bt_strength": p.get("strength"),
        }
        batch = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None]
        try:
            client.log_batch(run_id, metrics=batch)
        except mlflow.exceptions.MlflowException as exc:
            warnings.warn(f"sweep run {run_id} ({key}): ratings not logged: {exc}", stacklevel=2)
            continue
        done += 1
    return done
