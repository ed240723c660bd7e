"""End to end: the real pipeline in a fresh temporary git + DVC repo, on a small profile."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import sh

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage(repo: Path) -> None:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    # a foreach stage (transcribe) makes one stage per entry of its params: none by default
    assert sorted(lock["stages"]) == sorted(s for s, d in stages.items() if "foreach" not in d)
    manifest = pd.read_csv(repo / "data/prepared/manifest.csv", keep_default_na=False)
    assert (manifest.status == "ok").sum() == 24
    assert set(manifest.split) <= {"train", "valid", "test"}
    for rep in ("cp", "remi"):
        vocab = json.loads((repo / f"data/tokens/{rep}/vocab.json").read_text())
        for split in ("train", "valid", "test"):
            arr = np.load(repo / f"data/tokens/{rep}/{split}.npy")
            offsets = np.load(repo / f"data/tokens/{rep}/{split}_offsets.npy")
            assert offsets[-1] == len(arr)
            assert len(offsets) - 1 == (manifest.split == split).sum() > 0
            if rep == "cp":
                assert arr.shape[1] == len(vocab["fields"])
                assert (arr.max(axis=0) < np.array(vocab["sizes"])).all()


def test_second_repro_is_a_fast_noop(repo: Path) -> None:
    start = time.perf_counter()
    out = sh("dvc", "repro", cwd=repo).stdout
    elapsed = time.perf_counter() - start
    assert "didn't change, skipping" in out and "Running stage" not in out, out
    assert elapsed < 15, f"no-op repro took {elapsed:.1f} s"
    status = sh("dvc", "status", cwd=repo).stdout
    assert "up to date" in status, status


def test_metrics_show(repo: Path) -> None:
    """`dvc metrics show` lists each stage's headline.json, few figures: within 120 columns."""
    from musegen.files import HEADLINE_KEYS

    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    files = shown[""]["data"]
    assert {Path(f).parent.name for f in files} == {
        "prepared", "tokenize", "train", "sweep", "select", "tune", "evaluate"
    }, files  # fmt: skip
    figures = [k for f in files.values() for k in f["data"]]
    assert sorted(figures) == sorted(HEADLINE_KEYS)  # each figure once, from one stage
    table = sh("dvc", "metrics", "show", cwd=repo).stdout.splitlines()
    assert max(map(len, table)) <= 120, "\n".join(table)


def test_training_learns_below_unigram_baseline(repo: Path) -> None:
    """The best valid loss is below the per-type unigram's on the same targets, in all and on
    the word type (what comes next). The small profile (180 steps, 24 pieces) learns little
    more: pitch, chord and duration stay near or above their per-type unigram."""
    m = json.loads((repo / "reports/train/metrics.json").read_text())
    best, base = m["best"], m["baseline"]
    assert best["valid_loss"] < base["valid_loss"], (best, base)
    assert best["valid_loss_type"] < 0.7 * base["valid_loss_type"], (best, base)
    steps = sorted(int(c.stem[5:]) for c in (repo / "models/cp/checkpoints").glob("step_*.pt"))
    assert steps == [60, 120, 180]


def test_mlflow_holds_runs_and_champion(repo: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow/mlflow.db'}")
    champion = client.get_model_version_by_alias("musegen", "champion")
    report = json.loads((repo / "reports/register/champion.json").read_text())
    assert int(champion.version) == report["version"]
    train_runs = client.search_runs(
        [client.get_experiment_by_name("musegen").experiment_id],
        filter_string="tags.musegen.stage = 'sweep'",
    )
    assert sorted(int(r.data.params["step"]) for r in train_runs) == [60, 120, 180]
    assert (repo / "reports/sweep/index.html").is_file()
    assert (repo / "reports/tune/best_sampling.yaml").is_file()


def test_only_evaluate_reads_the_test_split(repo: Path) -> None:
    """Each stage's record of the manifest rows it read, checked against their splits."""
    manifest = pd.read_csv(repo / "data/prepared/manifest.csv", keep_default_na=False)
    split = dict(zip(manifest.path, manifest.split, strict=True))
    sweep = json.loads((repo / "reports/sweep/metrics.json").read_text())
    tune = json.loads((repo / "reports/tune/metrics.json").read_text())
    evaluate = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    pieces = json.loads((repo / "data/tokens/cp/pieces.json").read_text())
    read = {
        "sweep prompts": sweep["prompts"],
        "sweep reference": sweep["reference_pieces"],
        "tune": tune["pieces"],
        "train (fits on)": pieces["train"],
        "train (valid loss)": pieces["valid"],
    }
    for stage, paths in read.items():
        assert paths, stage
        assert "test" not in {split[p] for p in paths}, f"{stage} read a test-split piece"
    assert {split[p] for p in sweep["prompts"] + sweep["reference_pieces"] + tune["pieces"]} == {
        "valid"
    }
    assert {split[p] for p in pieces["train"]} == {"train"}
    # the real anchor is never in its own reference
    assert set(sweep["prompts"]).isdisjoint(sweep["reference_pieces"])
    assert evaluate["pieces"] and {split[p] for p in evaluate["pieces"]} == {"test"}


def test_one_bundle_step_sampling_and_evaluation_agree(repo: Path) -> None:
    import mlflow

    choice = json.loads((repo / "reports/select/choice.json").read_text())
    champion = json.loads((repo / "reports/register/champion.json").read_text())
    tune = json.loads((repo / "reports/tune/metrics.json").read_text())
    evaluate = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    step = choice["step"]
    assert champion["step"] == tune["checkpoint_step"] == evaluate["checkpoint_step"] == step
    tuned = yaml.safe_load((repo / "reports/tune/best_sampling.yaml").read_text())
    for knob, fields in tuned.items():
        for field, value in fields.items():
            assert champion["sampling"][knob][field] == value
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow/mlflow.db'}")
    version = client.get_model_version_by_alias("musegen", "champion")
    assert version.tags["step"] == str(step) and version.tags["selected_by"] == "proxy"
    tagged = float(version.tags["evaluate_proxy_score"])  # one side is rounded to 6 digits
    assert tagged == pytest.approx(evaluate["proxy_score"], rel=1e-5)
    assert json.loads(version.tags["sampling"]) == champion["sampling"]


def test_ratings_added_change_the_champion(repo: Path, tmp_path: Path) -> None:
    """People prefer the STEP the proxy ranked last: `musegen ratings add`, `dvc repro`, and
    select, tune, evaluate and register all follow them to that STEP."""
    import mlflow

    before = json.loads((repo / "reports/select/choice.json").read_text())
    assert before["decided_by"] == "proxy"
    worst = min(before["steps"], key=lambda s: before["steps"][s]["proxy"])
    assert int(worst) != before["step"]
    sweep = json.loads((repo / "reports/sweep/metrics.json").read_text())
    ratings = [
        {"clip": clip, "prompt": row, "score": 5 if col.get("step") == int(worst) else 1,
         "time": f"2026-12-01T22:0{row}:00Z"}
        for col in sweep["columns"].values()
        if col.get("step") is not None
        for row, clip in enumerate(col["clips"])
    ]  # fmt: skip
    export = {"format": "musegen-sweep-ratings/1", "page": "e2e", "blind": True, "rater": "e2e"}
    path = tmp_path / "ratings-e2e.json"
    path.write_text(json.dumps(export | {"ratings": ratings}))
    out = sh("musegen", "ratings", "add", str(path), cwd=repo).stdout
    assert f"{len(ratings)} added" in out
    assert (repo / "ratings/ratings.csv.dvc").is_file()  # DVC tracks the table
    sh("dvc", "repro", cwd=repo)
    choice = json.loads((repo / "reports/select/choice.json").read_text())
    assert choice["step"] == int(worst) and choice["decided_by"] == "ratings", choice
    champion = json.loads((repo / "reports/register/champion.json").read_text())
    evaluate = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    tune = json.loads((repo / "reports/tune/metrics.json").read_text())
    assert champion["step"] == evaluate["checkpoint_step"] == tune["checkpoint_step"] == int(worst)
    assert champion["selected_by"] == "ratings"
    # counts and means reached the STEP's sweep run
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow/mlflow.db'}")
    run = client.get_run(sweep["columns"][f"step_{worst}"]["mlflow_run_id"])
    assert run.data.metrics["rating_mean"] == 5.0 and run.data.metrics["rating_count"] == 2
    assert "up to date" in sh("dvc", "status", cwd=repo).stdout


def test_experiment_run_with_a_changed_param(repo: Path) -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline", cwd=repo)
    sh("dvc", "exp", "run", "-n", "short", "-S", "sweep.num_prompts=1", cwd=repo)
    shown = sh("dvc", "exp", "show", "--json", cwd=repo).stdout
    assert '"short"' in shown
    # what changed, readable at 120 columns, exactly as README writes it: the table's own width
    # (what the pager shows; rich squeezes nothing at 1000 columns) is at most 120, and at 120
    # no cell is cut to "…". DVC adds a hash column for every changed file dep (the reports
    # stages hand each other, 32 characters each) and has no setting to hide them: --drop '.*/'
    # removes those and only those (metric and param names hold no "/")
    show = ("dvc", "exp", "show", "--only-changed")
    readme = (*show, "--drop", ".*/", "--no-pager")
    wide = sh("env", "COLUMNS=1000", *readme, cwd=repo).stdout.splitlines()
    assert max(map(len, wide)) <= 120, "\n".join(wide)
    table = sh("env", "COLUMNS=120", *readme, cwd=repo).stdout
    assert "…" not in table and "sweep.num_prompts" in table and "test_score" in table, table
    every, kept = (sh(*show, *drop, "--csv", cwd=repo).stdout.splitlines()[0].split(",")
                   for drop in ((), ("--drop", ".*/")))  # fmt: skip
    dropped = set(every) - set(kept)
    assert dropped and all("/" in column for column in dropped), every
