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
    real = {p.name for d in ("flows", "bench", "tests") for p in (ROOT / d).glob("*.py")}
    real |= {p.name for p in modules}
    assert named <= real, f"README's code map names files that do not exist: {named - real}"


def test_readme_map_names_every_flow_and_bench_and_where_to_change_things() -> None:
    """Every flow and bench script is on the map (a new one must join it), and the paragraph
    under the map that says where to change the model, the sampling, a stage and the CLI
    names files and folders that exist."""
    tree = readme_map()
    named = set(re.findall(r"\b(\w+\.py)\b", tree))
    scripts = [p for d in ("flows", "bench") for p in (ROOT / d).glob("*.py")]
    missing = [str(p.relative_to(ROOT)) for p in scripts if not p.name.startswith("__")]
    missing = [m for m in missing if Path(m).name not in named]
    assert not missing, f"README's code map does not mention {missing}"
    text = (ROOT / "README.md").read_text().split("## Where the code lives", 1)[1]
    after = text.split("```", 2)[2].split("\n## ", 1)[0]
    where = re.findall(r"`((?:musegen|flows)/[\w/.]*)`", after)
    for what in ("core/model.py", "core/sampling.py", "stages/", "apps/cli.py"):
        assert f"musegen/{what}" in where, f"README does not say where to change {what}"
    assert all((ROOT / w).exists() for w in where), [w for w in where if not (ROOT / w).exists()]
