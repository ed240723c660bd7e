"""Every stage has one shape: `run(params: <Stage>Config, ...) -> <Stage>Result`, and the CLI
only maps flags to params: it loads each stage's config and calls its `run`, nothing else."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import typing
from pathlib import Path

import pytest
import yaml

from musegen.config import StageConfig

ROOT = Path(__file__).resolve().parents[1]
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def camel(name: str) -> str:
    return name.title().replace("_", "")


@pytest.mark.parametrize("name", STAGES)
def test_stage_runs_with_its_config_and_returns_its_result(name: str) -> None:
    module = importlib.import_module(f"musegen.stages.{name}")
    hints = typing.get_type_hints(module.run)
    first = next(iter(inspect.signature(module.run).parameters))
    config, result = hints[first], hints["return"]
    assert first == "params"
    assert config.__name__ == f"{camel(name)}Config" and issubclass(config, StageConfig)
    assert result.__name__ == f"{camel(name)}Result"
    for cls in (config, result):  # frozen dataclasses
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
    # the stage's own section comes first; every field is a section of params.yaml
    fields = [f.name for f in dataclasses.fields(config)]
    assert fields[0] == name, fields
    loaded = config.load(ROOT / "params.yaml")
    assert [type(getattr(loaded, f)) for f in fields] == [
        typing.get_type_hints(config)[f] for f in fields
    ]
    # the result is read back from the stage's outputs (what flows and the CLI show)
    assert isinstance(inspect.getattr_static(result, "read"), classmethod)
    assert list(inspect.signature(result.read).parameters)[:2] == ["params", "root"]


def cli_stage_names() -> dict[str, set[str]]:
    """{stage module: the names cli.py uses from it} (imports, and attributes of a module
    imported as a name: `from musegen.stages import prepare as stage` ... `stage.run`), read
    per function, as each command imports its stage under the same local name."""
    tree = ast.parse((ROOT / "musegen/apps/cli.py").read_text())
    used: dict[str, set[str]] = {}
    top = [n for n in tree.body if not isinstance(n, ast.FunctionDef)]
    bodies = [top, *(n.body for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))]
    for body in bodies:
        alias: dict[str, str] = {}  # local name -> stage module
        for node in (n for stmt in body for n in ast.walk(stmt)):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.module == "musegen.stages":
                alias |= {a.asname or a.name: a.name for a in node.names}
            elif (node.module or "").startswith("musegen.stages."):
                stage = node.module.rsplit(".", 1)[1]
                used.setdefault(stage, set()).update(a.name for a in node.names)
        for node in (n for stmt in body for n in ast.walk(stmt)):
            named = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            if named and node.value.id in alias:
                used.setdefault(alias[node.value.id], set()).add(node.attr)
    return used


#: commands that are not the DVC stage: installing Pop1K7 by hand (then named in
#: data.corpus), comparing any two folders of MIDI
BY_HAND = {"corpus": {"fetch_pop1k7"}, "evaluate": {"compare"}}


def test_cli_uses_only_run_config_result_and_errors_of_a_stage() -> None:
    """The contracts between stages (which checkpoint, which sampling, which paths) live in
    the stages and in musegen.stages.choice (what select and tune chose), never in cli.py."""
    used = cli_stage_names()
    assert set(STAGES) <= set(used), "cli.py must call every stage's run"
    for stage, names in used.items():
        if stage not in STAGES:
            continue  # musegen.stages.choice: the contract itself, read by whoever composes
        odd = {
            n
            for n in names
            if n != "run"
            and not n.endswith(("Config", "Result", "Error"))
            and n not in BY_HAND.get(stage, set())
        }
        assert not odd, f"cli.py uses {sorted(odd)} of musegen.stages.{stage}: move it into run"


def test_cli_loads_params_only_through_a_config() -> None:
    """No section loaded ad hoc, no derived path spelled: a command loads `<X>Config.load`."""
    tree = ast.parse((ROOT / "musegen/apps/cli.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
              for a in n.names}  # fmt: skip
    assert not names & {"load_section", "read_yaml", "paths"}, names & {"load_section", "paths"}
