"""The Prefect flow and dvc.yaml describe the same DAG, so the two cannot drift."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from flows.pipeline import TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_flow_tasks_equal_dvc_stages_in_order() -> None:
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert [t.name for t in TASKS] == stages


def test_every_stage_runs_its_musegen_command() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, entry in stages.items():
        stage = entry.get("do", entry)  # a `foreach` stage (transcribe) defines its cmd in `do`
        assert stage["cmd"].startswith("musegen "), name
        assert name in stage["cmd"], f"stage {name} runs {stage['cmd']!r}"


def dvc_edges(root: Path = ROOT) -> set[tuple[str, str]]:
    """DVC's own DAG (upstream, downstream) from `dvc dag --dot` on `root`'s dvc.yaml; a
    `foreach` stage's generated stages (transcribe@name) count under the stage's name."""
    import re
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "dag", "--dot"]
    dot = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
    return set(re.findall(r'"([\w-]+)(?:@[^"]*)?" -> "([\w-]+)(?:@[^"]*)?"', dot))


def test_flow_dependencies_equal_dvc_dag(tmp_path: Path) -> None:
    """UPSTREAM is DVC's DAG with the optional transcribe stage selected; by default (no
    transcribe.corpora) DVC has the same DAG without it."""
    import subprocess
    import sys

    from flows.pipeline import UPSTREAM

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["transcribe"]["corpora"] = {"mine": "recordings"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True
    )
    edges = dvc_edges(tmp_path)
    assert edges, "dvc dag --dot printed no edges"
    assert {(up, name) for name, ups in UPSTREAM.items() for up in ups} == edges
    assert dvc_edges() == {(up, down) for up, down in edges if up != "transcribe"}
    order = [t.name for t in TASKS]
    for up, down in edges:  # the task order is a topological order of DVC's DAG
        assert order.index(up) < order.index(down), f"{up} must run before {down}"


def stage_code(cmd: str) -> set[Path]:
    """The musegen files a `musegen ...` command runs, derived from imports (not remembered).

    Start from the CLI function the command calls (typer resolves it, so a renamed or moved
    command is found), take its imports, the musegen names it uses from the CLI module's own
    imports and the helpers of that module it calls, then follow every import of every musegen
    module reached, at module level or inside a function (a lazy import runs when the stage
    calls it; counting it always is the safe side). The CLI module itself is the caller, not
    the stage's code: it maps flags to params and is left out.
    """
    import ast
    import importlib
    import importlib.util
    import inspect
    import textwrap
    import tomllib

    import typer

    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    cli_name = script["musegen"].partition(":")[0]
    cli = importlib.import_module(cli_name)
    command = typer.main.get_command(cli.app)
    for word in cmd.split()[1:]:
        if word.startswith("-"):
            break  # the command's options
        command = command.commands[word]  # click groups: `musegen corpus build`

    def is_module(name: str) -> bool:
        parent, _, _ = name.rpartition(".")
        spec = importlib.util.find_spec(parent) if parent else None
        if parent and not (spec and spec.submodule_search_locations):
            return False  # `from musegen.config import x`: x is a name, not a module
        return importlib.util.find_spec(name) is not None

    def imports(tree: ast.AST) -> set[str]:
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("musegen"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if is_module(sub) else node.module)
        return {m for m in found if m.startswith("musegen.")}

    cli_tree = ast.parse(inspect.getsource(cli))
    helpers = {n.name: n for n in cli_tree.body if isinstance(n, ast.FunctionDef)}
    from_top = {
        alias.asname or alias.name: node.module
        for node in cli_tree.body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("musegen.")
        for alias in node.names
    }
    body = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(command.callback))))
    todo, seen_helpers = set(), set()
    bodies = [body]
    while bodies:  # the command, then the CLI helpers it calls
        tree = bodies.pop()
        todo |= imports(tree)
        for name in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}:
            if name in from_top:
                todo.add(from_top[name])
            if name in helpers and name not in seen_helpers:
                seen_helpers.add(name)
                bodies.append(helpers[name])
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name == cli_name:
            continue
        seen.add(name)
        todo |= imports(ast.parse(Path(importlib.util.find_spec(name).origin).read_text()))
    return {Path(importlib.util.find_spec(m).origin).relative_to(ROOT) for m in seen}


def test_dvc_deps_list_the_code_each_stage_runs() -> None:
    """A stage reruns when code it runs changes: its musegen .py deps equal `stage_code`."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, entry in stages.items():
        stage = entry.get("do", entry)
        derived = stage_code(stage["cmd"])
        listed = {Path(d) for d in stage.get("deps", []) if str(d).endswith(".py")}
        if derived != listed:
            missing, extra = sorted(map(str, derived - listed)), sorted(map(str, listed - derived))
            lines = "".join(f"\n      - {p}" for p in sorted(map(str, derived)))
            problems.append(f"{name}: missing {missing}, not run {extra}; its code deps:{lines}")
    assert not problems, "dvc.yaml deps differ from the code each stage runs:\n" + "\n".join(
        problems
    )


def test_editing_the_sampling_module_changes_the_stages_that_sample(tmp_path: Path) -> None:
    """DVC acts on the derived deps: in a fresh git + DVC copy of the project whose stages are
    all recorded (`dvc commit` over placeholder data, so nothing runs), a changed sampling
    rule makes `dvc status` report sweep, tune and evaluate, and no stage before them."""
    import subprocess
    import sys

    from conftest import copy_project

    import musegen.core.sampling

    copy_project(tmp_path)

    def dvc(*args: str) -> str:
        cmd = [sys.executable, "-m", "dvc", *args]
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        proc = subprocess.run(
            cmd, cwd=tmp_path, capture_output=True, text=True, env=env, check=False
        )
        assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q")
    from dvc.repo import Repo

    with Repo(str(tmp_path)) as repo:  # every data dep and out, paths resolved from params
        paths = {Path(o.fs_path) for s in repo.index.stages for o in [*s.deps, *s.outs]}
    for path in paths:  # a file where the name has a suffix, else a folder holding one
        if not path.exists():
            target = path if path.suffix else path / "placeholder"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}\n")
    dvc("commit", "-f", "-q")
    assert "up to date" in dvc("status")
    sampling = tmp_path / Path(musegen.core.sampling.__file__).relative_to(ROOT)
    sampling.write_text(sampling.read_text() + "\n# an edited sampling rule\n")
    changed = set(json.loads(dvc("status", "--json")))
    assert {"sweep", "tune", "evaluate"} <= changed, changed
    assert not {"corpus", "prepare", "tokenize", "train"} & changed, changed


def test_metrics_are_headlines_beside_their_reports(tmp_path: Path) -> None:
    """dvc.yaml's `metrics:` are headline.json files (a few figures: files.HEADLINE_KEYS), each
    beside the full report its stage writes as a plain output (files.write_headline)."""
    from dvc.repo import Repo

    from musegen.files import HEADLINE, write_headline

    with Repo(str(ROOT)) as repo:
        stages = [s for s in repo.index.stages if s.cmd]
        declared = [o for s in stages for o in s.outs if o.metric]
        for stage in stages:
            reports = {Path(o.fs_path).parent for o in stage.outs if not o.metric}
            for out in (o for o in stage.outs if o.metric):
                assert Path(out.fs_path).name == HEADLINE, (stage.name, out.def_path)
                assert Path(out.fs_path).parent in reports, (stage.name, out.def_path)
    assert len(declared) >= 7  # prepare .. evaluate
    report = tmp_path / "metrics.json"
    assert write_headline(report, step=3, test_score=None) == tmp_path / HEADLINE
    assert json.loads((tmp_path / HEADLINE).read_text()) == {"step": 3}  # None is left out
    with pytest.raises(ValueError, match="'pitch_range'"):
        write_headline(report, pitch_range=1.0)  # a figure outside the short list
