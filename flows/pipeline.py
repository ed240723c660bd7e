"""The musegen DAG as a Prefect flow: one task per dvc.yaml stage, in the same order.

How Prefect and DVC share state: every task runs its stage through DVC
(`dvc repro --single-item <stage>`), which runs the stage's `musegen` command and records
its inputs and outputs in dvc.lock. So dvc.lock stays the single truth: a stage whose deps
and params did not change is skipped by DVC inside the task, a Prefect run followed by
`dvc repro` does nothing, and the two can never disagree. Each task then publishes a small
artifact read from the stage's outputs, so the Prefect UI tells the story.

Run: `python -m flows.pipeline` (a temporary Prefect server starts unless PREFECT_API_URL
points at one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from musegen.config import DEFAULT_PARAMS, DataParams, load_section, read_yaml

ROOT = Path(__file__).resolve().parents[1]


class StageError(RuntimeError):
    """A DVC stage exited non-zero; deterministic, so never retried."""


def repro(stage: str) -> None:
    """Run one dvc.yaml stage (skipped by DVC when nothing it depends on changed)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    if proc.returncode:
        raise StageError(f"stage {stage!r} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")


def _data(params: Path) -> DataParams:
    return load_section(DataParams, "data", ROOT / params)


def _section(params: Path, name: str) -> dict:
    """A params section as a mapping (paths the task reads back for its artifact)."""
    return read_yaml(ROOT / params)[name]


def _preempted(state: object) -> bool:
    """Retry training only when it was killed from outside (it resumes from its checkpoint)."""
    return "SIGKILL" in str(state) or "-9" in str(state)


@task(name="corpus")
def corpus(params: Path) -> Path:
    """Build the embedded default corpus."""
    repro("corpus")
    out = ROOT / _data(params).raw_root / "m21-keyboard"
    rows = json.loads((out / "manifest.json").read_text())
    create_markdown_artifact(
        key="corpus", markdown=f"**m21-keyboard**: {len(rows)} files in `{out.relative_to(ROOT)}`"
    )
    return out


@task(name="prepare")
def prepare(params: Path) -> Path:
    """Validate the corpus; publish the manifest summary table."""
    repro("prepare")
    manifest = ROOT / _data(params).manifest
    df = pd.read_csv(manifest, keep_default_na=False)
    summary = df.groupby(["status", "reason", "split"]).size().reset_index(name="files")
    create_table_artifact(key="manifest-summary", table=summary.to_dict(orient="records"))
    return manifest


@task(name="tokenize")
def tokenize(params: Path) -> Path:
    """Tokenize to CP and REMI arrays; publish the per-split token counts."""
    repro("tokenize")
    stats = json.loads((ROOT / _section(params, "tokenize")["metrics"]).read_text())
    rows = [
        {"representation": rep, "split": split, **counts}
        for rep in ("cp", "remi")
        if rep in stats
        for split, counts in stats[rep].items()
    ]
    create_table_artifact(key="tokens", table=rows)
    return ROOT / _data(params).tokens_dir


@task(name="train", retries=1, retry_condition_fn=lambda t, r, s: _preempted(s))
def train(params: Path) -> Path:
    """Train with STEP checkpoints; publish STEP -> valid loss per field."""
    repro("train")
    section = _section(params, "train")
    loss = pd.read_csv(ROOT / section["plots_file"])
    create_table_artifact(key="valid-loss", table=loss.round(4).to_dict(orient="records"))
    return ROOT / section["out_dir"]


@task(name="tune")
def tune(params: Path) -> Path:
    """Tune per-field sampling against the proxy; publish the best settings."""
    repro("tune")
    out = ROOT / _section(params, "tune")["out_dir"] / "best_sampling.yaml"
    create_markdown_artifact(key="best-sampling", markdown=f"```yaml\n{out.read_text()}```")
    return out


@task(name="sweep")
def sweep(params: Path) -> Path:
    """Same prompts x every chosen STEP; publish a link to the side-by-side report."""
    repro("sweep")
    section = _section(params, "sweep")
    page = ROOT / section["out_dir"] / "index.html"
    result = json.loads((ROOT / section["metrics_file"]).read_text())
    create_markdown_artifact(
        key="sweep-report",
        markdown=f"[checkpoint sweep]({page.as_uri()}) (`{page}`)\n\n"
        f"```json\n{json.dumps(result, indent=1)[:3000]}\n```",
    )
    return page


@task(name="evaluate")
def evaluate(params: Path) -> Path:
    """Generated vs held-out metrics; publish the headline numbers."""
    repro("evaluate")
    out = ROOT / _section(params, "evaluate")["out_dir"] / "metrics.json"
    create_markdown_artifact(key="evaluate", markdown=f"```json\n{out.read_text()}```")
    return out


@task(name="register", retries=2, retry_delay_seconds=[2, 8])
def register(params: Path) -> Path:
    """Register the chosen checkpoint; the `champion` alias moves to it."""
    repro("register")
    report = ROOT / _section(params, "register")["report"]
    info = json.loads(report.read_text())
    create_markdown_artifact(
        key="champion",
        markdown=f"`{info['uri']}` -> version {info['version']} (STEP {info['step']})",
    )
    return report


#: the tasks in DAG order; tests check this equals dvc.yaml's stages.
TASKS = (corpus, prepare, tokenize, train, tune, sweep, evaluate, register)


@flow(name="musegen-pipeline", log_prints=True)
def pipeline(params: Path = DEFAULT_PARAMS) -> None:
    """The whole DAG: each stage after the one it depends on."""
    for stage_task in TASKS:
        stage_task(params)


if __name__ == "__main__":
    pipeline()
