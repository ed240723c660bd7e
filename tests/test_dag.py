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
