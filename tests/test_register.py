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
import yaml
from test_sweep import PARAMS, make_checkpoint

from musegen.config import load_section
from musegen.core.sampling import SampleParams
from musegen.stages import register as stage


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
    """The training run's store with step_1 and step_2."""
    tmp, run_id = training_run["tmp"], training_run["run_id"]
    ckpts = tmp / "checkpoints"
    make_checkpoint(ckpts / "step_1.pt", 1, 1, run_id)
    make_checkpoint(ckpts / "step_2.pt", 2, 2, run_id)
    return {"tmp": tmp, "ckpts": ckpts, "run_id": run_id}


@pytest.fixture(scope="module")
def sample() -> SampleParams:
    return load_section(SampleParams, "sample", PARAMS)


def test_check_bundle_refuses_parts_of_different_steps(tmp_path: Path) -> None:
    tune, evaluate = tmp_path / "tune.json", tmp_path / "evaluate.json"
    tune.write_text(json.dumps({"checkpoint_step": 2}))
    evaluate.write_text(json.dumps({"checkpoint_step": 2, "proxy_score": 0.7}))
    assert stage.check_bundle(2, tune, evaluate)["proxy_score"] == 0.7
    with pytest.raises(stage.BundleError, match=r"tune\.json: tune used STEP 2, but select chose"):
        stage.check_bundle(1, tune, evaluate)
    evaluate.write_text(json.dumps({"checkpoint_step": 1}))
    with pytest.raises(stage.BundleError, match=r"evaluate\.json: evaluate used STEP 1"):
        stage.check_bundle(2, tune, evaluate)
    with pytest.raises(FileNotFoundError, match="run `musegen tune` first"):
        stage.check_bundle(2, tmp_path / "none.json", evaluate)


def test_register_load_by_alias_predict_and_reregister(
    store: dict, sample: SampleParams, prompt: Path
) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    selection = {
        "decided_by": "pairs",
        "num_ratings": 7,
        "num_pairs": 6,
        "steps": {
            "1": {"ratings": {"n": 4, "mean": 3.5}, "pairs": {"n": 4, "wins": 3, "strength": 0.5}},
            "2": {"ratings": {"n": 3, "mean": 2}, "pairs": {"n": 2, "wins": 0, "strength": -0.5}},
        },
    }
    evaluation = {"checkpoint_step": 1, "proxy_score": 0.61, "mean_oa": 0.7, "oa": {"x": 1}}
    limits = stage.limits_for(stage.RegisterConfig.load(PARAMS))
    v1 = stage.register(
        params(),
        store["ckpts"] / "step_1.pt",
        sample,
        limits=limits,
        evaluation=evaluation,
        selection=selection,
    )
    assert str(v1.version) == "1" and v1.tags["step"] == "1"
    # one bundle: STEP, sampling, evaluation and ratings on the version
    assert v1.tags["selected_by"] == "pairs" and v1.tags["rating_mean"] == "3.5"
    assert float(v1.tags["evaluate_proxy_score"]) == 0.61 and v1.tags["ratings_step"] == "4"
    assert (v1.tags["pairs_total"], v1.tags["pairs_step"], v1.tags["bt_strength"]) == (
        "6",
        "4",
        "0.5",
    )
    assert json.loads(v1.tags["sampling"])["temperature"] == dict(sample.temperature)
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
    assert list(out.columns) == ["midi_base64", "n_words", "n_notes", "n_bars"] and len(out) == 3
    assert list(out.n_bars) == [3, 3, 5]  # bars asked (+ the prompt's 2): generate.min_bars
    assert out.midi_base64[0] == out.midi_base64[1]  # same seed, same piece
    midis = [miditoolkit.MidiFile(file=io.BytesIO(base64.b64decode(b))) for b in out.midi_base64]
    for midi, n_notes in zip(midis, out.n_notes, strict=True):
        notes = midi.instruments[0].notes
        assert len(notes) == n_notes > 0
        assert max(n.start for n in notes) < 3 * 1920 + 2 * 1920  # bar caps held
    # with a prompt: the piece opens with the prompt's first two bars, note for note
    from musegen.core.tokenizer import get_tokenizer

    tok = get_tokenizer("cp")
    real = tok.decode(tok.encode(prompt)).instruments[0].notes
    got = [(n.start, n.pitch) for n in midis[2].instruments[0].notes]
    real = [(n.start, n.pitch) for n in real]
    assert kept(got, real)

    tuned = sample.with_overrides(["pitch=0.8"])
    v2 = stage.register(params(), store["ckpts"] / "step_2.pt", tuned, limits=limits)
    assert str(v2.version) == "2" and v2.tags["step"] == "2"
    assert str(client.get_model_version_by_alias("musegen", "champion").version) == "2"
    old = client.get_model_version("musegen", "1")
    assert old.tags["step"] == "1" and "champion" not in old.aliases
    assert {str(v.version) for v in client.search_model_versions("name = 'musegen'")} == {"1", "2"}
    # the stored sampling settings travel with the version
    local = mlflow.artifacts.download_artifacts(
        "models:/musegen/2", dst_path=str(store["tmp"] / "v2")
    )
    stored = yaml.safe_load(next(Path(local).rglob("sampling.yaml")).read_text())
    assert SampleParams(**stored) == tuned
    run = client.get_run(v2.tags["register_run_id"])
    assert run.data.params["temperature.pitch"] == "0.8" and run.data.params["step"] == "2"
