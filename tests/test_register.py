"""The registry round trip on a real sqlite MLflow store in a temporary folder.

Register a tiny checkpoint, load `models:/musegen@champion`, predict (compose) MIDI with
notes; register again: version 2, the alias moved, version 1 still there with its tags.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import miditoolkit
import pandas as pd
import pytest
from test_sweep import PARAMS, make_checkpoint

from musegen import register as stage
from musegen.config import load_section
from musegen.sampling import SampleParams


@pytest.fixture(scope="module")
def prompt(real_midi_dir: Path) -> Path:
    """A real chorale without same-pitch overlaps as the prompt.

    (Where two merged voices overlap on one pitch, a MIDI reader pairs note-offs first in,
    first out, so a written prompt cannot keep both: see the README's limits.)
    """
    return real_midi_dir / "bach__bwv355.mid"


def kept(got: list[tuple[int, int]], real: list[tuple[int, int]], bars: int = 2) -> bool:
    """Does a piece (start, pitch) open with the real one's first `bars` bars, note for note?

    The last prompt bar is open (the prompt ends before the next Bar word): the continuation
    may add notes to it, at or after the prompt's last onset; the bars before it are equal.
    """
    cut, end = (bars - 1) * 1920, bars * 1920
    if [x for x in got if x[0] < cut] != [x for x in real if x[0] < cut]:
        return False
    last = [x for x in real if cut <= x[0] < end]
    added = [x for x in got if cut <= x[0] < end and x not in last]
    return set(last) <= set(got) and all(x[0] >= max(last)[0] for x in added)


def params(**changes: object) -> stage.RegisterParams:
    return dataclasses.replace(load_section(stage.RegisterParams, "register", PARAMS), **changes)


@pytest.fixture(scope="module")
def store(training_run: dict) -> dict:
    """The training run's store with step_1, step_2 and best.pt (= step_1)."""
    tmp, run_id = training_run["tmp"], training_run["run_id"]
    ckpts = tmp / "checkpoints"
    make_checkpoint(ckpts / "step_1.pt", 1, 1, run_id)
    make_checkpoint(ckpts / "step_2.pt", 2, 2, run_id)
    make_checkpoint(ckpts / "best.pt", 1, 1, run_id)
    (tmp / "sweep.json").write_text(json.dumps({"best_step": 2}))
    return {"tmp": tmp, "ckpts": ckpts, "run_id": run_id, "sweep": tmp / "sweep.json"}


@pytest.fixture(scope="module")
def sample() -> SampleParams:
    return load_section(SampleParams, "sample", PARAMS)


def test_choose_checkpoint(store: dict) -> None:
    ckpts, sweep = store["ckpts"], store["sweep"]
    assert stage.choose_checkpoint(params(choose="best_valid"), ckpts, sweep).name == "best.pt"
    assert stage.choose_checkpoint(params(choose="best_sweep"), ckpts, sweep).name == "step_2.pt"
    pick = stage.choose_checkpoint(params(choose="step", step=1), ckpts, sweep)
    assert pick.name == "step_1.pt"
    with pytest.raises(FileNotFoundError, match=r"step_9\.pt.*step_1\.pt"):
        stage.choose_checkpoint(params(choose="step", step=9), ckpts, sweep)
    with pytest.raises(FileNotFoundError, match="run `musegen sweep` first"):
        stage.choose_checkpoint(params(choose="best_sweep"), ckpts, store["tmp"] / "no.json")


def test_params_reject_unknown_choice() -> None:
    from musegen.config import ParamsError

    with pytest.raises(ParamsError, match=r"register\.choose"):
        params(choose="latest")


def test_register_load_by_alias_predict_and_reregister(
    store: dict, sample: SampleParams, prompt: Path
) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    limits = stage.limits_for(PARAMS)
    v1 = stage.register(params(choose="step", step=1), store["ckpts"], sample, limits=limits)
    assert str(v1.version) == "1" and v1.tags["step"] == "1"
    assert str(client.get_model_version_by_alias("musegen", "champion").version) == "1"
    # the registering run is a child of the training run (same experiment)
    reg_run = client.get_run(v1.tags["register_run_id"])
    assert reg_run.data.tags["mlflow.parentRunId"] == store["run_id"]

    model = mlflow.pyfunc.load_model("models:/musegen@champion")
    inputs = pd.DataFrame(
        {
            "seed": [0, 0, 1],
            "bars": [3, 3, 3],
            "prompt": ["", "", base64.b64encode(prompt.read_bytes()).decode()],
            "prompt_bars": [None, None, 2],
        }
    )
    out = model.predict(inputs)
    assert list(out.columns) == ["midi_base64", "n_words", "n_notes"] and len(out) == 3
    assert out.midi_base64[0] == out.midi_base64[1]  # same seed, same piece
    midis = [miditoolkit.MidiFile(file=io.BytesIO(base64.b64decode(b))) for b in out.midi_base64]
    for midi, n_notes in zip(midis, out.n_notes, strict=True):
        notes = midi.instruments[0].notes
        assert len(notes) == n_notes > 0
        assert max(n.start for n in notes) < 3 * 1920 + 2 * 1920  # bar caps held
    # with a prompt: the piece opens with the prompt's first two bars, note for note
    from musegen.tokenizer import get_tokenizer

    tok = get_tokenizer("cp")
    real = tok.decode(tok.encode(prompt)).instruments[0].notes
    got = [(n.start, n.pitch) for n in midis[2].instruments[0].notes]
    real = [(n.start, n.pitch) for n in real]
    assert kept(got, real)

    v2 = stage.register(
        params(choose="best_sweep"),
        store["ckpts"],
        sample,
        limits=limits,
        sweep_metrics=store["sweep"],
    )
    assert str(v2.version) == "2" and v2.tags["step"] == "2" and v2.tags["choose"] == "best_sweep"
    assert str(client.get_model_version_by_alias("musegen", "champion").version) == "2"
    old = client.get_model_version("musegen", "1")
    assert old.tags["step"] == "1" and "champion" not in old.aliases
    assert {str(v.version) for v in client.search_model_versions("name = 'musegen'")} == {"1", "2"}
    # the stored sampling settings travel with the version
    local = mlflow.artifacts.download_artifacts(
        "models:/musegen/2", dst_path=str(store["tmp"] / "v2")
    )
    stored = next(Path(local).rglob("sampling.yaml")).read_text()
    assert "temperature" in stored and "top_p" in stored
