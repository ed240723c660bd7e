"""Unattended tuning: proxy-scored Optuna trials, constraints, results, MLflow, ridge listener,
Spearman, and two real `musegen tune` processes on one storage.

The checkpoint is a randomly initialised tiny MusicTransformer saved in the training format;
prompts and reference come from real pieces (conftest's corpus) tokenized as a valid split.
Audio uses the numpy renderer (MUSEGEN_RENDERER=numpy) except where a test says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from typer.testing import CliRunner

import mlflow
from musegen import paths, tracking
from musegen.apps.cli import app
from musegen.config import ParamsError, load_section
from musegen.core.generate import load_model
from musegen.core.model import ModelConfig, ModelParams, MusicTransformer
from musegen.core.sampling import SampleParams
from musegen.core.tokenizer import get_tokenizer
from musegen.stages import tune as tn

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"d_model": 32, "n_layer": 1, "n_head": 2, "d_ff": 64, "max_len": 256}


def make_workspace(root: Path, real_midi_files: list[Path], **tune: object) -> Path:
    """A params file whose every output lives under `root`: tiny checkpoint, valid tokens."""
    tok = get_tokenizer("cp")
    tokens = root / "tokens" / "cp"
    tokens.mkdir(parents=True)
    songs = [tok.encode(p) for p in real_midi_files]
    np.save(tokens / "valid.npy", np.concatenate(songs))
    np.save(tokens / "valid_offsets.npy", np.cumsum([0] + [len(s) for s in songs]))
    names = {"train": [], "valid": [p.name for p in real_midi_files], "test": []}
    (tokens / "pieces.json").write_text(json.dumps(names))
    tok.save(tokens)

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    model_params = load_section(ModelParams, "model", ROOT / "params.yaml")
    model_params = dataclasses.replace(model_params, **TINY_MODEL)
    config = ModelConfig.from_params(model_params, tok.vocab)
    torch.manual_seed(0)
    ckpt = root / "ckpt" / "best.pt"
    ckpt.parent.mkdir()
    state = {"model": MusicTransformer(config).state_dict()}
    state |= {"model_config": dataclasses.asdict(config), "vocab": tok.vocab, "step": 7}
    torch.save(state, ckpt)

    params["data"]["tokens_dir"] = str(root / "tokens")
    params["evaluate"]["seed"] = 0
    params["tune"] |= {
        "checkpoint": str(ckpt),
        "temperature_range": {"pitch": [0.3, 2.0], "duration": [0.5, 3.0]},
        "top_p_range": {"pitch": [0.8, 1.0]},
        "num_trials": 3,
        "num_startup_trials": 2,
        "num_clips": 2,
        "prompt_bars": 1,
        "clip_bars": 1,
        "max_clip_words": 48,
        "num_reference": 6,
        "storage": f"sqlite:///{root / 'optuna.db'}",
        "artifact_dir": str(root / "artifacts"),
        "out_dir": str(root / "reports"),
        "min_ratings": 5,
    } | tune
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def numpy_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSEGEN_RENDERER", "numpy")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory, real_midi_files: list[Path]) -> Path:
    return make_workspace(tmp_path_factory.mktemp("tune"), real_midi_files)


def test_params_section_loads_and_bad_range_is_named() -> None:
    tp = load_section(tn.TuneParams, "tune", ROOT / "params.yaml")
    assert tp.storage.startswith("sqlite:///") and tp.min_ratings > 0
    with pytest.raises(ParamsError, match=r"tune.top_p_range.pitch"):
        dataclasses.replace(tp, top_p_range={"pitch": [0.5, 1.5]})


def test_suggest_covers_the_space_and_overlays_sample_section(workspace: Path) -> None:
    tp = load_section(tn.TuneParams, "tune", workspace)
    base = load_section(SampleParams, "sample", workspace)
    trial = optuna.create_study().ask()
    values = tn.suggest(trial, tp)
    assert set(values) == {"temperature.pitch", "temperature.duration", "top_p.pitch"}
    assert 0.3 <= values["temperature.pitch"] <= 2.0
    sample = tn.to_sampling(base, values)
    assert sample.temperature["pitch"] == pytest.approx(values["temperature.pitch"], abs=1e-4)
    assert sample.temperature["velocity"] == base.temperature["velocity"]  # untouched
    assert tn.as_section(values)["top_p"] == {"pitch": round(values["top_p.pitch"], 4)}


def test_bars_window_shifts_and_crops() -> None:
    from musegen.core.midi import Score

    bar = 1920
    notes = np.array(
        [[0, 480, 60, 80], [bar + 240, bar + 960, 62, 80], [2 * bar, 3 * bar + 100, 64, 80]]
    )
    out = tn.bars_window(Score(notes=notes), 1, 1)
    assert out.notes[:, 2].tolist() == [62]
    assert out.notes[0, :2].tolist() == [240, 960]


def test_proxy_prefers_real_music_over_noise(workspace: Path) -> None:
    """The documented objective: real bars score higher than random notes; the real clips
    are never in the reference they are scored against."""
    from musegen.core.midi import Score
    from musegen.stages.evaluate import EvaluateParams

    tp = load_section(tn.TuneParams, "tune", workspace)
    ev = load_section(EvaluateParams, "evaluate", workspace)
    loaded = load_model(tp.checkpoint)
    tokens = Path(workspace.parent / "tokens/cp")
    bench = tn.load_bench(tokens, loaded.tokenizer, dataclasses.replace(tp, num_reference=4))
    more = tn.load_bench(tokens, loaded.tokenizer, dataclasses.replace(tp, num_reference=8))
    held_out = more.reference[4:]  # the next pieces: none is in bench.reference
    assert len(held_out) == 4 and set(more.pieces[4:8]).isdisjoint(bench.pieces)
    real = tn.measure(held_out, bench, ev)
    rng = np.random.default_rng(0)
    noise = []
    for _ in range(len(bench.reference)):
        start = np.sort(rng.integers(0, 1920, 40)) // 7 * 7
        pitch = rng.integers(21, 109, 40)
        noise.append(Score(notes=np.stack([start, start + 13, pitch, np.full(40, 90)], 1)))
    fake = tn.measure(noise, bench, ev)
    assert real["proxy_score"] > fake["proxy_score"] + 0.1
    assert set(fake["constraints"]) == {
        "dup_bar_rate",
        "longest_loop_bars",
        "distinct_4gram_ratio",
        "zlib_ratio",
    }


def test_clips_cut_short_by_the_word_cap_are_marked_and_never_scored(
    workspace: Path, tmp_path: Path
) -> None:
    tp = dataclasses.replace(load_section(tn.TuneParams, "tune", workspace), max_clip_words=3)
    loaded = load_model(tp.checkpoint)
    bench = tn.load_bench(Path(workspace.parent / "tokens/cp"), loaded.tokenizer, tp)
    base = load_section(SampleParams, "sample", workspace)
    short = tn.make_clips(loaded, base, bench, tp, tmp_path / "short")
    assert short and not any(c.complete for c in short)  # 3 words cannot close 2 bars
    study = optuna.create_study()
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="max_clip_words"):
        tn.complete_only(short, trial)
    assert trial.storage.get_trial(trial._trial_id).system_attrs[tn.INCOMPLETE_KEY] == len(short)
    full = dataclasses.replace(short[0], complete=True)
    trial = study.ask()
    assert tn.complete_only([full, *short], trial) == [full]
    assert trial.storage.get_trial(trial._trial_id).system_attrs[tn.INCOMPLETE_KEY] == len(short)


def test_ridge_listener_recovers_a_linear_rater_and_spearman() -> None:
    rng = np.random.default_rng(0)
    names = tn.LISTENER_FEATURES
    rows = [{n: float(rng.normal()) for n in names} for _ in range(60)]
    truth = [3 + 0.8 * r["h1"] - 0.5 * r["dup_bar_rate"] for r in rows]
    listener = tn.fit_listener(rows, truth, alpha=0.1)
    pred = [listener.predict(r) for r in rows]
    assert np.corrcoef(pred, truth)[0, 1] > 0.99
    raw = listener.coef / listener.scale  # back to per-unit slopes
    assert raw[names.index("h1")] == pytest.approx(0.8, abs=0.05)
    assert raw[names.index("dup_bar_rate")] == pytest.approx(-0.5, abs=0.05)
    assert raw[names.index("h4")] == pytest.approx(0.0, abs=0.05)
    assert 1 <= listener.predict(dict.fromkeys(names, 100.0)) <= 5  # clipped to the scale
    assert tn.spearman([1, 2, 3, 4], [2, 4, 6, 9]) == pytest.approx(1.0)
    assert tn.spearman([1, 2, 3], [5, 5, 5]) is None


def run_tune(params_path: Path, n_trials: int) -> dict:
    """`musegen tune --num_trials N` as the CLI runs it; the summary is its metrics.json."""
    result = CliRunner().invoke(
        app, ["tune", "--params", str(params_path), "--num_trials", str(n_trials)]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    tp = load_section(tn.TuneParams, "tune", params_path)
    return json.loads(paths.metrics(tp.out_dir).read_text())


def test_tune_writes_best_settings_metrics_artifacts_and_mlflow(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_midi_files: list[Path]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    summary = run_tune(workspace, n_trials=3)
    tp = load_section(tn.TuneParams, "tune", workspace)
    study = optuna.load_study(study_name=tp.study, storage=tp.storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) >= 3 and summary["n_trials_run"] == 3
    best = yaml.safe_load((Path(tp.out_dir) / "best_sampling.yaml").read_text())
    best_trial = study.trials[summary["best_trial"]]
    assert best == tn.as_section(best_trial.params)
    from musegen.stages.choice import sampling  # evaluate, register, generate read it back

    tuned = sampling(tn.TuneConfig.load(workspace))
    assert tuned.temperature["pitch"] == best["temperature"]["pitch"]
    metrics = json.loads((Path(tp.out_dir) / "metrics.json").read_text())
    assert metrics["objective"] == "proxy" and metrics["seconds_per_trial"] > 0
    # what it was tuned for and on: the checkpoint's STEP, valid-split pieces only
    assert metrics["checkpoint_step"] == 7 and metrics["pieces"]
    assert set(metrics["pieces"]) <= {p.name for p in real_midi_files}
    for t in trials:  # constraints recorded, one scalar each; clips uploaded with blind names
        assert {k for k in t.system_attrs if k.startswith("constraints:")}
        assert len(t.user_attrs["clips"]) == tp.num_clips
        for clip in t.user_attrs["clips"]:
            assert len(clip["name"]) == 16 and "pitch" not in clip["name"]
            assert (Path(tp.artifact_dir) / clip["mp3"]).stat().st_size > 0

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(tp.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 3
    assert "temperature.pitch" in children[0].data.params
    assert "proxy_score" in children[0].data.metrics
    files = {a.path for a in client.list_artifacts(children[0].info.run_id, "clips")}
    assert {Path(f).suffix for f in files} == {".mid", ".mp3"}


def test_tune_is_seeded_and_a_continued_study_draws_new_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_midi_files: list[Path]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    drawn = []
    for name in ("a", "b"):  # two fresh stores, same params: the same trials
        params_path = make_workspace(tmp_path / name, real_midi_files)
        run_tune(params_path, n_trials=2)
        tp = load_section(tn.TuneParams, "tune", params_path)
        drawn.append(
            [t.params for t in optuna.load_study(study_name=tp.study, storage=tp.storage).trials]
        )
    assert drawn[0] == drawn[1]
    run_tune(params_path, n_trials=2)  # the same study again: its new trials are new points
    trials = optuna.load_study(study_name=tp.study, storage=tp.storage).trials
    assert len(trials) == 4 and all(t.params not in drawn[1] for t in trials[2:])


def test_learned_listener_takes_over_after_min_ratings(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ratings in the listen study (rated trials with metrics) switch the objective."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tp = load_section(tn.TuneParams, "tune", workspace)
    listen = optuna.create_study(
        storage=tp.storage, study_name=tp.listen_study, direction="maximize"
    )
    rng = np.random.default_rng(1)
    for _ in range(tp.min_ratings + 1):
        t = listen.ask()
        metrics = {n: float(rng.normal()) for n in tn.LISTENER_FEATURES}
        rating = int(np.clip(round(3 + metrics["h1"]), 1, 5))
        t.set_user_attr("mode", "rating")
        listen._storage.set_trial_system_attr(t._trial_id, tn.METRICS_KEY, metrics)
        proxy = metrics["h1"] + 0.1 * rng.normal()
        listen._storage.set_trial_system_attr(t._trial_id, tn.PROXY_KEY, proxy)
        listen.tell(t, rating)
    summary = run_tune(workspace, n_trials=1)
    assert summary["objective"] == "listener" and summary["n_ratings"] == tp.min_ratings + 1
    assert summary["study"] == f"{tp.study}-listener"
    assert summary["spearman_proxy_vs_rating"] > 0.5
    assert 1 <= summary["best_value"] <= 5


@pytest.mark.slow
def test_two_tune_processes_share_one_storage(
    real_midi_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `musegen tune` workers on one sqlite file: no trial lost, artifacts belong to their
    trial (each MIDI re-generates bit for bit from the trial's params and seeds)."""
    params = make_workspace(tmp_path, real_midi_files, num_startup_trials=1)
    tp = load_section(tn.TuneParams, "tune", params)
    env = os.environ | {"MUSEGEN_RENDERER": "numpy"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # both stores exist in a working repository; creating them is a one-off, not the race here
    tn.open_storage(tp.storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    tracking.connect(tp.experiment)
    cmd = [sys.executable, "-m", "musegen", "tune", "--params", str(params), "--trials", "3"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name=tp.study, storage=tp.storage)
    trials = study.get_trials()
    assert len(trials) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    loaded = load_model(tp.checkpoint)
    bench = tn.load_bench(tmp_path / "tokens/cp", loaded.tokenizer, tp)
    base = load_section(SampleParams, "sample", params)
    ids = [c["mid"] for t in trials for c in t.user_attrs["clips"]]
    assert len(set(ids)) == len(ids)  # no artifact shared or overwritten
    for t in trials[:: len(trials) - 1]:  # the first and the last trial, re-made as tune does
        again = tn.make_clips(loaded, tn.to_sampling(base, t.params), bench, tp, tmp_path / "again")
        for clip, made in zip(t.user_attrs["clips"], again, strict=True):
            stored = loaded.tokenizer.encode(Path(tp.artifact_dir) / clip["mid"])
            assert np.array_equal(stored, loaded.tokenizer.encode(made.midi)), t.number
