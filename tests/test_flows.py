"""The Prefect flows on a real server: DAG wiring, DVC-keyed caching, retries, Dask, deployments.

Most tests run the real pipeline flow (the tasks of flows/pipeline.py, each running
`dvc repro --single-item`) in a fresh git+DVC repo whose dvc.yaml has the same stages and DAG
but tiny stand-in commands (`python stage.py NAME`) that write the files each task reads for
its artifact; so a whole flow run takes seconds. test_prefect_e2e runs the flow on the real
stages' outputs from tests/test_e2e.py's repo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.states import State

from flows.pipeline import LOCKED, UPSTREAM, configured, pipeline, transient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: seconds the stand-in tune and evaluate each wait for the other to start (dask test only);
#: a rendezvous, not a sleep: they meet only if both run at once, however busy the machine
MEET_TIMEOUT = 120.0

#: the files each task reads back, written by the stand-in stage (first path = its out in DVC)
STAND_IN = r"""
import json, pathlib, sys, time, yaml
name, start, met = sys.argv[1], time.time(), None
params = yaml.safe_load(open("params.yaml"))
if name in ("tune", "evaluate") and float(sys.argv[2]) > 0:  # meet the other one
    pathlib.Path(f".started-{name}").touch()
    other = pathlib.Path(".started-" + ("evaluate" if name == "tune" else "tune"))
    deadline = time.time() + float(sys.argv[2])
    while not other.exists() and time.time() < deadline:
        time.sleep(0.05)
    met = other.exists()
files = {
    "corpus": {"data/raw/m21-keyboard/manifest.json": json.dumps({"files": [
        {"file": "a.mid", "notes": 1200, "seconds": 90},
        {"file": "b.mid", "notes": 3, "seconds": 30}]})},
    "transcribe": {"data/raw/mine/a.mid": "MThd"},
    "prepare": {"data/prepared/manifest.csv":  # prepare's columns (musegen.stages.prepare)
                "path,sha256,bytes,status,reason,detail,split,n_notes,n_drum_notes,seconds,"
                "n_bars,n_tracks,ticks_per_beat,time_signature,n_time_signatures,"
                "n_tempo_changes,notes_sha256,notes\n"
                "a.mid,aa,9,ok,,,train,5,0,90.0,4,1,480,4/4,1,1,cc,\n"
                "b.mid,bb,9,rejected,no_notes,no pitched notes,,0,0,,,1,480,,,,,\n"},
    "tokenize": {"data/tokens/cp/vocab.json": "{}",
                 "reports/tokenize/metrics.json": json.dumps({"cp": {"train": {"total": 9}}})},
    "train": {"models/cp/checkpoints/step_1.pt": "w",
              "reports/train/loss.csv": "step,train_loss,valid_loss\n1,2.5,\n2,2.0,1.9\n",
              "reports/train/metrics.json": json.dumps({"best": {"step": 2, "valid_loss": 1.9}})},
    "sweep": {"reports/sweep/index.html": "<html></html>",
              "reports/sweep/metrics.json": json.dumps({"seed": params["sweep"]["seed"],
                  "best_step": 1, "best_sweep_score": 0.5, "num_checkpoints": 2,
                  "seconds": {"total": 1.0},
                  "columns": {f"step_{s}": {"step": s, "clips": [f"c{s}"]} for s in (1, 2)}})},
    "select": {"reports/select/choice.json": json.dumps(
        {"step": 1, "decided_by": "proxy", "reason": "highest sweep score 0.5000",
         "steps": {"1": {"valid_loss": 1.9, "proxy": 0.5, "ratings": {"n": 0, "mean": None}},
                   "2": {"valid_loss": 2.1, "proxy": 0.4,
                         "ratings": {"n": 2, "mean": 4.5, "ci95": [4.0, 5.0]},
                         "pairs": {"n": 4, "wins": 3, "strength": 0.41, "se": 0.5}}}}
        if not pathlib.Path("ratings/decision.json").exists() else
        {"step": json.loads(pathlib.Path("ratings/decision.json").read_text())["step"],
         "decided_by": "person", "reason": "a person", "steps": {}})},
    "tune": {"reports/tune/best_sampling.yaml": "temperature: {pitch: 1.1}\n",
             "reports/tune/metrics.json": json.dumps({"objective": "proxy", "n_trials_run": 2,
                 "seconds_per_trial": 1.0, "best_value": 0.5, "best_trial": 1, "n_ratings": 0,
                 "spearman_proxy_vs_rating": None, "checkpoint_step": 1})},
    "evaluate": {"reports/evaluate/metrics.json": json.dumps({"checkpoint_step": 1,
                 "n_samples": 4, "n_reference": 3, "proxy_score": 0.5, "mean_oa": 0.6,
                 "order_score": 0.1})},
    "register": {"reports/register/champion.json":
                 json.dumps({"uri": "models:/musegen@champion", "version": 1, "step": 1,
                             "selected_by": "proxy", "sampling": {"temperature": {"pitch": 1.1}},
                             "evaluate_proxy_score": 0.5})},
}[name]
if name == "select":  # what select writes beside the choice (musegen.stages.select)
    choice = json.loads(files["reports/select/choice.json"])
    choice |= {"checkpoint": f"models/cp/checkpoints/step_{choice['step']}.pt", "by": "ratings",
               "num_ratings": 2, "num_pairs": 4}
    files["reports/select/choice.json"] = json.dumps(choice)
for path, text in files.items():
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(text)
with open(".runs.log", "a") as log:
    log.write(json.dumps({"stage": name, "start": start, "end": time.time(), "met": met}) + "\n")
"""

#: each stand-in stage's DVC outs (dirs where the real stage writes a dir)
OUTS = {
    "corpus": ["data/raw/m21-keyboard"],
    "transcribe": ["data/raw/mine"],  # the optional stage, as if transcribe.corpora named one
    "prepare": ["data/prepared/manifest.csv"],
    "tokenize": ["data/tokens", "reports/tokenize/metrics.json"],
    "train": ["models/cp", "reports/train/loss.csv", "reports/train/metrics.json"],
    "sweep": ["reports/sweep/metrics.json", "reports/sweep/index.html"],
    "select": ["reports/select/choice.json"],
    "tune": ["reports/tune/best_sampling.yaml", "reports/tune/metrics.json"],
    "evaluate": ["reports/evaluate/metrics.json"],
    "register": ["reports/register/champion.json"],
}


def sh(*cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def make_repo(
    path: Path,
    task_runner: str = "sequential",
    upstream: dict[str, tuple[str, ...]] = UPSTREAM,
    wait_minutes: float = 0,
) -> Path:
    """A git+DVC tiny with the pipeline's stage names and DAG (`upstream`), stand-in commands."""
    path.mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serve"]["task_runner"] = task_runner
    params["select"]["wait_minutes"] = wait_minutes
    (path / "ratings").mkdir()
    (path / "ratings/README.md").write_text("ratings\n")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / "stage.py").write_text(STAND_IN)
    stages = {
        name: {
            "cmd": f"python stage.py {name} {MEET_TIMEOUT if task_runner == 'dask' else 0}",
            "deps": ["stage.py", *(OUTS[up][0] for up in ups)]
            + (["ratings"] if name == "select" else []),
            **({"params": ["sweep.seed"]} if name == "sweep" else {}),
            "outs": OUTS[name],
        }
        for name, ups in upstream.items()
    }
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (path / ".gitignore").write_text(".runs.log\n.started-*\n")
    sh("git", "init", "-q", "-b", "main", cwd=path)
    sh("dvc", "init", "-q", cwd=path)
    return path


def runs(tiny: Path) -> list[dict[str, Any]]:
    """The stand-in stages' executions so far (what DVC actually ran)."""
    log = tiny / ".runs.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def task_states(state: State, n: int = len(UPSTREAM)) -> dict[str, str]:
    """{stage: final state name} of the flow run's task runs (polled: states land async)."""
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        for _ in range(100):
            task_runs = client.read_task_runs(flow_run_filter=flow_run)
            if len(task_runs) == n and all(tr.state and tr.state.is_final() for tr in task_runs):
                break
            time.sleep(0.2)
    return {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in task_runs}


def artifacts(state: State) -> dict[str, Any]:
    """{key: artifact} the flow run published."""
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("flows") / "tiny")


def test_stand_in_repo_has_the_pipeline_dag(stand_in: Path) -> None:
    dot = sh(sys.executable, "-m", "dvc", "dag", "--dot", cwd=stand_in)
    assert dot.count("->") == sum(len(ups) for ups in UPSTREAM.values())
    for name, ups in UPSTREAM.items():
        for up in ups:
            assert f'"{up}" -> "{name}"' in dot


@pytest.mark.slow
def test_rerun_skips_unchanged_stages_as_dvc_does(prefect_server: None, stand_in: Path) -> None:
    tiny = stand_in
    run = configured(pipeline, Path("params.yaml"), tiny)
    first = run(Path("params.yaml"), tiny, return_state=True)
    assert first.is_completed(), first
    assert [r["stage"] for r in runs(tiny)][:5] == list(UPSTREAM)[:5]
    assert sorted(r["stage"] for r in runs(tiny)) == sorted(UPSTREAM)
    assert set(task_states(first).values()) == {"Completed"}
    assert not (tiny / "ratings/decision.json").exists()  # wait_minutes 0: never paused

    # artifacts render: tables are lists of rows (NaN as null), markdown holds the link
    published = artifacts(first)
    assert {"corpus", "manifest-summary", "tokens", "valid-loss", "best-sampling"} <= set(published)
    assert {"sweep-report", "select", "evaluate", "champion"} <= set(published)
    assert json.loads(published["select"].data)[0]["step"] == 1
    loss = json.loads(published["valid-loss"].data)
    assert loss[0] == {"step": 1, "train_loss": 2.5, "valid_loss": None}
    summary = json.loads(published["manifest-summary"].data)
    assert {"status": "rejected", "reason": "no_notes", "split": "", "files": 1} in summary
    assert "](file://" in published["sweep-report"].data
    assert "pitch: 1.1" in published["best-sampling"].data
    # the corpus's true counts (its manifest's rows), not the manifest's keys
    assert "2 files, 1,203 notes, 2.0 min of music" in published["corpus"].data

    # nothing changed: DVC skips every stage; now that Prefect has seen each stage up to date
    # (a key exists only then), the run after that is served from Prefect's cache
    for expected in ("Completed", "Cached"):
        again = run(Path("params.yaml"), tiny, return_state=True)
        assert again.is_completed(), again
        assert len(runs(tiny)) == len(UPSTREAM)  # no stage command ran
        assert set(task_states(again).values()) == {expected}

    # a sweep param changes: sweep reruns, then select (its input changed); select's choice is
    # the same, so tune, evaluate and register stay as they are; the rest cached
    params = yaml.safe_load((tiny / "params.yaml").read_text())
    params["sweep"]["seed"] += 1
    (tiny / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(Path("params.yaml"), tiny, return_state=True)
    assert [r["stage"] for r in runs(tiny)[len(UPSTREAM) :]] == ["sweep", "select"]
    states = task_states(third)
    assert {s for s, name in states.items() if name != "Cached"} == {"sweep", "select"}
    assert json.loads(sh(sys.executable, "-m", "dvc", "status", "--json", cwd=tiny)) == {}


@pytest.mark.slow
def test_failed_stage_is_not_retried_and_stops_downstream(prefect_server: None, tmp_path: Path):
    tiny = make_repo(tmp_path / "repo")
    (tiny / "stage.py").write_text(
        "import sys\nif sys.argv[1] == 'tokenize': sys.exit('bad input')\n" + STAND_IN
    )
    state = pipeline(Path("params.yaml"), tiny, return_state=True)
    assert state.is_failed()
    assert "bad input" in str(state.message) or "tokenize" in str(state.message)
    ran = sorted(r["stage"] for r in runs(tiny))
    assert ran == ["corpus", "prepare", "transcribe"]  # one attempt, no train
    states = task_states(state, n=len(UPSTREAM))
    assert states["tokenize"] == "Failed" and states["train"] != "Completed"


def test_retries_only_transient_failures(prefect_server: None) -> None:
    attempts: dict[str, int] = {"locked": 0, "bug": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient(*LOCKED))
    def flaky(kind: str) -> str:
        attempts[kind] += 1
        if kind == "locked" and attempts[kind] < 3:
            raise RuntimeError("sqlite3.OperationalError: database is locked")
        if kind == "bug":
            raise ValueError("deterministic")
        return kind

    @flow
    def both() -> tuple[State, State]:
        return flaky("locked", return_state=True), flaky("bug", return_state=True)

    locked, bug = both()
    assert locked.is_completed() and attempts["locked"] == 3
    assert bug.is_failed() and attempts["bug"] == 1


@pytest.mark.slow
def test_dask_runner_runs_independent_stages_at_once(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # since select, the real DAG is a chain; a DAG where evaluate does not wait for tune
    # shows the runner running independent stages at once
    dag = UPSTREAM | {"evaluate": tuple(u for u in UPSTREAM["evaluate"] if u != "tune")}
    monkeypatch.setattr("flows.pipeline.UPSTREAM", dag)
    tiny = make_repo(tmp_path / "repo", task_runner="dask", upstream=dag)
    run = configured(pipeline, Path("params.yaml"), tiny)
    assert type(run.task_runner).__name__ == "DaskTaskRunner"
    state = run(Path("params.yaml"), tiny, return_state=True)
    assert state.is_completed(), state
    done = {r["stage"]: r for r in runs(tiny)}
    assert sorted(done) == sorted(UPSTREAM)
    # each waited for the other to start: on one worker the first would wait in vain
    assert (done["tune"]["met"], done["evaluate"]["met"]) == (True, True), done
    for name, ups in dag.items():  # and never before an upstream stage finished
        assert all(done[up]["end"] <= done[name]["start"] for up in ups), name
    assert json.loads(sh(sys.executable, "-m", "dvc", "status", "--json", cwd=tiny)) == {}


@pytest.mark.slow
def test_served_deployments_run_on_schedule_config(prefect_server: None, tmp_path: Path):
    """`python -m flows.serve` registers both deployments; a triggered tune run completes."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    tiny = make_repo(tmp_path / "repo")
    sh(sys.executable, "-m", "dvc", "repro", cwd=tiny)  # tune's upstream stages, as after a run
    before = len(runs(tiny))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-m", "flows.serve", "--params", "params.yaml", "--root", str(tiny)]
    log = (tmp_path / "serve.log").open("w")
    # started as `make prefect &` would be: SIGINT ignored (exec keeps it), which it must undo
    ignoring = ["bash", "-c", 'trap \'\' INT; exec "$0" "$@"', *cmd]
    serve = subprocess.Popen(ignoring, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with get_client(sync_client=True) as client:
            for _ in range(120):
                try:
                    nightly = client.read_deployment_by_name("musegen-pipeline/nightly")
                    hourly = client.read_deployment_by_name("musegen-tune/hourly-tune")
                    break
                except Exception:  # not registered yet
                    assert serve.poll() is None, (tmp_path / "serve.log").read_text()
                    time.sleep(0.5)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]
        assert nightly.schedules[0].schedule.cron == params["pipeline_cron"]
        assert hourly.schedules[0].schedule.cron == params["tune_cron"]
        assert hourly.parameters["root"] == str(tiny)
        assert hourly.schedules[0].schedule.timezone == params["timezone"]

        flow_run = run_deployment("musegen-tune/hourly-tune", timeout=120)
        assert flow_run.state and flow_run.state.is_completed(), flow_run.state
        assert [r["stage"] for r in runs(tiny)[before:]] == ["tune"]  # forced: more trials
        serve.send_signal(signal.SIGINT)
        serve.wait(30)  # raises TimeoutExpired when Ctrl-C is ignored
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        log.close()


@pytest.mark.slow
def test_prefect_e2e_on_the_real_pipeline(prefect_server: None, repo: Path) -> None:
    """The flow over tests/test_e2e.py's tiny (real stages, already reproduced by DVC).

    DVC finds every stage up to date, so the first flow run publishes each artifact from the
    real outputs and the second is all Cached; DVC still agrees afterwards.
    """
    real = repo
    first = pipeline(Path("params.yaml"), real, return_state=True)
    assert first.is_completed(), first
    published = artifacts(first)
    loss = json.loads(published["valid-loss"].data)
    assert [row["step"] for row in loss][-1] == 180 and "valid_loss_pitch" in loss[0]
    assert any(row["status"] == "ok" for row in json.loads(published["manifest-summary"].data))
    assert "models:/musegen@champion" in published["champion"].data
    n_files = len(list((real / "data/raw/m21-keyboard").glob("*.mid")))
    assert f"**m21-keyboard**: {n_files} files, " in published["corpus"].data
    second = pipeline(Path("params.yaml"), real, return_state=True)
    assert set(task_states(second).values()) == {"Cached"}  # DVC found them up to date before
    assert json.loads(sh(sys.executable, "-m", "dvc", "status", "--json", cwd=real)) == {}


def paused_run(timeout: float = 120) -> Any:
    """The flow run that is Paused now (polled)."""
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateName

    only_paused = FlowRunFilter(
        state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"]))
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            found = client.read_flow_runs(flow_run_filter=only_paused)
            if found:
                return found[0]
            time.sleep(0.5)
    raise AssertionError("no flow run paused")


@pytest.mark.slow
def test_pipeline_pauses_after_select_and_a_person_picks_the_step(
    prefect_server: None, tmp_path: Path
) -> None:
    """The form lists each STEP with its numbers; resuming with STEP 2 re-runs select with
    that choice and the later stages follow; DVC agrees afterwards."""
    import threading

    from prefect.flow_runs import resume_flow_run

    tiny = make_repo(tmp_path / "repo", wait_minutes=5)
    done: dict[str, State] = {}
    thread = threading.Thread(
        target=lambda: done.update(state=pipeline(Path("params.yaml"), tiny, return_state=True))
    )
    thread.start()
    run = paused_run()
    assert [r["stage"] for r in runs(tiny)][-1] == "select"  # nothing after select yet
    keys = run.state.state_details.run_input_keyset
    with get_client(sync_client=True) as client:
        text = client.read_flow_run_input(run.id, keys["description"])
        schema = json.loads(client.read_flow_run_input(run.id, keys["schema"]))
    assert "Automatic choice: STEP 1 (proxy: highest sweep score 0.5000)" in text
    assert (
        "| 1 | 1.9000 | 0.5000 | 0 |  |" in text
        and "| 2 | 2.1000 | 0.4000 | 2 | 4.50 (4.00-5.00) | 3 of 4 | +0.41 ± 0.50 |" in text
    )
    assert schema["properties"]["step"]["enum"] == [1, 2]
    resume_flow_run(run.id, run_input={"step": 2})
    thread.join(180)
    assert done["state"].is_completed(), done.get("state")
    stages = [r["stage"] for r in runs(tiny)]
    assert stages[stages.index("select") :] == ["select", "select", "tune", "evaluate", "register"]
    choice = json.loads((tiny / "reports/select/choice.json").read_text())
    assert choice["step"] == 2 and choice["decided_by"] == "person"
    decision = json.loads((tiny / "ratings/decision.json").read_text())
    assert decision["step"] == 2 and decision["clips"] == ["c2"]
    assert json.loads(sh(sys.executable, "-m", "dvc", "status", "--json", cwd=tiny)) == {}


@pytest.mark.slow
def test_pipeline_pause_times_out_to_the_automatic_choice(
    prefect_server: None, tmp_path: Path
) -> None:
    tiny = make_repo(tmp_path / "repo", wait_minutes=0.05)  # 3 s
    state = pipeline(Path("params.yaml"), tiny, return_state=True)
    assert state.is_completed(), state
    assert [r["stage"] for r in runs(tiny)].count("select") == 1
    assert json.loads((tiny / "reports/select/choice.json").read_text())["step"] == 1
    assert not (tiny / "ratings/decision.json").exists()
