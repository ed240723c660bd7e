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
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    assert sorted(lock["stages"]) == sorted(stages)
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
    out = sh("dvc", "metrics", "show", "--json", cwd=repo).stdout
    assert "summary.json" in out


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


def test_experiment_run_with_a_changed_param(repo: Path) -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline", cwd=repo)
    sh("dvc", "exp", "run", "-n", "short", "-S", "sweep.num_prompts=1", cwd=repo)
    shown = sh("dvc", "exp", "show", "--json", cwd=repo).stdout
    assert '"short"' in shown
