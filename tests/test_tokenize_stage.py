"""The tokenize stage on real files: the token-array contract, metrics, skipped files, workers."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from musegen.config import ParamsError, load_section
from musegen.core.tokenizer import get_tokenizer, load_tokenizer
from musegen.stages import prepare as prep
from musegen.stages import tokenize as stage

ROOT = Path(__file__).resolve().parents[1]


def params(tmp_path: Path, **changes) -> stage.TokenizeParams:
    p = load_section(stage.TokenizeParams, "tokenize", ROOT / "params.yaml")
    return dataclasses.replace(p, metrics=str(tmp_path / "metrics.json"), **changes)


@pytest.fixture(scope="module")
def prepared(real_midi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(raw dir, manifest) from the real prepare stage, with large valid/test shares."""
    raw = tmp_path_factory.mktemp("raw")
    for path in real_midi_dir.glob("*.mid"):
        shutil.copy(path, raw / path.name)
    p = load_section(prep.PrepareParams, "prepare", ROOT / "params.yaml")
    p = dataclasses.replace(p, num_workers=1, valid_percent=30, test_percent=30)
    out = tmp_path_factory.mktemp("prepared")
    prep.prepare(raw, out, p)
    return raw, out / "manifest.csv"


def test_params_section_loads_and_rejects_unknown_representation(tmp_path: Path) -> None:
    p = params(tmp_path)
    assert set(p.representations) == {"cp", "remi"}
    with pytest.raises(ParamsError, match=r"tokenize\.representations .* \['midi'\]"):
        dataclasses.replace(p, representations=("midi",))


def test_arrays_follow_the_contract(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    raw, manifest = prepared
    table = prep.read_manifest(manifest)
    ok = table[table.status == "ok"]
    out = stage.tokenize(raw, manifest, tmp_path / "tokens", params(tmp_path, num_workers=1))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["failed"] == 0
    for rep in ("cp", "remi"):
        vocab = json.loads((out / rep / "vocab.json").read_text())
        tok = load_tokenizer(out / rep)  # vocab.json alone decodes
        for split in stage.SPLITS:
            tokens = np.load(out / rep / f"{split}.npy")
            offsets = np.load(out / rep / f"{split}_offsets.npy")
            paths = list(ok[ok.split == split].path)
            assert tokens.dtype == np.int32 and offsets.dtype == np.int64
            assert tokens.shape[1:] == ((8,) if rep == "cp" else ())
            assert offsets[0] == 0 and offsets[-1] == len(tokens) and len(offsets) == len(paths) + 1
            assert metrics["songs"][split] == len(paths) == metrics[rep][split]["songs"]
            if rep == "cp":
                assert vocab["fields"][0] == "type"
                eos = vocab["events"]["type"].index("EOS")
                last = tokens[offsets[1:] - 1, 0] if paths else []
            else:
                eos = vocab["events"]["token"].index("EOS")
                last = tokens[offsets[1:] - 1] if paths else []
            assert all(x == eos for x in last), f"{rep}/{split}: a song does not end with EOS"
            for k, rel in enumerate(paths):  # song k is exactly the file's own encoding
                song = tokens[offsets[k] : offsets[k + 1]]
                assert np.array_equal(song, get_tokenizer(rep).encode(raw / rel)), rel
                assert tok.check(song) == 0, rel
    assert sum(metrics["songs"].values()) == len(ok) >= 8
    assert metrics["remi_tokens_per_cp_word"]["train"] > 2  # CP groups 3-4 REMI tokens a word


def test_workers_give_the_same_arrays(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    raw, manifest = prepared
    one = stage.tokenize(raw, manifest, tmp_path / "one", params(tmp_path, num_workers=1))
    two = stage.tokenize(raw, manifest, tmp_path / "two", params(tmp_path, num_workers=2))
    for a in sorted(one.rglob("*.npy")):
        assert np.array_equal(np.load(a), np.load(two / a.relative_to(one))), a.name


def test_file_failing_after_prepare_is_named_and_skipped(
    prepared: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, manifest = prepared
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    table = prep.read_manifest(manifest)
    victim = table[table.status == "ok"].path.iloc[0]
    data = (broken / victim).read_bytes()
    (broken / victim).write_bytes(data[: len(data) // 2])  # cut after prepare checked it
    out = stage.tokenize(broken, manifest, tmp_path / "tokens", params(tmp_path, num_workers=1))
    assert f"skipped {broken / victim}: MidiError" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["failed"] == 1 and metrics["failed_files"] == [victim]
    n_ok = int((table.status == "ok").sum())
    total = sum(len(np.load(out / "cp" / f"{s}_offsets.npy")) - 1 for s in stage.SPLITS)
    assert total == n_ok - 1 == sum(metrics["songs"].values())


def test_missing_manifest_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.csv: manifest not found.*prepare"):
        stage.tokenize(tmp_path, tmp_path / "manifest.csv", tmp_path / "t", params(tmp_path))
