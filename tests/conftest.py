"""Shared fixtures: real MIDI from the embedded corpus, isolated stores for Prefect and MLflow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Prefect and MLflow read their settings at import: isolate them before any test imports them.
_HOME = Path(tempfile.mkdtemp(prefix="musegen-test-"))
os.environ.setdefault("PREFECT_HOME", str(_HOME / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_HOME / 'mlflow.db'}")

ROOT = Path(__file__).resolve().parents[1]

#: varied real pieces: 2/4 rag, 4/4 sonata, 3/4 mazurka (repeat fallback), lead sheet with
#: chord symbols, voice + piano, and chorales (four voices merged, unisons).
REAL_SOURCES = (
    "joplin/maple_leaf_rag.mxl",
    "mozart/k545/movement1_exposition.mxl",
    "chopin/mazurka06-2.krn",
    "leadSheet/berlinAlexandersRagtime.mxl",
    "schubert/Lindenbaum.xml",
    "schoenberg/opus19/movement2.mxl",
    "bach/bwv269",
    "bach/bwv347",
    "bach/bwv355",
)


@pytest.fixture(scope="session")
def real_midi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real pieces built by the corpus stage, plus miditoolkit's Pop1K7 example."""
    import shutil

    from miditoolkit.midi.utils import example_midi_file

    from musegen import corpus
    from musegen.config import load_section

    out = tmp_path_factory.mktemp("real") / "m21"
    params = load_section(corpus.CorpusParams, "corpus", ROOT / "params.yaml")
    corpus.build_m21(out, params, sources=REAL_SOURCES)
    shutil.copy(example_midi_file(), out / "pop1k7__1390.mid")
    return out


@pytest.fixture(scope="session")
def real_midi_files(real_midi_dir: Path) -> list[Path]:
    """The real MIDI files (ids in parametrized tests are the file names)."""
    return sorted(real_midi_dir.glob("*.mid"))


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole run (startup is ~10-15 s on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prepared_corpus(real_midi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real pieces run through the real prepare stage (wide hash splits: 9 files).

    Returns paths: raw_dir, manifest (test split non-empty).
    """
    import dataclasses

    from musegen import prepare
    from musegen.config import load_section

    out = tmp_path_factory.mktemp("prepared")
    params = load_section(prepare.PrepareParams, "prepare", ROOT / "params.yaml")
    params = dataclasses.replace(params, valid_percent=20, test_percent=45, num_workers=1)
    manifest = prepare.prepare(real_midi_dir, out, params)
    assert (manifest.split == "test").sum() >= 2, manifest[["path", "split"]]
    return {"raw_dir": real_midi_dir, "manifest": out / "manifest.csv"}
