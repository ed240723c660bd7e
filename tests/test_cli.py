"""The CLI is a thin map from flags to params.yaml's knobs: same names, help from one text."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from musegen.apps import cli

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def commands(group: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path ("corpus", "build") under `group`."""
    subs = getattr(group, "commands", None)
    if subs is None:
        return [path]
    return [p for name, sub in subs.items() for p in commands(sub, (*path, name))]


ROOT_COMMAND = typer.main.get_command(cli.app)
ALL = commands(ROOT_COMMAND)


def help_text(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(cli.app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", ALL, ids=" ".join)
def test_help_names_only_real_keys_and_shows_no_bool_placeholder(path: tuple[str, ...]) -> None:
    text = help_text(path)
    assert "<bool>" not in text
    files = r"(?!(?:json|csv|yaml|html|mid|pt)\b)"  # generate.json is a file, not a key
    for section, key in re.findall(rf"\b({'|'.join(PARAMS)})\.{files}(\w+)\b", text):
        assert key in PARAMS[section], f"musegen {' '.join(path)} --help names {section}.{key}"


def test_every_knob_flag_answers_to_its_params_name_with_its_params_comment() -> None:
    knobs = 0
    for path in ALL:
        command = ROOT_COMMAND
        for name in path:
            command = command.commands[name]
        for option in command.params:
            found = re.match(rf"({'|'.join(PARAMS)})\.(\w+): ", option.help or "")
            if not found:
                continue
            knobs += 1
            section, key = found.groups()
            names = [*option.opts, *option.secondary_opts]
            assert f"--{key}" in names, f"musegen {' '.join(path)}: {names} lacks --{key}"
            doc = cli.DOCS[f"{section}.{key}"]  # listen's --trials has its own words
            assert doc in option.help or path == ("listen",), f"{section}.{key}: {option.help}"
    assert knobs >= 15


def test_short_flags_and_params_names_set_the_same_knob(tmp_path: Path) -> None:
    """`--bars 0` and `--max_bars 0` fail the same check, each naming the first flag."""
    runner = CliRunner()
    for flag in ("--bars", "--max_bars"):
        result = runner.invoke(cli.app, ["generate", flag, "-5"])
        assert result.exit_code != 0
        assert "--bars -5: expected a whole number >= 0" in str(result.exception or result.output)


def test_every_command_with_params_takes_override_profiles(tmp_path: Path) -> None:
    """--params FILE and --override FILE (repeatable) go together on every command, and a
    profile's value reaches the stage: a bad value in it is refused naming the key."""
    with_params = [p for p in ALL if "--params" in help_text(p)]
    assert len(with_params) >= 15
    for path in with_params:
        assert "--override" in help_text(path), f"musegen {' '.join(path)} lacks --override"
    bad = tmp_path / "profile.yaml"
    bad.write_text("select:\n  by: coin_flip\n")
    result = CliRunner().invoke(
        cli.app, ["select", "--params", str(ROOT / "params.yaml"), "--override", str(bad)]
    )
    assert result.exit_code != 0
    assert "select.by" in str(result.exception or result.output)
    assert "coin_flip" in str(result.exception or result.output)
