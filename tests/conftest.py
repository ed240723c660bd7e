"""Shared fixtures: real MIDI from the embedded corpus, isolated stores for Prefect and MLflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

# Prefect and MLflow read their settings at import: isolate them before any test imports them.
_HOME = Path(tempfile.mkdtemp(prefix="musegen-test-"))
os.environ.setdefault("PREFECT_HOME", str(_HOME / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_HOME / 'mlflow.db'}")

ROOT = Path(__file__).resolve().parents[1]


def needs(*tools: str, install: str) -> pytest.MarkDecorator:
    """Skip a test when none of `tools` is on PATH, except in CI (CI set): there it runs and fails.

    `make setup` installs the tools (Makefile `apt`) and fails in CI when one is missing; this
    keeps a CI run from going green with the FluidSynth or Chromium tests silently skipped.
    """
    missing = not any(shutil.which(tool) for tool in tools)
    return pytest.mark.skipif(
        missing and not os.environ.get("CI"), reason=f"{tools[0]} is not installed: {install}"
    )


#: varied real pieces: 2/4 rag, 4/4 sonata, 3/4 mazurka (repeat fallback), lead sheet with
#: chord symbols, voice + piano, and chorales (four voices merged, unisons).
REAL_SOURCES = (
    "joplin/maple_leaf_rag.mxl",
    "mozart/k545/movement1_exposition.mxl",
    "chopin/mazurka06-2.krn",
    "leadSheet/berlinAlexandersRagtime.mxl",
    "schubert/Lindenbaum.xml",
    "schoenberg/opus19/movement2.mxl",
    "bach/bwv269",
    "bach/bwv347",
    "bach/bwv355",
)


@pytest.fixture(scope="session")
def real_midi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real pieces built by the corpus stage, plus miditoolkit's Pop1K7 example."""
    import shutil

    from miditoolkit.midi.utils import example_midi_file

    from musegen.config import load_section
    from musegen.stages import corpus

    out = tmp_path_factory.mktemp("real") / "m21"
    params = load_section(corpus.CorpusParams, "corpus", ROOT / "params.yaml")
    corpus.build_m21(out, params, sources=REAL_SOURCES)
    shutil.copy(example_midi_file(), out / "pop1k7__1390.mid")
    return out


@pytest.fixture(scope="session")
def real_midi_files(real_midi_dir: Path) -> list[Path]:
    """The real MIDI files (ids in parametrized tests are the file names)."""
    return sorted(real_midi_dir.glob("*.mid"))


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole run (startup is ~10-15 s on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prepared_corpus(real_midi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real pieces run through the real prepare stage (wide hash splits: 10 files).

    Returns paths: raw_dir, manifest (5 valid-split files: the sweep's prompts and reference;
    5 test-split files, which the sweep must never read).
    """
    import dataclasses

    from musegen.config import load_section
    from musegen.stages import prepare

    out = tmp_path_factory.mktemp("prepared")
    params = load_section(prepare.PrepareParams, "prepare", ROOT / "params.yaml")
    params = dataclasses.replace(params, valid_percent=60, test_percent=25, num_workers=1)
    manifest = prepare.prepare(real_midi_dir, out, params)
    counts = manifest.split.value_counts()
    assert counts.get("valid", 0) >= 4 and counts.get("test", 0) >= 2, manifest[["path", "split"]]
    return {"raw_dir": real_midi_dir, "manifest": out / "manifest.csv"}


BIN = Path(sys.executable).parent
#: what a fresh clone has (besides data, which the pipeline makes)
PROJECT = ("musegen", "flows", "ratings", "dvc.yaml", "params.yaml", "pyproject.toml")


def copy_project(dest: Path, names: tuple[str, ...] = ("musegen", "dvc.yaml", "params.yaml")):
    """Copy the project's `names` (folders without __pycache__) into `dest`."""
    for name in names:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)


def sh(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the repo's own store: sqlite:///mlflow/mlflow.db
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
    # the small profile: 24 pieces, a short training run, cheap tuning/sweep/evaluation
    params["corpus"]["max_files"] = 24  # 19 piano/voice pieces + 5 chorales
    # hash splits on 24 files: wider shares so valid and test are not empty
    params["prepare"].update(valid_percent=15, test_percent=15)
    params["train"].update(
        max_steps=180, eval_every=60, save_every=60, batch_size=8, seq_len=128,
        warmup_steps=10, num_valid_windows=16,
    )  # fmt: skip
    params["tune"].update(
        num_trials=2, num_startup_trials=2, num_clips=2, clip_bars=4, num_reference=8
    )
    params["sweep"].update(num_prompts=2, continue_bars=4)
    params["evaluate"].update(num_samples=4, crop_bars=8)
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


@pytest.fixture(scope="module")
def training_run(tmp_path_factory: pytest.TempPathFactory):
    """A fresh sqlite MLflow store (MLFLOW_TRACKING_URI points at it) with one training run.

    Yields: tmp (the store's folder), run_id, experiment (id).
    """
    import mlflow

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("musegen", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp, run_name="train") as run:
        pass
    yield {"tmp": tmp, "run_id": run.info.run_id, "experiment": exp}
    mp.undo()
