"""Choosing the STEP: `musegen ratings add` (the blind page's export) and `musegen select`.

Runs the real CLI in a folder with a sweep metrics.json shaped as the sweep writes it (three
STEPs, two prompts, clip hashes per cell) and empty STEP checkpoints; no model is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from musegen.apps.cli import app
from musegen.config import ParamsError, load_section
from musegen.core import ratings as rt
from musegen.stages import select as stage

ROOT = Path(__file__).resolve().parents[1]
STEPS = (100, 200, 300)
#: the proxy prefers STEP 300, valid loss STEP 200
PROXY = {100: 0.50, 200: 0.60, 300: 0.70}
LOSS = {100: 3.0, 200: 2.5, 300: 2.7}


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with params.yaml, the sweep's metrics.json and step_<STEP>.pt files."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    columns = {"real": {"sweep_score": 0.9, "mean_oa": 0.9, "clips": ["a" * 16, "b" * 16]}}
    for s in STEPS:
        key = f"step_{s}"
        columns[key] = {"step": s, "sweep_score": PROXY[s], "mean_oa": PROXY[s]}
        columns[key] |= {"valid_loss": LOSS[s], "clips": [f"{s:04d}{r:012d}" for r in range(2)]}
    sweep = {"prompts": ["x/one.mid", "x/two.mid"], "columns": columns, "page": "index.html"}
    out = tmp_path / params["sweep"]["metrics_file"]
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(sweep))
    ckpts = tmp_path / params["train"]["out_dir"] / "checkpoints"
    ckpts.mkdir(parents=True)
    for s in STEPS:
        (ckpts / f"step_{s}.pt").write_bytes(b"w")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def musegen(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "musegen", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def export(path: Path, scores: dict[int, int], rater: str = "ana", **changes: object) -> Path:
    """A blind-page export giving every clip of STEP s the score scores[s]."""
    ratings = [
        {"clip": f"{s:04d}{r:012d}", "prompt": r, "score": score, "time": f"2026-12-01T2{r}:00Z"}
        for s, score in scores.items()
        for r in range(2)
    ]
    data = {"format": rt.FORMAT, "page": "p", "blind": True, "rater": rater, "ratings": ratings}
    path.write_text(json.dumps(data | changes))
    return path


def clip(step: int | str, row: int) -> str:
    """The fixture sweep's clip hash of a STEP (or "real") in a prompt row."""
    return ("a" * 16, "b" * 16)[row] if step == "real" else f"{step:04d}{row:012d}"


def choices(path: Path, best: dict[int, int | str], rater: str = "ana", hour: int = 20) -> Path:
    """A blind-page export choosing `best[row]` as the best clip of each row: it beats the
    row's other clips (the page's "best of this row")."""
    rows = [
        {"winner": clip(b, r), "loser": clip(other, r), "prompt": r,
         "time": f"2026-12-01T{hour}:0{r}:00Z"}
        for r, b in best.items()
        for other in (*STEPS, "real")
        if other != b
    ]  # fmt: skip
    data = {"format": rt.FORMAT, "page": "p", "blind": True, "rater": rater, "ratings": []}
    path.write_text(json.dumps(data | {"choices": rows}))
    return path


def test_bradley_terry_recovers_a_known_ordering() -> None:
    """Choices drawn from known strengths: the fit orders the players as they are, with
    strengths near the truth; a player that never lost and one that never played stay finite."""
    true = np.array([0.0, 1.5, -1.0, 0.5, -2.0])
    rng = np.random.default_rng(3)
    wins = np.zeros((5, 5))
    for _ in range(1500):
        i, j = rng.choice(5, 2, replace=False)
        if rng.random() < 1 / (1 + np.exp(true[j] - true[i])):
            wins[i, j] += 1
        else:
            wins[j, i] += 1
    strength, se = rt.bradley_terry(wins)
    assert list(np.argsort(strength)) == list(np.argsort(true))
    assert np.allclose(strength, true - true.mean(), atol=3 * se.max()) and se.max() < 0.15
    # A beat B three times and nobody else; C never played: finite, A > C > B
    strength, se = rt.bradley_terry(np.array([[0, 3, 0], [0, 0, 0], [0, 0, 0]]))
    assert np.all(np.isfinite(strength)) and np.all(np.isfinite(se))
    assert strength[0] > strength[2] > strength[1] and abs(strength.sum()) < 1e-9
    assert np.all(rt.bradley_terry(np.zeros((3, 3)))[0] == 0)


def test_params_refuse_an_unknown_rule() -> None:
    p = load_section(stage.SelectParams, "select", ROOT / "params.yaml")
    with pytest.raises(ParamsError, match=r"select\.by = 'best'"):
        stage.SelectParams(**(p.__dict__ | {"by": "best"}))


def test_ratings_change_the_selected_step_when_they_disagree_with_the_proxy(work: Path) -> None:
    first = musegen("select", cwd=work)
    assert first.returncode == 0, first.stderr
    report = json.loads((work / "reports/select/choice.json").read_text())
    assert report["step"] == 300 and report["decided_by"] == "proxy"
    assert "0 of select.min_ratings = 6" in report["reason"]

    # people prefer STEP 100 (the proxy's last): 6 ratings reach select.min_ratings
    added = musegen(
        "ratings", "add", str(export(work / "r.json", {100: 5, 200: 2, 300: 1})), cwd=work
    )
    assert added.returncode == 0, added.stderr
    assert "6 added, 0 duplicates ignored" in added.stdout
    table = pd.read_csv(work / "ratings/ratings.csv")
    assert list(table.columns) == list(rt.COLUMNS) and len(table) == 6
    assert set(table.step) == set(STEPS) and set(table.prompt) == {"x/one.mid", "x/two.mid"}

    assert musegen("select", cwd=work).returncode == 0
    report = json.loads((work / "reports/select/choice.json").read_text())
    assert report["step"] == 100 and report["decided_by"] == "ratings"
    assert report["checkpoint"].endswith("step_100.pt")
    row = report["steps"]["100"]
    assert row["ratings"]["n"] == 2 and row["ratings"]["mean"] == 5.0
    assert row["proxy"] == PROXY[100] and row["valid_loss"] == LOSS[100]

    # the same file again: nothing new; a second rater's opposite scores move the means
    again = CliRunner().invoke(app, ["ratings", "add", str(work / "r.json")])
    assert "0 added, 6 duplicates ignored, 6 in" in again.output
    bob = export(work / "b.json", {100: 1, 200: 5, 300: 1}, rater="bob")
    assert CliRunner().invoke(app, ["ratings", "add", str(bob)]).exit_code == 0
    assert CliRunner().invoke(app, ["select"]).exit_code == 0
    report = json.loads((work / "reports/select/choice.json").read_text())
    assert report["step"] == 200  # means 3.0 / 3.5 / 1.0
    assert (
        report["steps"]["200"]["ratings"]["ci95"][0]
        < 3.5
        < report["steps"]["200"]["ratings"]["ci95"][1]
    )


def test_pairwise_choices_change_the_selected_step_and_reach_the_sweep_runs(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rater picks STEP 200 as the best of both rows (the proxy prefers 300): 6 choices
    reach select.min_ratings and Bradley-Terry decides, over scores that prefer STEP 100."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # in-process commands use the folder's store too
    from musegen import tracking

    # the sweep's child runs, in the folder's own sqlite store (as `musegen sweep` logs them)
    client = mlflow.MlflowClient(f"sqlite:///{work / tracking.DEFAULT_STORE}")
    exp = client.create_experiment("sweep")
    sweep_file = work / "reports/sweep/metrics.json"
    sweep = json.loads(sweep_file.read_text())
    for s in STEPS:
        sweep["columns"][f"step_{s}"]["mlflow_run_id"] = client.create_run(exp).info.run_id
    sweep_file.write_text(json.dumps(sweep))

    scores = export(work / "s.json", {100: 5, 200: 1, 300: 1})
    assert CliRunner().invoke(app, ["ratings", "add", str(scores)]).exit_code == 0
    added = musegen("ratings", "add", str(choices(work / "c.json", {0: 200, 1: 200})), cwd=work)
    assert added.returncode == 0, added.stderr
    assert "6 added, 0 duplicates ignored, 12 in" in added.stdout
    assert "step_200: 2 ratings, mean 1.00; won 6 of 6 choices" in added.stdout
    table = pd.read_csv(work / "ratings/ratings.csv", dtype=str, keep_default_na=False)
    pairs = table[table.beats != ""]
    assert set(pairs["clip"]) == {clip(200, 0), clip(200, 1)} and set(pairs.score) == {""}
    assert sorted(pairs.beats_column) == sorted(["step_100", "step_300", "real"] * 2)

    assert musegen("select", cwd=work).returncode == 0
    report = json.loads((work / "reports/select/choice.json").read_text())
    assert report["step"] == 200 and report["decided_by"] == "pairs", report
    assert report["num_pairs"] == 6 and report["num_ratings"] == 6
    row = report["steps"]["200"]["pairs"]
    assert row["n"] == 6 and row["wins"] == 6 and row["strength"] > 0
    assert all(report["steps"][s]["pairs"]["strength"] < 0 for s in ("100", "300"))
    assert "Bradley-Terry" in report["reason"] and "6 choices in all" in report["reason"]
    run = client.get_run(sweep["columns"]["step_200"]["mlflow_run_id"])
    assert run.data.metrics["pair_count"] == 6 and run.data.metrics["pair_wins"] == 6
    assert run.data.metrics["bt_strength"] == pytest.approx(row["strength"])
    assert run.data.metrics["rating_count"] == 2

    # the rater changes their mind about row 0 (later): STEP 300 now beats 200 there, the
    # row's older choices against other clips stand; a second rater agrees on row 1
    again = CliRunner().invoke(
        app, ["ratings", "add", str(choices(work / "c2.json", {0: 300}, hour=21))]
    )
    assert "3 added" in again.output and "14 in" in again.output, again.output
    bob = choices(work / "b.json", {1: 300}, rater="bob")
    assert CliRunner().invoke(app, ["ratings", "add", str(bob)]).exit_code == 0
    assert CliRunner().invoke(app, ["select"]).exit_code == 0
    report = json.loads((work / "reports/select/choice.json").read_text())
    assert report["step"] == 300 and report["num_pairs"] == 11, report
    wins = {s: report["steps"][s]["pairs"]["wins"] for s in ("100", "200", "300")}
    assert wins == {"100": 0, "200": 5, "300": 6}


def test_other_rules_and_a_persons_choice(work: Path) -> None:
    p = load_section(stage.SelectParams, "select", work / "params.yaml")
    sweep, ckpts = work / "reports/sweep/metrics.json", work / "models/cp/checkpoints"
    pick = lambda **kw: stage.select(stage.SelectParams(**(p.__dict__ | kw)), sweep, ckpts)  # noqa: E731
    assert pick(by="proxy")["step"] == 300
    assert pick(by="valid_loss")["step"] == 200
    assert pick(by="step", step=100)["decided_by"] == "step"
    with pytest.raises(FileNotFoundError, match=r"step_150\.pt: no checkpoint for STEP 150"):
        pick(by="step", step=150)
    with pytest.raises(ValueError, match=r"STEP 150 was not swept \(swept: \[100, 200, 300\]\)"):
        stage.select(p, sweep, ckpts, step=150)


def test_a_persons_choice_holds_until_the_model_changes(work: Path) -> None:
    result = CliRunner().invoke(app, ["select", "--step", "100"])
    assert result.exit_code == 0, result.output
    assert "STEP 100 (person" in result.output
    # recorded in the select stage's dependency: a plain `musegen select` (dvc repro) keeps it
    assert json.loads((work / "ratings/decision.json").read_text())["step"] == 100
    assert CliRunner().invoke(app, ["select"]).exit_code == 0
    report = json.loads((work / "reports/select/choice.json").read_text())
    assert report["step"] == 100 and report["decided_by"] == "person"
    # a retrained model makes new clips: the old choice no longer applies, the rule decides
    sweep_file = work / "reports/sweep/metrics.json"
    sweep = json.loads(sweep_file.read_text())
    sweep["columns"]["step_100"]["clips"] = ["c" * 16, "d" * 16]
    sweep_file.write_text(json.dumps(sweep))
    assert CliRunner().invoke(app, ["select"]).exit_code == 0
    report = json.loads((work / "reports/select/choice.json").read_text())
    assert report["step"] == 300 and report["decided_by"] == "proxy"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not JSON"),
        (json.dumps({"format": "other"}), "not a sweep ratings export"),
        ("blind=false", "not from the blind page"),
        ("rater=", 'no "rater" name'),
        ("ratings=[]", 'no "ratings" or "choices" list'),
        ("choices=3", 'no "ratings" or "choices" list'),
        ("clip=ffffffffffffffff", "is not in the current sweep"),
        ("score=6", "score 6; expected an integer 1-5"),
        ("score=true", "score True"),
        ("time=yesterday", "is not an ISO 8601 time"),
    ],
)
def test_bad_files_are_refused_with_one_line_and_nothing_written(
    work: Path, content: str, reason: str
) -> None:
    good = json.loads(export(work / "good.json", {100: 4}).read_text())
    bad = work / "bad.json"
    if "=" in content and not content.startswith("{"):
        key, value = content.split("=", 1)
        if key in ("blind", "rater", "ratings", "choices"):
            good[key] = json.loads(value) if value else ""
        else:
            good["ratings"][1][key] = value if key in ("clip", "time") else json.loads(value)
        bad.write_text(json.dumps(good))
    else:
        bad.write_text(content)
    # a good file alongside: all files are checked first, so nothing at all is merged
    result = CliRunner().invoke(app, ["ratings", "add", str(work / "good.json"), str(bad)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and reason in lines[0], result.output
    assert not (work / "ratings/ratings.csv").exists()
    missing = CliRunner().invoke(app, ["ratings", "add", str(work / "none.json")])
    assert missing.exit_code == 1 and "none.json: file not found" in missing.output


@pytest.mark.parametrize(
    ("choice", "reason"),
    [
        ({"loser": "0100000000000001"}, "clips of different prompts (x/one.mid vs x/two.mid)"),
        ({"loser": "0200000000000000"}, "choice 2: clip '0200000000000000' cannot beat itself"),
        ({"winner": "ffffffffffffffff"}, "choice 2: clip 'ffffffffffffffff' is not in the current"),
        ({"loser": None}, "choice 2: clip None is not in the current sweep"),
        ({"time": "soon"}, "choice 2: time 'soon' is not an ISO 8601 time"),
        ("not a pair", "choice 2 is not an object"),
    ],
)
def test_bad_choices_are_refused_with_one_line_and_nothing_written(
    work: Path, choice: object, reason: str
) -> None:
    good = json.loads(choices(work / "good.json", {0: 200, 1: 100}).read_text())
    bad = work / "bad.json"
    row = good["choices"][2]  # row 0: STEP 200 beats the real clip
    good["choices"][2] = row | choice if isinstance(choice, dict) else choice
    bad.write_text(json.dumps(good))
    result = CliRunner().invoke(app, ["ratings", "add", str(work / "good.json"), str(bad)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and reason in lines[0], lines
    assert not (work / "ratings/ratings.csv").exists()


def test_format_1_exports_still_merge(work: Path) -> None:
    """An export from the page before choices (format 1: scores only) still merges."""
    old = export(work / "old.json", {300: 4}, format="musegen-sweep-ratings/1")
    assert CliRunner().invoke(app, ["ratings", "add", str(old)]).exit_code == 0
    assert set(rt.read_table(work / "ratings").score) == {"4"}
