"""The project's three UIs at once: MLflow (runs), Prefect (flows), optuna-dashboard (studies).

`musegen ui` starts each server against the project's own stores (the MLflow tracking URI,
PREFECT_HOME under .prefect/, tune.storage), waits until each answers HTTP 200, prints the
URLs and stops them all on Ctrl-C. Each server runs in its own process group, so stopping it
stops whatever workers it spawned: nothing is left behind. Ports and host come from the
params.yaml `serve:` section (the same section flows/serve.py reads for its schedules).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from musegen.config import Rule, StageConfig, at_least, check_values
from musegen.stages.choice import TuneParams
from musegen.tracking import tracking_uri

BIN = Path(sys.executable).parent


@dataclasses.dataclass(frozen=True)
class ServeParams:
    """The `serve` section: UI ports, schedules, and the flow's task runner."""

    host: str
    prefect_port: int
    mlflow_port: int
    optuna_port: int
    pipeline_cron: str
    tune_cron: str
    timezone: str
    task_runner: str
    dask_address: str
    num_dask_workers: int

    def __post_init__(self) -> None:
        port: Rule = (lambda v: isinstance(v, int) and 0 < v < 65536, "a port in 1..65535")
        ports = dict.fromkeys(("prefect_port", "mlflow_port", "optuna_port"), port)
        check_values(self, "serve", {**ports, "num_dask_workers": at_least(1)})


@dataclasses.dataclass(frozen=True)
class UiConfig(StageConfig):
    """What `musegen ui` reads: hosts and ports, and the Optuna storage it shows."""

    serve: ServeParams
    tune: TuneParams


@dataclasses.dataclass(frozen=True)
class Server:
    """One server process: its command, where it answers, and its log file."""

    name: str
    cmd: list[str]
    url: str  # what a person opens
    health: str  # answers 200 once the server is ready
    env: dict[str, str] = dataclasses.field(default_factory=dict)


class ServerError(RuntimeError):
    """A server exited or did not become healthy in time."""


def prefect_server(p: ServeParams, root: Path) -> Server:
    """Prefect server + UI, its database under $PREFECT_HOME (default <root>/.prefect)."""
    home = os.environ.get("PREFECT_HOME") or str(root / ".prefect")
    url = f"http://{p.host}:{p.prefect_port}"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", p.host, "--port", str(p.prefect_port)]
    env = {"PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return Server("prefect", cmd, url, f"{url}/api/health", env)


def mlflow_server(p: ServeParams, root: Path) -> Server:
    """MLflow UI on the tracking store (<root>/mlflow/mlflow.db unless $MLFLOW_TRACKING_URI)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # the folder must exist (a relative URI: from the root)
        (root / uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{p.host}:{p.mlflow_port}"
    cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", uri, "--workers", "1"]
    cmd += ["--host", p.host, "--port", str(p.mlflow_port)]
    return Server("mlflow", cmd, url, f"{url}/health")


def optuna_dashboard(p: ServeParams, root: Path, storage: str, artifact_dir: str) -> Server:
    """optuna-dashboard on tune.storage (an RDB URL, or journal:///path for a journal log)."""
    from musegen.stages.tune import open_storage

    with contextlib.chdir(root):  # the dashboard opens tables; it does not create them
        open_storage(storage)
    if storage.startswith("journal://"):
        storage = storage.removeprefix("journal://")  # the dashboard takes the log's path
    (root / artifact_dir).mkdir(parents=True, exist_ok=True)
    url = f"http://{p.host}:{p.optuna_port}"
    cmd = [str(BIN / "optuna-dashboard"), storage, "--artifact-dir", artifact_dir]
    cmd += ["--host", p.host, "--port", str(p.optuna_port)]
    return Server("optuna", cmd, f"{url}/dashboard", f"{url}/dashboard")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # refused, reset, timed out, HTTP errors (URLError/HTTPError are OSErrors)
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGINT the server's process group, then SIGTERM, then SIGKILL, until the group is empty."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader; its workers may outlive it a moment
            if not _group_alive(proc.pid):
                return
            time.sleep(0.1)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def stop_on_signals() -> None:
    """Make Ctrl-C and SIGTERM (a supervisor, `kill`) raise KeyboardInterrupt here.

    Also when started from a script that left SIGINT ignored: `make prefect &` in a
    non-interactive shell starts us with SIGINT set to SIG_IGN, and a Ctrl-C would do nothing.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


@contextlib.contextmanager
def running(
    servers: list[Server], root: Path, timeout_s: float = 180.0
) -> Iterator[list[subprocess.Popen]]:
    """Start `servers` (each in its own process group), yield once all answer, stop them all.

    Raises:
        ServerError: a server exited early or was not healthy within `timeout_s`; the message
            names its log file.
    """
    logs = Path(tempfile.mkdtemp(prefix="musegen-ui-"))
    procs: list[subprocess.Popen] = []
    try:
        for server in servers:
            with (logs / f"{server.name}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        server.cmd,
                        cwd=root,
                        env={**os.environ, **server.env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # own process group: Ctrl-C is ours to relay
                    )
                )
        pending = dict(zip((s.name for s in servers), servers, strict=True))
        deadline = time.monotonic() + timeout_s
        while pending:
            for server, proc in zip(servers, procs, strict=True):
                if proc.poll() is not None:
                    raise ServerError(
                        f"{server.name} exited with {proc.returncode}: see {logs}/{server.name}.log"
                    )
                if server.name in pending and _answers(server.health):
                    print(f"{server.name:8s} {server.url}", flush=True)
                    del pending[server.name]
            if pending and time.monotonic() > deadline:
                raise ServerError(
                    f"not healthy after {timeout_s:.0f} s: {', '.join(pending)} "
                    f"(logs in {logs}); is the port taken? set it in params.yaml serve:"
                )
            time.sleep(0.5)
        yield procs
    finally:
        with _signals_held():  # a second Ctrl-C must not leave a server half-stopped
            for proc in procs:
                _stop(proc)


def ui(params: UiConfig, root: Path) -> None:
    """Serve the MLflow UI, the Prefect server and optuna-dashboard until Ctrl-C (or one exits).

    Raises:
        ServerError: a server failed to start or exited.
    """
    p, tune = params.serve, params.tune
    servers = [
        mlflow_server(p, root),
        prefect_server(p, root),
        optuna_dashboard(p, root, tune.storage, tune.artifact_dir),
    ]
    stop_on_signals()
    print("starting MLflow, Prefect and optuna-dashboard (MLflow takes ~15-35 s) ...", flush=True)
    with contextlib.suppress(KeyboardInterrupt), running(servers, root) as procs:
        print("all up; Ctrl-C stops them", flush=True)
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
        dead = [s.name for s, proc in zip(servers, procs, strict=True) if proc.poll() is not None]
        raise ServerError(f"{', '.join(dead)} exited; stopping the others")
    print("stopped", flush=True)
