"""The musegen DAG as a Prefect flow: one task per dvc.yaml stage, wired like dvc.yaml.

How Prefect and DVC share state: every task runs its stage through DVC
(`dvc repro --single-item <stage>`), which runs the stage's `musegen` command and records
its inputs and outputs in dvc.lock. So dvc.lock stays the single truth: a stage whose deps
and params did not change is skipped by DVC inside the task, a Prefect run followed by
`dvc repro` does nothing, and the two can never disagree.

Caching lets DVC decide. A task's cache key is computed when it starts (after its upstream
tasks finished): if `dvc status <stage>` reports anything (a changed dep, param or out, or no
lock entry yet) there is no key, so the task runs; if DVC says the stage is up to date, the
key is a hash of (repo, stage, the stage's dvc.lock entry: deps' and outs' content hashes,
params values, cmd). A hit therefore means "DVC would skip this stage and an earlier Prefect
run finished it in this very state", and the UI shows the stage as Cached. The key never
holds anything DVC does not hash, so Prefect cannot skip a stage that DVC would run.

DAG and concurrency: `UPSTREAM` lists each stage's upstream stages (a test checks it equals
`dvc dag`); tasks are submitted with `wait_for` on them, so independent stages (none since
the select stage made the DAG a chain, but any a DAG adds) run at once when the task runner
allows it. DVC releases its repo lock while a stage's command runs and keeps per-path
read/write locks, so two sibling stages run in parallel; `--wait-for-lock` queues their
short lock/commit phases. The runner comes from params.yaml `serve.task_runner`: sequential
(one task at a time) or dask (a LocalCluster, or the scheduler at `serve.dask_address`).
Remote Dask workers need the repo and the DVC remote (`dvc pull`), as any DVC runner does.

Retries only for transient failures: a sqlite "database is locked" (MLflow and Optuna
stores under concurrent writers) for every stage, and a SIGKILL (preemption, OOM killer) for
train. Under DVC a retried train starts over (DVC clears a stage's outputs before it runs, so
no stale STEP checkpoint can leak into the sweep); resuming a killed run by hand is
`musegen train --resume`. A stage's deterministic errors are not retried.

A person decides: with `select.wait_minutes` > 0 the flow pauses after select and the
Prefect UI shows a form (each swept STEP's valid loss, proxy score and ratings; the automatic
choice preselected). A different STEP is recorded as the select stage's input and select runs
again, so tune, evaluate and register follow it; no answer in time keeps the automatic choice.
`dvc repro` never pauses (only this flow asks).

Run: `python -m flows.pipeline` (a temporary Prefect server starts unless PREFECT_API_URL
points at one); `python -m flows.serve` for the scheduled deployments.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pydantic
import yaml
from prefect import Flow, Task, flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.futures import PrefectFuture
from prefect.input import RunInput
from prefect.states import Running, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from musegen.apps.ui import ServeParams
from musegen.config import DEFAULT_PARAMS, ParamsError, load_section, read_yaml
from musegen.stages.choice import SelectResult
from musegen.stages.corpus import M21_CORPUS, CorpusConfig, CorpusResult
from musegen.stages.evaluate import EvaluateConfig, EvaluateResult
from musegen.stages.prepare import PrepareConfig, PrepareResult
from musegen.stages.register import RegisterConfig, RegisterResult
from musegen.stages.select import SelectConfig
from musegen.stages.sweep import SweepConfig, SweepResult
from musegen.stages.tokenize import TokenizeConfig, TokenizeResult
from musegen.stages.train import TrainConfig, TrainResult
from musegen.stages.transcribe import TranscribeConfig, TranscribeResult
from musegen.stages.tune import TuneConfig, TuneResult

ROOT = Path(__file__).resolve().parents[1]

#: each stage's upstream stages, as in dvc.yaml (tests/test_dag.py checks it against `dvc dag`)
UPSTREAM: dict[str, tuple[str, ...]] = {
    "corpus": (),
    "transcribe": (),  # optional (transcribe.corpora): with none, DVC has no such edges
    "prepare": ("corpus", "transcribe"),
    "tokenize": ("corpus", "transcribe", "prepare"),
    "train": ("tokenize",),
    "sweep": ("corpus", "transcribe", "prepare", "train"),
    "select": ("sweep",),
    "tune": ("tokenize", "train", "select"),
    "evaluate": ("corpus", "transcribe", "prepare", "train", "select", "tune"),
    "register": ("train", "select", "tune", "evaluate"),
}

#: stage failures worth a retry: what they print, whatever the stage
LOCKED = ("database is locked",)
KILLED = ("exited with -9", "exit code -9")


class StageError(RuntimeError):
    """A DVC stage exited non-zero; retried only when its output says the cause was transient."""


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `dvc --wait-for-lock ARGS` in `root`, with this venv's `musegen` on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)


def repro(stage: str, root: Path = ROOT, force: bool = False) -> None:
    """Run one dvc.yaml stage (skipped by DVC when nothing it depends on changed).

    Raises:
        StageError: DVC or the stage's command failed; the message holds DVC's output tail.
    """
    proc = _dvc(root, "repro", "--single-item", *(["--force"] if force else []), stage)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    if proc.returncode:
        raise StageError(
            f"stage {stage!r} failed in {root} (dvc exit code {proc.returncode}):\n"
            f"{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}"
        )


def stage_state(stage: str, root: Path = ROOT) -> dict[str, Any] | None:
    """The stage's dvc.lock entry when `dvc status` finds it up to date, else None (a
    `foreach` stage: its generated stages' entries, {} when params name none)."""
    proc = _dvc(root, "status", "--json", stage)
    if proc.returncode or json.loads(proc.stdout or "{}"):
        return None  # changed (or DVC could not tell): the stage must run
    lock = root / "dvc.lock"
    entries = yaml.safe_load(lock.read_text())["stages"] if lock.is_file() else {}
    if "foreach" in read_yaml(root / "dvc.yaml")["stages"][stage]:  # transcribe@<name> each
        return {k: v for k, v in entries.items() if k.partition("@")[0] == stage}  # none: {}
    return entries.get(stage) or None


def dvc_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Prefect cache key: None unless DVC says the stage is up to date (see module docstring)."""
    if parameters.get("force"):
        return None
    root = Path(parameters.get("root", ROOT)).resolve()
    stage = context.task.name
    entry = stage_state(stage, root)
    if entry is None:
        return None
    blob = json.dumps([str(root), stage, entry], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def transient(*markers: str) -> Callable[[Task, Any, State], bool]:
    """A retry condition: retry when the failure message contains one of `markers`."""

    def retry(task: Task, task_run: Any, state: State) -> bool:
        return any(marker in str(state.message) for marker in markers)

    return retry


#: options every stage task shares: DVC-keyed cache kept across runs, sqlite-lock retries
STAGE = {
    "cache_key_fn": dvc_cache_key,
    "persist_result": True,
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": transient(*LOCKED),
}


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Table rows with NaN as null (the UI's JSON has no NaN)."""
    return df.astype(object).where(df.notna(), None).to_dict(orient="records")


@task(name="corpus", **STAGE)
def corpus(params: Path, root: Path = ROOT) -> CorpusResult:
    """Build the embedded default corpus; publish its true counts."""
    repro("corpus", root)
    built = CorpusResult.read(CorpusConfig.load(root / params), root)
    where = built.folder.relative_to(root)
    create_markdown_artifact(key="corpus", markdown=f"**{M21_CORPUS}**: {built} in `{where}`")
    return built


@task(name="transcribe", **STAGE)
def transcribe(params: Path, root: Path = ROOT) -> tuple[TranscribeResult, ...]:
    """Transcribe the recordings named in transcribe.corpora (none by default: a no-op);
    publish each corpus's counts."""
    repro("transcribe", root)
    p = TranscribeConfig.load(root / params)
    done = TranscribeResult.read(p, root)
    lines = [
        f"- **{r.folder.name}**: {r.ok} of {r.files} recordings from "
        f"`{p.transcribe.corpora[r.folder.name]}` -> `{r.folder.relative_to(root)}`"
        for r in done
    ]
    create_markdown_artifact(
        key="transcribe", markdown="\n".join(lines) or "no corpora to transcribe"
    )
    return done


@task(name="prepare", **STAGE)
def prepare(params: Path, root: Path = ROOT) -> PrepareResult:
    """Validate the corpus; publish the manifest summary table."""
    repro("prepare", root)
    result = PrepareResult.read(PrepareConfig.load(root / params), root)
    df = pd.read_csv(result.manifest, keep_default_na=False)
    summary = df.groupby(["status", "reason", "split"]).size().reset_index(name="files")
    create_table_artifact(
        key="manifest-summary",
        table=_records(summary),
        description=f"{result.files} files: {result.ok} ok, {result.rejected} rejected",
    )
    return result


@task(name="tokenize", **STAGE)
def tokenize(params: Path, root: Path = ROOT) -> TokenizeResult:
    """Tokenize to CP and REMI arrays; publish the per-split token counts."""
    repro("tokenize", root)
    result = TokenizeResult.read(TokenizeConfig.load(root / params), root)
    rows = [
        {"representation": rep, "split": split, **counts}
        for rep, splits in result.splits.items()
        for split, counts in splits.items()
    ]
    create_table_artifact(key="tokens", table=rows)
    return result


@task(name="train", **STAGE | {"retry_condition_fn": transient(*LOCKED, *KILLED)})
def train(params: Path, root: Path = ROOT) -> TrainResult:
    """Train with STEP checkpoints (retried after a kill); publish STEP -> valid loss per field."""
    repro("train", root)
    result = TrainResult.read(TrainConfig.load(root / params), root)
    loss = pd.read_csv(result.loss)
    create_table_artifact(
        key="valid-loss",
        table=_records(loss.round(4)),
        description=f"best valid loss {result.best_valid_loss:.4f} at STEP {result.best_step}",
    )
    return result


@task(name="select", **STAGE)
def select(params: Path, root: Path = ROOT) -> SelectResult:
    """Pick the STEP the later stages use; publish each STEP's numbers and the choice."""
    repro("select", root)
    chosen = SelectResult.read(SelectConfig.load(root / params), root)
    rows = [
        {"step": int(s), "valid_loss": v["valid_loss"], "proxy": v["proxy"]}
        | {f"ratings_{k}": v["ratings"][k] for k in ("n", "mean")}
        | {f"pairs_{k}": v.get("pairs", {}).get(k) for k in ("n", "wins", "strength")}
        for s, v in chosen.steps.items()
    ]
    create_table_artifact(
        key="select",
        table=rows,
        description=f"STEP {chosen.step} ({chosen.decided_by}: {chosen.reason})",
    )
    return chosen


@task(name="tune", **STAGE)
def tune(params: Path, root: Path = ROOT, force: bool = False) -> TuneResult:
    """Tune per-field sampling against the proxy (force: more trials); publish the best."""
    repro("tune", root, force=force)
    result = TuneResult.read(TuneConfig.load(root / params), root)
    head = (
        f"{result.n_trials_run} trials this run, objective {result.objective}, best "
        f"{result.best_value} (trial {result.best_trial}), {result.n_ratings} ratings"
    )
    tuned = result.best_sampling
    body = f"```yaml\n{tuned.read_text()}```" if tuned else "no trial finished for this STEP"
    create_markdown_artifact(key="best-sampling", markdown=f"{head}\n\n{body}")
    return result


@task(name="sweep", **STAGE)
def sweep(params: Path, root: Path = ROOT) -> SweepResult:
    """Same prompts x every chosen STEP; publish a link to the side-by-side report."""
    repro("sweep", root)
    result = SweepResult.read(SweepConfig.load(root / params), root)
    page, figures = result.page, json.loads(result.metrics.read_text())
    create_markdown_artifact(
        key="sweep-report",
        markdown=f"[checkpoint sweep]({page.as_uri()}) (`{page}`): {result.num_checkpoints} "
        f"STEPs, best STEP {result.best_step} (score {result.best_sweep_score:.4f})\n\n"
        f"```json\n{json.dumps(figures, indent=1)[:3000]}\n```",
    )
    return result


@task(name="evaluate", **STAGE)
def evaluate(params: Path, root: Path = ROOT) -> EvaluateResult:
    """Generated vs held-out metrics; publish the headline numbers."""
    repro("evaluate", root)
    result = EvaluateResult.read(EvaluateConfig.load(root / params), root)
    create_markdown_artifact(
        key="evaluate",
        markdown=f"STEP {result.checkpoint_step}: {result.n_samples} samples vs "
        f"{result.n_reference} held-out, proxy {result.proxy_score:.4f}\n\n"
        f"```json\n{result.metrics.read_text()}```",
    )
    return result


@task(name="register", **STAGE)
def register(params: Path, root: Path = ROOT) -> RegisterResult:
    """Register the bundle (selected STEP, its sampling, its evaluation); move `champion`."""
    repro("register", root)
    info = RegisterResult.read(RegisterConfig.load(root / params), root)
    create_markdown_artifact(
        key="champion",
        markdown=f"`{info.uri}` -> version {info.version} (STEP {info.step}, "
        f"{info.selected_by})\n\n```json\n{json.dumps(info.sampling, indent=1)}\n```",
    )
    return info


class StepChoice(RunInput):
    """The form a paused pipeline shows: which swept STEP to keep (see `ask_person`)."""

    step: int


def choice_form(chosen: SelectResult) -> tuple[type[RunInput], str]:
    """A StepChoice whose `step` lists the swept STEPs (a dropdown in the UI), and its text:
    each STEP's valid loss, proxy score, scores and pairwise choices, the automatic choice,
    the report path."""
    steps = tuple(int(s) for s in chosen.steps)
    form = pydantic.create_model(
        "StepChoice",
        __base__=StepChoice,
        step=(Literal[steps], pydantic.Field(default=chosen.step, title="STEP to keep")),
    )
    lines = [
        f"**Which STEP should be tuned, evaluated and registered?** Automatic choice: STEP "
        f"{chosen.step} ({chosen.decided_by}: {chosen.reason}). Listen first: "
        f"`{chosen.sweep_page}` (blind: `musegen sweep --blind`).",
        "",
        "| STEP | valid loss | proxy score | scores | mean (95% CI) | choices won "
        "| Bradley-Terry |",
        "|---:|---:|---:|---:|---|---:|---:|",
    ]
    for s, row in chosen.steps.items():
        r = row["ratings"]
        mean = "" if r["mean"] is None else f"{r['mean']:.2f}"
        if r.get("ci95"):
            mean += f" ({r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})"
        loss = "" if row["valid_loss"] is None else f"{row['valid_loss']:.4f}"
        c = row.get("pairs") or {"n": 0}
        won = f"{c['wins']} of {c['n']}" if c["n"] else ""
        bt = "" if c.get("strength") is None else f"{c['strength']:+.2f} ± {c['se']:.2f}"
        lines.append(f"| {s} | {loss} | {row['proxy']:.4f} | {r['n']} | {mean} | {won} | {bt} |")
    return form, "\n".join(lines)


def ask_person(params: Path, root: Path, selected: PrefectFuture) -> bool:
    """Pause for a person's STEP (select.wait_minutes; 0 = never); True when they changed it.

    `selected` is the select task's future; nothing is asked when it did not complete.

    A different STEP is recorded with `musegen.stages.select.record_decision` (the select stage's
    DVC dependency), so re-running select makes it the choice and dvc.lock records it. With
    no answer in time, the run goes on with the automatic choice.
    """
    from musegen.stages.select import record_decision

    config = SelectConfig.load(root / params)
    p = config.select
    if p.wait_minutes <= 0:
        return False
    selected.wait()
    if not selected.state.is_completed():
        return False  # an upstream failure: the flow fails on it, no one is asked
    chosen: SelectResult = selected.result()
    form, text = choice_form(chosen)
    timeout = max(1, round(p.wait_minutes * 60))
    try:
        answer = pause_flow_run(
            wait_for_input=form.with_initial_data(description=text, step=chosen.step),
            timeout=timeout,
            poll_interval=min(10, timeout),
        )
    except FlowPauseTimeout:
        # the server still holds the run as Paused: set it running before the next task
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(FlowRunContext.get().flow_run.id, Running(), force=True)
        print(f"no answer in {p.wait_minutes} min: STEP {chosen.step} stands")
        return False
    if answer.step == chosen.step:
        return False
    sweep = root / config.sweep.metrics_file
    record_decision(root / p.ratings_dir, sweep, answer.step, "a person in the Prefect UI")
    print(f"a person chose STEP {answer.step} (automatic: STEP {chosen.step})")
    return True


#: the tasks in DAG order; tests check this equals dvc.yaml's stages.
TASKS = (corpus, transcribe, prepare, tokenize, train, sweep, select, tune, evaluate, register)


@flow(name="musegen-pipeline", log_prints=True)
def pipeline(params: Path = DEFAULT_PARAMS, root: Path = ROOT) -> dict[str, Any]:
    """The whole DAG: each stage once its upstream stages finish; siblings at once. After
    select, it may pause for a person's choice of STEP (`ask_person`). Returns each stage's
    typed result ({stage: <Stage>Result})."""
    futures: dict[str, Any] = {}
    for stage_task in TASKS:
        upstream = [futures[name] for name in UPSTREAM[stage_task.name]]
        futures[stage_task.name] = stage_task.submit(params, root, wait_for=upstream)
        if stage_task is select and ask_person(params, root, futures["select"]):
            futures["select"] = select.submit(params, root)  # DVC: the decision is new input
    return {name: future.result() for name, future in futures.items()}


@flow(name="musegen-tune", log_prints=True)
def tune_flow(params: Path = DEFAULT_PARAMS, root: Path = ROOT, force: bool = True) -> TuneResult:
    """Just the tune stage: with force, another tune.num_trials trials on the shared study."""
    return tune(params, root, force=force)


def task_runner(p: ServeParams) -> TaskRunner:
    """The runner `serve.task_runner` names: sequential, or dask (LocalCluster or an address).

    Raises:
        ParamsError: an unknown runner name.
    """
    if p.task_runner == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    if p.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if p.dask_address:
            return DaskTaskRunner(address=p.dask_address)
        cluster = {"n_workers": p.num_dask_workers, "threads_per_worker": 1, "host": p.host}
        return DaskTaskRunner(cluster_kwargs=cluster | {"dashboard_address": f"{p.host}:0"})
    raise ParamsError(
        f"serve.task_runner: expected sequential or dask, found {p.task_runner!r} (params.yaml)"
    )


def configured(pipeline_flow: Flow, params: Path = DEFAULT_PARAMS, root: Path = ROOT) -> Flow:
    """`pipeline_flow` with the task runner params.yaml's serve section asks for."""
    p = load_section(ServeParams, "serve", root / params)
    return pipeline_flow.with_options(task_runner=task_runner(p))


if __name__ == "__main__":
    configured(pipeline)()
