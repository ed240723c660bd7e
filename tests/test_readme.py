"""The README's commands, exactly as written, on the end-to-end repo after `dvc repro`.

Each runs through bash in a clean environment (no MLFLOW_* variable, as a new user's shell),
from the repository root and from a folder inside it. Afterwards the only MLflow database is
the repository's mlflow/mlflow.db and the only Optuna one is optuna/optuna.db.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def readme(start: str, lines: int = 1) -> str:
    """The README's line beginning with `start` (and the `lines - 1` after it), as written."""
    text = README.splitlines()
    found = [i for i, line in enumerate(text) if line.strip().startswith(start)]
    assert len(found) == 1, f"README: {len(found)} lines start with {start!r}"
    return "\n".join(line.strip() for line in text[found[0] : found[0] + lines])


def run(script: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, (
        f"{script}\nin {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def stray_stores(repo: Path) -> list[Path]:
    """Databases or MLflow folders anywhere but the repository's own two stores."""
    own = {repo / "mlflow/mlflow.db", repo / "optuna/optuna.db"}
    found = [*repo.rglob("*.db"), *repo.rglob("mlruns")]
    return [p for p in found if p not in own and ".dvc" not in p.parts]


@pytest.fixture(scope="module")
def sub(repo: Path) -> Path:
    """A folder inside the repository, holding a song to continue (a real valid-split piece)."""
    import pandas as pd

    folder = repo / "notebooks"
    folder.mkdir(exist_ok=True)
    manifest = pd.read_csv(repo / "data/prepared/manifest.csv", keep_default_na=False)
    ok = manifest[(manifest.status == "ok") & (manifest.split == "valid")]
    song = ok.sort_values("n_bars").iloc[-1]
    shutil.copy(repo / "data/raw/m21-keyboard" / Path(song.path).name, folder / "song.mid")
    return folder


def test_headline_generate_from_the_root_and_a_subfolder(repo: Path, sub: Path) -> None:
    line = readme("musegen generate --model models:/musegen@champion --n 2")
    for where in (repo, sub):
        run(line, where)
        out = where / "samples"
        for ext in ("mid", "mp3", "png"):
            assert len(list(out.glob(f"sample_seed*.{ext}"))) == 2, (where, ext)
    assert not stray_stores(repo), stray_stores(repo)


def test_generating_section_from_a_subfolder(repo: Path, sub: Path) -> None:
    run(readme("musegen generate --model models:/musegen@champion --prompt song.mid"), sub)
    made = sorted((repo / "samples/generate").glob("song_seed*.mid"))  # generate.out_dir
    assert len(made) == 4, made
    run(readme("musegen generate --checkpoint models/cp/checkpoints/best.pt"), repo)
    assert len(list((repo / "samples/generate").glob("sample_seed*.mp3"))) == 4
    assert not stray_stores(repo), stray_stores(repo)


def test_python_champion_from_a_subfolder(repo: Path, sub: Path) -> None:
    out = run(readme("python -c 'import musegen"), sub)
    assert "midi_base64" in out, out
    out = run(readme("export MLFLOW_TRACKING_URI=", lines=2), sub)
    assert "midi_base64" in out, out
    assert not stray_stores(repo), stray_stores(repo)


def test_tune_from_a_subfolder_uses_the_repositorys_study(repo: Path, sub: Path) -> None:
    def trials() -> int:
        with sqlite3.connect(repo / "optuna/optuna.db") as db:
            return db.execute("select count(*) from trials").fetchone()[0]

    # tune rewrites its DVC outputs: keep them, so the repo stays as `dvc repro` left it
    outputs = [repo / "reports/tune/best_sampling.yaml", repo / "reports/tune/metrics.json"]
    kept = [p.read_bytes() for p in outputs]
    before = trials()
    try:
        run("musegen tune --trials 1", sub)
    finally:
        for path, data in zip(outputs, kept, strict=True):
            path.write_bytes(data)
    assert trials() == before + 1
    assert not stray_stores(repo), stray_stores(repo)
