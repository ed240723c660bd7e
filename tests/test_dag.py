"""The Prefect flow and dvc.yaml describe the same DAG, so the two cannot drift."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.pipeline import TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_flow_tasks_equal_dvc_stages_in_order() -> None:
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert [t.name for t in TASKS] == stages


def test_every_stage_runs_its_musegen_command() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"].startswith("musegen "), name
        assert name in stage["cmd"], f"stage {name} runs {stage['cmd']!r}"


def dvc_edges() -> set[tuple[str, str]]:
    """DVC's own DAG (upstream, downstream) from `dvc dag --dot` on this repo's dvc.yaml."""
    import re
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "dag", "--dot"]
    dot = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(re.findall(r'"([\w-]+)" -> "([\w-]+)"', dot))


def test_flow_dependencies_equal_dvc_dag() -> None:
    from flows.pipeline import UPSTREAM

    edges = dvc_edges()
    assert edges, "dvc dag --dot printed no edges"
    assert {(up, name) for name, ups in UPSTREAM.items() for up in ups} == edges
    order = [t.name for t in TASKS]
    for up, down in edges:  # the task order is a topological order of DVC's DAG
        assert order.index(up) < order.index(down), f"{up} must run before {down}"
