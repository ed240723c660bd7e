"""The package layout: README's map of the code matches the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_map() -> str:
    """The fenced tree under README's "Where the code lives"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Where the code lives", 1)[1]
    return section.split("```", 2)[1]


def test_readme_map_names_every_module_and_only_real_ones() -> None:
    tree = readme_map()
    words = set(re.findall(r"[\w.]+", tree))
    modules = [p for p in (ROOT / "musegen").rglob("*.py") if not p.name.startswith("__")]
    missing = [
        str(p.relative_to(ROOT)) for p in modules if p.stem not in words and p.name not in words
    ]
    assert not missing, f"README's code map does not mention {missing}"
    folders = [p.name for p in (ROOT / "musegen").iterdir() if (p / "__init__.py").is_file()]
    assert all(f"{f}/" in tree for f in folders), f"README's code map lacks a folder of {folders}"
    named = set(re.findall(r"\b(\w+\.py)\b", tree))
    real = {p.name for p in [*modules, *(ROOT / "flows").glob("*.py")]}
    assert named <= real, f"README's code map names files that do not exist: {named - real}"
