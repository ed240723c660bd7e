"""One store rule: the repository's MLflow store from any folder inside it, and no ./mlflow.db.

The suite sets MLFLOW_TRACKING_URI for every test (conftest); these tests remove it, as a user's
shell has it, to check the default. The README's commands on a real trained repository run in
test_readme.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from musegen import tracking
from musegen.config import repo_root

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository folder (params.yaml) with a subfolder; cwd = the subfolder, no store set."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_repo_root_is_the_folder_holding_params(fresh: Path) -> None:
    assert repo_root() == fresh.resolve()
    assert repo_root(fresh / "notebooks") == fresh.resolve()
    assert repo_root(Path("/")) is None


def test_default_store_is_the_repositorys_from_a_subfolder(fresh: Path) -> None:
    assert tracking.tracking_uri() == f"sqlite:///{fresh.resolve() / 'mlflow/mlflow.db'}"


def test_env_var_names_another_store(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking.tracking_uri() == "http://127.0.0.1:9"


def test_outside_a_repository_is_an_error_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(tracking.TrackingError, match="MLFLOW_TRACKING_URI"):
        tracking.tracking_uri()


def test_reading_a_store_that_does_not_exist_creates_nothing(fresh: Path) -> None:
    with pytest.raises(tracking.TrackingError, match="make demo"):
        tracking.open_store()
    assert not list(fresh.rglob("*.db"))


def test_generate_model_without_a_store_fails_in_one_line_and_leaves_no_db(fresh: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [str(BIN / "musegen"), "generate", "--model", "models:/musegen@champion", "--n", "1"],
        cwd=fresh / "notebooks",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "make demo" in proc.stderr, proc.stderr
    assert str(fresh.resolve() / "mlflow/mlflow.db") in proc.stderr
    assert not list(fresh.rglob("*.db")), list(fresh.rglob("*"))
