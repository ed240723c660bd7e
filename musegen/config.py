"""Load one params.yaml section into a frozen dataclass, strictly.

Every default lives in params.yaml; stage modules declare a frozen dataclass whose fields
equal the section's keys. A missing or unknown key is an error naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

#: params.yaml at the repository root unless MUSEGEN_PARAMS names another file.
DEFAULT_PARAMS = Path(os.environ.get("MUSEGEN_PARAMS", "params.yaml"))


class ParamsError(ValueError):
    """params.yaml (or an override file) does not match what a stage expects."""


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
    data = read_yaml(path)
    for extra in overrides:
        data = merge(data, read_yaml(Path(extra)), str(extra))
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
    return cls(**{n: _freeze(values[n]) for n in names})


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
