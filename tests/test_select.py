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
        ("ratings=[]", 'no "ratings" list'),
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
        if key in ("blind", "rater", "ratings"):
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
