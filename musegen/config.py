"""Load one params.yaml section into a frozen dataclass, strictly.

Every default lives in params.yaml; stage modules declare a frozen dataclass whose fields
equal the section's keys. A missing or unknown key is an error naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml

T = TypeVar("T")

#: params.yaml at the repository root unless MUSEGEN_PARAMS names another file.
DEFAULT_PARAMS = Path(os.environ.get("MUSEGEN_PARAMS", "params.yaml"))


class ParamsError(ValueError):
    """params.yaml (or an override file, or a CLI flag) does not match what a stage expects.

    Raised by `check_values` with `key` (the field, e.g. ``max_bars``) and `problem` (what was
    expected) but no source: `load_section` adds the file, `with_flags` the CLI flag, so the
    error blames where the value came from.
    """

    def __init__(self, message: str, key: str | None = None, problem: str = "") -> None:
        super().__init__(message)
        self.key, self.problem = key, problem


#: a rule for one field: (test of the value, what is expected, for the message)
Rule = tuple[Callable[[Any], bool], str]


def at_least(low: float, note: str = "") -> Rule:
    """A rule: a whole number >= `low` (an int `low`), or a finite number >= `low` (a float)."""
    whole = isinstance(low, int)

    def test(value: Any) -> bool:
        kinds = int if whole else int | float
        ok_type = isinstance(value, kinds) and not isinstance(value, bool)
        return ok_type and math.isfinite(value) and value >= low

    return (
        test,
        f"{'a whole number' if whole else 'a number'} >= {low:g}{' ' + note if note else ''}",
    )


def one_of(*choices: str) -> Rule:
    """A rule: one of `choices`."""
    return (lambda value: value in choices), f"one of {', '.join(choices)}"


def check_values(params: object, section: str, rules: Mapping[str, Rule]) -> None:
    """Check fields of a params dataclass (call from its __post_init__).

    Raises:
        ParamsError: naming ``section.field``, the value and what is expected (no source:
            see ParamsError).
    """
    for name, (test, expected) in rules.items():
        value = getattr(params, name)
        if not test(value):
            message = f"{section}.{name} = {value!r}: expected {expected}"
            raise ParamsError(message, key=name, problem=f"expected {expected}")


def with_flags(params: T, flags: Mapping[str, tuple[str, Any]]) -> T:
    """`params` with CLI flag values applied: {field: (flag, value)}, None = not given.

    Raises:
        ParamsError: a flag's value fails the dataclass's checks; the message names the flag.
    """
    given = {name: value for name, (_, value) in flags.items() if value is not None}
    try:
        return dataclasses.replace(params, **given)  # type: ignore[type-var]
    except ParamsError as exc:
        if exc.key not in given:
            raise
        flag = flags[exc.key][0]
        raise ParamsError(f"{flag} {given[exc.key]}: {exc.problem}", exc.key, exc.problem) from None


def repo_root(start: Path | None = None) -> Path | None:
    """The repository root: the nearest folder at or above `start` (default: the working
    directory) holding params.yaml, or None outside any. Paths in params.yaml and the default
    stores (mlflow/mlflow.db, tune.storage) are relative to it, as DVC runs every stage there.
    """
    here = (start or Path.cwd()).resolve()
    return next((d for d in (here, *here.parents) if (d / "params.yaml").is_file()), None)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, raising ParamsError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the repository root)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, found {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`; keys absent from `base` are errors."""
    out = dict(base)
    for key, value in override.items():
        if key not in base:
            raise ParamsError(f"{where}: unknown key {key!r} (known: {', '.join(base)})")
        if isinstance(base[key], dict) and isinstance(value, dict) and base[key]:
            out[key] = merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def read_params(path: Path | str, overrides: tuple[Path | str, ...] = ()) -> dict[str, Any]:
    """The whole params file with `overrides` merged in order (each may only set keys `path`
    has)."""
    data = read_yaml(Path(path))
    for extra in overrides:
        data = merge(data, read_yaml(Path(extra)), str(extra))
    return data


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def load_section(
    cls: type[T],
    section: str,
    path: Path | str = DEFAULT_PARAMS,
    overrides: tuple[Path | str, ...] = (),
) -> T:
    """Build `cls` from section `section` of `path`, after applying override files in order.

    Args:
        cls: a dataclass whose field names are exactly the section's keys.
        section: top-level key of the YAML file (``train``, ``prepare`` …).
        path: the params file.
        overrides: YAML files with the same layout whose values replace those of `path`
            (for example params-gpu.yaml); they may only set keys `path` already has.

    Raises:
        ParamsError: the file, section or a key is missing, or a key is unknown.
    """
    path = Path(path)
    data = read_params(path, overrides)
    if section not in data or not isinstance(data[section], dict):
        raise ParamsError(f"{path}: missing section {section!r}")
    values = data[section]
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    missing = [n for n in names if n not in values]
    if unknown:
        raise ParamsError(
            f"{path}: unknown key {section}.{unknown[0]} (expected: {', '.join(names)})"
        )
    if missing:
        raise ParamsError(f"{path}: missing key {section}.{missing[0]} (add it to the file)")
    try:
        return cls(**{n: _freeze(values[n]) for n in names})
    except ParamsError as exc:
        if exc.key is None:  # a message that names its source already
            raise
        where = ", ".join(str(p) for p in (path, *overrides))
        raise ParamsError(f"{where}: {exc}", exc.key, exc.problem) from None


class StageConfig:
    """Base of a stage's params: a frozen dataclass whose fields are named like params.yaml
    sections, each typed with that section's dataclass (the stage's own section first, then
    the other stages' sections it reads, e.g. the folders their outputs are in).

    Every stage loads the same way, `<Stage>Config.load(params.yaml, overrides)`, and its
    `run(params)` gets all it needs from that one object; CLI flags go on top with
    `with_flags`. Build one directly (tests) from section objects, as any dataclass.
    """

    @classmethod
    def load(
        cls, path: Path | str = DEFAULT_PARAMS, overrides: tuple[Path | str, ...] = ()
    ) -> Self:
        """Each field's section of `path` (after `overrides`), strictly (`load_section`).

        Raises:
            ParamsError: a section or key is missing or unknown, or a value fails its check.
        """
        types = typing.get_type_hints(cls)
        sections = {
            f.name: load_section(types[f.name], f.name, path, overrides)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        }
        return cls(**sections)

    def with_flags(self, section: str, flags: Mapping[str, tuple[str, Any]]) -> Self:
        """These params with CLI flags applied to `section` ({key: (flag, value)}, see
        `with_flags`)."""
        changed = with_flags(getattr(self, section), flags)
        return dataclasses.replace(self, **{section: changed})  # type: ignore[type-var]


def comments(path: Path | str = DEFAULT_PARAMS) -> dict[str, str]:
    """{"section.key": the key's comment} from a params file: the one text documenting a knob.

    A key's comment is the text after `#` on its line, plus comment lines indented under it
    (the CLI builds each flag's help from it). A file that does not exist gives {}.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    found: dict[str, str] = {}
    section = key = None
    for line in path.read_text().splitlines():
        head = re.match(r"^(\w+):\s*(#.*)?$", line)
        item = re.match(r"^  (\w+):[^#]*(?:#\s*(.*))?$", line)
        more = re.match(r"^\s{3,}#\s*(.*)$", line)
        if head:
            section, key = head.group(1), None
        elif item and section:
            key = f"{section}.{item.group(1)}"
            found[key] = (item.group(2) or "").strip()
        elif more and key and found[key]:
            found[key] += " " + more.group(1).strip()
        else:
            key = None
    return found


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@dataclasses.dataclass(frozen=True)
class DataParams:
    """The `data` section: which corpus, and where each stage's files live."""

    corpus: str
    raw_root: str
    prepared_dir: str
    tokens_dir: str

    @property
    def raw_dir(self) -> Path:
        """The corpus folder: raw_root/<corpus>."""
        return Path(self.raw_root) / self.corpus

    @property
    def manifest(self) -> Path:
        return Path(self.prepared_dir) / "manifest.csv"
