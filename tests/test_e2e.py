"""End to end: the real pipeline in a fresh temporary git + DVC repo, on a small profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: what a fresh clone has (besides data, which the pipeline makes)
PROJECT = ("musegen", "flows", "dvc.yaml", "params.yaml", "pyproject.toml")

pytestmark = pytest.mark.slow


def sh(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new git+DVC repo holding the project, with `dvc repro` run once on a small profile."""
    repo = tmp_path_factory.mktemp("e2e") / "musegen"
    repo.mkdir()
    for name in PROJECT:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"]["max_files"] = 24  # 19 piano/voice pieces + 5 chorales
    # hash splits on 24 files: wider shares so valid and test are not empty
    params["prepare"].update(valid_percent=15, test_percent=15)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh(
        "git",
        "-c",
        "user.email=t@t",
        "-c",
        "user.name=t",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "0",
        cwd=repo,
    )
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "repro", cwd=repo)
    return repo


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
