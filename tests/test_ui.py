"""`musegen ui`: the three servers answer on fresh stores, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_ui_serves_three_uis_and_ctrl_c_stops_them_all(tmp_path: Path) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    ports = {"prefect": free_port(), "mlflow": free_port(), "optuna": free_port()}
    urls = {
        "prefect": f"http://127.0.0.1:{ports['prefect']}/api/health",
        "mlflow": f"http://127.0.0.1:{ports['mlflow']}/health",
        "optuna": f"http://127.0.0.1:{ports['optuna']}/dashboard",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")  # fresh stores, all under tmp_path
    cmd = [str(Path(sys.executable).parent / "musegen"), "ui"]
    cmd += [f"--{name}-port={port}" for name, port in ports.items()]
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while not (tmp_path / "ui.log").read_text().count("all up"):
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "ui.log").read_text()
            time.sleep(1)
        for name, url in urls.items():
            assert answers(url), name
        printed = (tmp_path / "ui.log").read_text()
        for port in ports.values():
            assert f"http://127.0.0.1:{port}" in printed
        assert (tmp_path / "mlflow/mlflow.db").exists()  # the project's stores, not ~/.x
        assert (tmp_path / "optuna/optuna.db").exists()
        assert (tmp_path / ".prefect").is_dir()
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3

        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
        assert proc.wait(60) == 0, (tmp_path / "ui.log").read_text()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
        assert not any(answers(url) for url in urls.values())
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
