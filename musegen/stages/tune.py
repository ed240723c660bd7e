"""The `tune` stage: Optuna over per-field sampling settings, scored without a listener.

Every trial samples a temperature and a top-p per field from params.yaml's `tune` ranges,
continues the same `num_clips` prompts (valid split, first `prompt_bars` bars) with fixed
seeds, and scores the continuations (`clip_bars` bars) against what real valid-split music
does in the same bars. The checkpoint is the STEP `musegen select` chose; the test split is
never read (it is evaluate's). The objective (maximised) is, documented once here:

    proxy = mean MGEval overlap area over the features (samples vs held-out, in [0, 1])
            - mean loop penalty (share of clips past the held-out loop thresholds, less chance)

that is `evaluate.proxy_score`. Each loop measure is also an Optuna constraint,
``share_beyond - (1 - loop_percentile / 100)`` (feasible <= 0), so TPE steers away from loopy
settings. Once the listen study (`musegen listen`) holds `min_ratings` ratings, a ridge
regression from clip metrics to ratings (the "learned listener", `fit_listener`) replaces the
proxy and the study `<study>-listener` is used, so values on two scales never mix in one study.
Where ratings exist, Spearman's rho between the proxy and the ratings is reported.

Outputs: reports/tune/best_sampling.yaml (the `sample:` section's shape, read by
choice.sampling), reports/tune/metrics.json, one MLflow parent run per call with a nested
run per trial, and MP3 + MIDI artifacts per trial for optuna-dashboard (blind hash names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml

from musegen import paths, tracking
from musegen.config import DataParams, StageConfig
from musegen.core import metrics
from musegen.core.midi import Score, to_score
from musegen.core.sampling import SampleParams
from musegen.files import temp_name, write_atomic, write_headline
from musegen.stages import choice
from musegen.stages.choice import SelectParams, SelectResult, TuneParams
from musegen.stages.evaluate import EvaluateParams, score_set

#: rating scale of the listen study (ChoiceWidget values 1..5; 0 = "not rated")
RATINGS = (1, 2, 3, 4, 5)
#: listen-study trial system attrs (hidden from raters in the dashboard): proxy, clip metrics
PROXY_KEY, METRICS_KEY = "musegen:proxy_score", "musegen:metrics"
#: clips a trial could not score (a system attr: raters in optuna-dashboard never see it)
INCOMPLETE_KEY = "musegen:incomplete_clips"
#: clip metrics the learned listener reads (n_bars is fixed by clip_bars: no information)
LISTENER_FEATURES = tuple(m for m in metrics.PIECE_METRICS if m != "n_bars")


# ---- search space ----------------------------------------------------------------------------


def suggest(trial: optuna.Trial, params: TuneParams) -> dict[str, float]:
    """Sample one value per tuned knob; names are ``temperature.<field>``, ``top_p.<field>``."""
    values = {}
    for knob, ranges in (("temperature", params.temperature_range), ("top_p", params.top_p_range)):
        for name, (low, high) in ranges.items():
            values[f"{knob}.{name}"] = trial.suggest_float(f"{knob}.{name}", low, high)
    return values


def as_section(values: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"temperature.pitch": 0.9, ...}`` -> ``{"temperature": {"pitch": 0.9}, "top_p": {}}``."""
    out: dict[str, dict[str, float]] = {"temperature": {}, "top_p": {}}
    for key, value in values.items():
        knob, _, name = key.partition(".")
        out[knob][name] = round(float(value), 4)
    return out


def to_sampling(base: SampleParams, values: Mapping[str, float]) -> SampleParams:
    """`base` (params.yaml's `sample:`) with the trial's per-field values on top."""
    section = as_section(values)
    return dataclasses.replace(
        base,
        temperature={**base.temperature, **section["temperature"]},
        top_p={**base.top_p, **section["top_p"]},
    )


# ---- prompts and the held-out reference ------------------------------------------------------


@dataclasses.dataclass
class Bench:
    """What every trial is measured against; build it with `load_bench`.

    Attributes:
        prompts: `num_clips` token arrays, the first `prompt_bars` bars of valid pieces.
        reference: Scores, bars prompt_bars .. prompt_bars + clip_bars of valid pieces.
        ref_metrics: their `piece_metrics`.
        ref_features: their `metrics.set_features`.
    """

    prompts: list[np.ndarray]
    reference: list[Score]
    ref_metrics: list[dict[str, float]]
    ref_features: dict[str, np.ndarray]
    pieces: list[str] = dataclasses.field(default_factory=list)  # manifest rows read


def bars_window(score: Score, start_bar: int, n_bars: int) -> Score:
    """Bars start_bar .. start_bar + n_bars of `score`, shifted to start at tick 0."""
    notes = score.notes
    # onsets round to the nearest 16th in metrics._grid: a note rounded into the window counts
    keep = notes[:, 0] >= start_bar * metrics.BAR - metrics.STEP // 2
    shifted = notes[keep].copy()
    shifted[:, :2] = np.maximum(shifted[:, :2] - start_bar * metrics.BAR, 0)
    return metrics.crop(dataclasses.replace(score, notes=shifted), n_bars)


#: the split tune and listen read (valid chooses; test is evaluate's alone)
SPLIT = "valid"


def load_bench(repr_dir: Path, tokenizer: Any, params: TuneParams, seed: int = 0) -> Bench:
    """Prompts and reference from the valid split of `repr_dir` (tokenize stage output).

    Pieces with at least prompt_bars + clip_bars bars qualify, in split order; prompts cycle
    through them when `num_clips` is larger than their number. `pieces` names the manifest
    rows read (from the tokenizer's pieces.json, when it is there).

    Raises:
        FileNotFoundError: no valid split; ValueError: no valid piece is long enough.
    """
    rows_path = paths.split_rows(repr_dir, SPLIT)
    if not rows_path.is_file():
        raise FileNotFoundError(f"{rows_path}: no {SPLIT} split; run `musegen tokenize` first")
    rows, offsets = np.load(rows_path), np.load(paths.split_offsets(repr_dir, SPLIT))
    names_file = paths.split_pieces(repr_dir)
    names = json.loads(names_file.read_text())[SPLIT] if names_file.is_file() else []
    qualified: list[str] = []  # manifest paths of the pieces long enough, in split order
    rows = rows if rows.ndim == 2 else rows.reshape(-1, 1)  # REMI is one field
    vocab = tokenizer.vocab
    field = "bar_beat" if "bar_beat" in vocab["fields"] else vocab["fields"][0]
    is_bar = rows[:, vocab["fields"].index(field)] == vocab["events"][field].index("Bar")
    need = params.prompt_bars + params.clip_bars
    prompts, reference = [], []
    for k, (start, end) in enumerate(itertools.pairwise(offsets)):
        bars = start + np.flatnonzero(is_bar[start:end])
        if len(bars) <= need:
            continue
        piece = rows[start:end]
        prompts.append(piece[: bars[params.prompt_bars] - start].copy())
        qualified += names[k : k + 1]
        if len(reference) < params.num_reference:
            score = to_score(tokenizer.decode(piece.squeeze(-1) if rows.shape[1] == 1 else piece))
            reference.append(bars_window(score, params.prompt_bars, params.clip_bars))
    if not prompts:
        raise ValueError(
            f"{rows_path}: no {SPLIT} piece has more than {need} bars (prompt_bars + clip_bars); "
            "lower tune.prompt_bars / tune.clip_bars"
        )
    ref_metrics = [metrics.piece_metrics(s, seed) for s in reference]
    return Bench(
        prompts=[prompts[k % len(prompts)] for k in range(params.num_clips)],
        reference=reference,
        ref_metrics=ref_metrics,
        ref_features=metrics.set_features(reference, ref_metrics),
        # prompts cycle through the first num_clips; the reference is the first num_reference
        pieces=qualified[: max(params.num_clips, params.num_reference)],
    )


# ---- clips and their score -------------------------------------------------------------------


@dataclasses.dataclass
class Clip:
    """One generated clip: a blind file name (content hash), its MIDI and its measured bars.

    `complete` is False when the word cap stopped it before its last bar closed: it is kept
    (and shown) but never scored.
    """

    midi: Path
    tokens: np.ndarray
    score: Score
    complete: bool


def make_clips(
    loaded: Any,
    sample: SampleParams,
    bench: Bench,
    params: TuneParams,
    out_dir: Path,
) -> list[Clip]:
    """Continue every prompt with `sample` (seed tune.seed + k for prompt k) into `out_dir`.

    File names are the first 16 hex digits of the MIDI's sha256: blind, and equal clips share
    a name. The measured part is the continuation (bars after the prompt). Every clip holds
    exactly prompt_bars + clip_bars bars (EOS is masked until then), unless the word cap cuts
    it short: then it is marked incomplete.
    """
    from musegen.core.generate import generate_batch

    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    bars = params.prompt_bars + params.clip_bars  # the caps count the prompt's bars
    stats: list[dict[str, Any]] = []
    every = generate_batch(  # the K clips decode as one batch
        loaded,
        sample,
        list(bench.prompts),
        [params.seed + k for k in range(len(bench.prompts))],
        max_bars=bars,
        min_bars=bars,
        max_words=params.max_clip_words,
        stats=stats,
    )
    for k, (tokens, got) in enumerate(zip(every, stats, strict=True)):
        midi = loaded.tokenizer.decode(tokens)
        tmp = temp_name(out_dir / f"clip{k}.mid")  # unique: workers may share out_dir
        midi.dump(str(tmp))
        path = out_dir / f"{hashlib.sha256(tmp.read_bytes()).hexdigest()[:16]}.mid"
        tmp.replace(path)
        score = bars_window(to_score(midi), params.prompt_bars, params.clip_bars)
        clips.append(Clip(path, np.asarray(tokens), score, got["bars"] >= bars))
    return clips


def complete_only(clips: list[Clip], trial: optuna.Trial) -> list[Clip]:
    """The clips that hold every requested bar (the rest are recorded on the trial, unscored).

    Raises:
        optuna.TrialPruned: no clip is complete, so the settings cannot be scored.
    """
    done = [c for c in clips if c.complete]
    trial.storage.set_trial_system_attr(trial._trial_id, INCOMPLETE_KEY, len(clips) - len(done))
    if not done:
        raise optuna.TrialPruned(
            f"none of {len(clips)} clips reached its last bar within tune.max_clip_words"
        )
    return done


def measure(scores: Sequence[Score], bench: Bench, evaluate: EvaluateParams) -> dict[str, Any]:
    """The proxy of `scores` against the bench: proxy_score, mean_oa, loops, metric means.

    Returns:
        {"proxy_score", "mean_oa", "loops" (evaluate.loop_checks), "constraints" (per loop
        measure, share_beyond - chance share; <= 0 is feasible), "metrics" (mean per clip
        metric: the learned listener's input)}.
    """
    result = score_set(list(scores), bench.ref_features, bench.ref_metrics, evaluate)
    chance = 1 - evaluate.loop_percentile / 100
    return {
        "proxy_score": result["proxy_score"],
        "mean_oa": result["mean_oa"],
        "order_score": result["order_score"],
        "loops": result["loops"],
        "constraints": {k: v["share_beyond"] - chance for k, v in result["loops"].items()},
        "metrics": {k: float(np.mean([p[k] for p in result["pieces"]])) for k in LISTENER_FEATURES},
    }


# ---- the learned listener ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Listener:
    """Ridge regression from clip-metric means to a 1-5 rating; build with `fit_listener`.

    rating ~ intercept + coef . (x - mean) / scale, clipped to [1, 5].
    """

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, features: Mapping[str, float]) -> float:
        """Predicted rating of one trial's clip-metric means."""
        x = (np.array([features[n] for n in self.names]) - self.mean) / self.scale
        return float(np.clip(self.intercept + x @ self.coef, RATINGS[0], RATINGS[-1]))


def fit_listener(
    features: Sequence[Mapping[str, float]], ratings: Sequence[float], alpha: float
) -> Listener:
    """Fit ridge regression on standardised features (closed form, numpy).

    coef = (X'X + alpha I)^-1 X'(y - mean y), X standardised (constant columns get scale 1,
    so they contribute nothing); the intercept is the mean rating and is not penalised.
    """
    names = LISTENER_FEATURES
    x = np.array([[f[n] for n in names] for f in features], float)  # (N, D)
    y = np.asarray(ratings, float)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    coef = np.linalg.solve(z.T @ z + alpha * np.eye(len(names)), z.T @ (y - y.mean()))
    return Listener(names, mean, scale, coef, float(y.mean()))


def rated_trials(storage: Any, study_name: str) -> list[optuna.trial.FrozenTrial]:
    """Completed listen-study trials with a 1-5 rating and clip metrics (none if no study)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return []
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get("mode") == "rating" and METRICS_KEY in t.system_attrs
    ]


def spearman(proxy: Sequence[float], ratings: Sequence[float]) -> float | None:
    """Spearman's rho of the proxy against ratings; None below 3 pairs or with a constant side."""
    from scipy.stats import spearmanr

    if len(proxy) < 3 or np.ptp(proxy) == 0 or np.ptp(ratings) == 0:
        return None
    return float(spearmanr(proxy, ratings).statistic)


# ---- storage, MLflow --------------------------------------------------------------------------


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage: an RDB URL (sqlite:///optuna/optuna.db, postgresql://...) or a
    JournalFileBackend log for many processes on one box (``journal:///path/optuna.log``).

    Concurrent first opens of a new sqlite file race on table creation: retried.
    """
    if url.startswith("journal://"):
        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=None)
        except Exception:  # another worker is creating the tables right now
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def checkpoint_path(params: choice.WithTuneSelect, root: Path | str = ".") -> Path:
    """tune.checkpoint, or the STEP `musegen select` chose when it is empty (`params`: a
    config with the tune and select sections: the tune stage's or a listening session's)."""
    if params.tune.checkpoint:
        return Path(root, params.tune.checkpoint)
    return SelectResult.read(params, root).checkpoint


# ---- one scored trial (shared with musegen.apps.listen) -------------------------------------


def upload_clips(
    clips: Sequence[Clip],
    trial: optuna.Trial,
    store: Any,
    work: Path,
    prefix: str = "",
) -> list[dict[str, str]]:
    """Render each clip to MP3 and upload MP3 + MIDI to the trial (keyword-only API).

    MIDI goes up as application/octet-stream: optuna-dashboard would guess audio/sp-midi and
    show a player that cannot play it (research/evaluation-and-audio.md section 3).
    """
    from optuna.artifacts import upload_artifact

    from musegen.core.render import render_audio

    out = []
    for clip in clips:
        mp3 = render_audio(clip.midi, work / f"{prefix}{clip.midi.stem}.mp3").path
        midi = work / f"{prefix}{clip.midi.name}"
        if midi != clip.midi:
            midi.write_bytes(clip.midi.read_bytes())
        ids = {"name": f"{prefix}{clip.midi.stem}"}
        ids["mp3"] = upload_artifact(
            artifact_store=store, file_path=str(mp3), study_or_trial=trial, mimetype="audio/mpeg"
        )
        ids["mid"] = upload_artifact(
            artifact_store=store,
            file_path=str(midi),
            study_or_trial=trial,
            mimetype="application/octet-stream",
        )
        out.append(ids)
    return out


def best_trial(study: optuna.Study, step: int | None = None) -> optuna.trial.FrozenTrial | None:
    """The best complete trial (of checkpoint STEP `step` when given), feasible ones first.

    The study is shared across runs (and STEPs): settings tuned for another STEP never win.
    """
    from optuna.study._constrained_optimization import _get_constraints_from_system_attrs

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if step is not None:
        done = [t for t in done if t.user_attrs.get("checkpoint_step") == step]
    if not done:
        return None

    def key(t: optuna.trial.FrozenTrial) -> tuple[bool, float]:
        constraints = _get_constraints_from_system_attrs(t.system_attrs).values()
        return all(c <= 0 for c in constraints), t.value

    return max(done, key=key)


# ---- the stage --------------------------------------------------------------------------------


def tune(
    params: TuneParams,
    checkpoint: Path,
    tokens_dir: Path,
    *,
    sample: SampleParams,
    eval_params: EvaluateParams,
    n_trials: int | None = None,
) -> dict[str, Any]:
    """Run `n_trials` (default tune.num_trials) unattended trials; write the best settings.

    Workers may run this at the same time on one storage: Optuna hands each its own trials
    (TPE's constant liar keeps them apart), artifacts go to each trial's own ids.

    Args:
        params: the `tune` section.
        checkpoint: the STEP to tune for (`checkpoint_path`: the one select chose).
        tokens_dir: the tokenize stage's root (data.tokens_dir): valid-split prompts.
        sample: the `sample` section, which the tuned fields overlay.
        eval_params: the `evaluate` section (the proxy's settings and seed).
        n_trials: trials in this call (default params.num_trials).

    Returns:
        The metrics.json content: best value and settings, objective kind, ratings used,
        Spearman rho of proxy vs ratings, trials run, seconds per trial.
    """
    from optuna.artifacts import FileSystemArtifactStore

    import mlflow
    from musegen.core.generate import load_model

    tp, ev = params, eval_params
    n_trials = tp.num_trials if n_trials is None else n_trials

    loaded = load_model(checkpoint)
    repr_dir = Path(tokens_dir) / loaded.vocab["representation"]
    bench = load_bench(repr_dir, loaded.tokenizer, tp, ev.seed)
    storage = open_storage(tp.storage)
    rated = rated_trials(storage, tp.listen_study)
    ratings = [float(t.value) for t in rated]  # a rated trial's value is its 1-5 score
    rho = spearman([t.system_attrs[PROXY_KEY] for t in rated], ratings)
    listener = None
    if len(rated) >= tp.min_ratings:
        features = [t.system_attrs[METRICS_KEY] for t in rated]
        listener = fit_listener(features, ratings, tp.ridge_alpha)
    objective_kind = "listener" if listener else "proxy"
    study = optuna.create_study(
        storage=storage,
        study_name=tp.study + ("-listener" if listener else ""),
        direction="maximize",
        load_if_exists=True,
    )
    # seeded, so `dvc repro` proposes the same trials; a continued study draws new ones
    study.sampler = optuna.samplers.TPESampler(
        n_startup_trials=tp.num_startup_trials, seed=tp.seed + len(study.trials)
    )
    store = FileSystemArtifactStore(tp.artifact_dir)
    Path(tp.artifact_dir).mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.connect(tp.experiment)
    seconds: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        start = time.perf_counter()
        values = suggest(trial, tp)
        with tempfile.TemporaryDirectory(prefix="musegen-tune-") as tmp:
            work = Path(tmp)
            clips = complete_only(
                make_clips(loaded, to_sampling(sample, values), bench, tp, work), trial
            )
            result = measure([c.score for c in clips], bench, ev)
            value = listener.predict(result["metrics"]) if listener else result["proxy_score"]
            for name, c in result["constraints"].items():
                trial.set_constraint(name, c)  # one scalar per call; feasible <= 0
            ids = upload_clips(clips, trial, store, work)
            trial.set_user_attr("mode", objective_kind)
            trial.set_user_attr("proxy_score", result["proxy_score"])
            trial.set_user_attr("metrics", result["metrics"])
            trial.set_user_attr("clips", ids)
            trial.set_user_attr("checkpoint_step", loaded.step)
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=f"trial-{trial.number}", nested=True
            ):
                mlflow.log_params(values | {"trial": trial.number, "study": study.study_name})
                logged = {"value": value, "proxy_score": result["proxy_score"]}
                logged |= {"mean_oa": result["mean_oa"]}
                logged |= {f"constraint_{k}": v for k, v in result["constraints"].items()}
                logged |= {f"clip_{k}": v for k, v in result["metrics"].items()}
                logged["seconds"] = time.perf_counter() - start
                mlflow.log_metrics(logged)
                for clip in clips:
                    mlflow.log_artifact(str(clip.midi), "clips")
                    mlflow.log_artifact(str(clip.midi.with_suffix(".mp3")), "clips")
        seconds.append(time.perf_counter() - start)
        return value

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"tune-{study.study_name}"):
        mlflow.set_tags({"stage": "tune", "objective": objective_kind})
        mlflow.log_params(
            {
                "checkpoint": str(loaded.checkpoint),
                "checkpoint_step": loaded.step,
                "study": study.study_name,
                "storage": tp.storage,
                "n_trials": n_trials,
                "num_clips": tp.num_clips,
                "clip_bars": tp.clip_bars,
                "ratings": len(rated),
            }
        )
        study.optimize(objective, n_trials=n_trials, gc_after_trial=False)
        best = best_trial(study, loaded.step)
        summary = write_results(
            tp,
            best,
            objective_kind=objective_kind,
            n_ratings=len(rated),
            rho=rho,
            seconds=seconds,
            study=study,
            # what this sampling was tuned for, and the manifest rows it was tuned on
            extra={"checkpoint_step": loaded.step, "pieces": bench.pieces},
        )
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        mlflow.log_artifact(str(paths.best_sampling(tp.out_dir)))
    return summary


def write_results(
    tp: TuneParams,
    best: optuna.trial.FrozenTrial | None,
    *,
    objective_kind: str,
    n_ratings: int,
    rho: float | None,
    seconds: Sequence[float],
    study: optuna.Study,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write best_sampling.yaml (shape of the `sample:` section) and metrics.json atomically.

    `extra` (checkpoint_step, pieces) goes into metrics.json as it is.
    """
    out = Path(tp.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "objective": objective_kind,
        "study": study.study_name,
        "n_trials_total": len(study.get_trials(deepcopy=False)),
        "n_trials_run": len(seconds),
        "seconds_per_trial": float(np.mean(seconds)) if seconds else 0.0,
        "n_ratings": n_ratings,
        "spearman_proxy_vs_rating": rho,
        **(extra or {}),
    }
    if best is not None:
        summary |= {"best_value": float(best.value), "best_trial": best.number}
        summary["best_proxy_score"] = float(best.user_attrs.get("proxy_score", best.value))
        section = as_section(best.params)
        step = f"STEP {best.user_attrs.get('checkpoint_step')}, "
        text = (
            f"# written by `musegen tune` ({step}study {study.study_name}, trial {best.number}, "
            f"{objective_kind} {best.value:.4f}); overlays params.yaml's sample: section\n"
        )
        # unique temp names: several workers finishing together each replace the file whole
        write_atomic(paths.best_sampling(out), text + yaml.safe_dump(section, sort_keys=True))
    else:  # nothing tuned for this checkpoint: no stale settings of another one may remain
        paths.best_sampling(out).unlink(missing_ok=True)
    write_atomic(paths.metrics(out), json.dumps(summary, indent=2) + "\n")
    write_headline(paths.metrics(out), tune_score=summary.get("best_proxy_score"))
    return summary


@dataclasses.dataclass(frozen=True)
class TuneConfig(StageConfig):
    """What the tune stage reads: its section, the tokens (prompts), the base sampling, the
    proxy's settings, and the STEP select chose."""

    tune: TuneParams
    data: DataParams
    sample: SampleParams
    evaluate: EvaluateParams
    select: SelectParams


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What tune wrote: best_sampling.yaml (None when no trial finished for the STEP), the
    sampling it makes (`sample` overlaid by it), and metrics.json's headline figures."""

    best_sampling: Path | None
    sampling: SampleParams
    metrics: Path
    objective: str
    n_trials_run: int
    seconds_per_trial: float
    best_value: float | None
    best_trial: int | None
    n_ratings: int
    spearman_proxy_vs_rating: float | None

    @classmethod
    def read(cls, params: TuneConfig, root: Path | str = ".") -> TuneResult:
        """The files in tune.out_dir (in the repository at `root`)."""
        out = Path(root, params.tune.out_dir)
        m = json.loads(paths.metrics(out).read_text())
        tuned = paths.best_sampling(out)
        return cls(
            best_sampling=tuned if tuned.is_file() else None,
            sampling=choice.sampling(params, root),
            metrics=paths.metrics(out),
            objective=m["objective"],
            n_trials_run=m["n_trials_run"],
            seconds_per_trial=m["seconds_per_trial"],
            best_value=m.get("best_value"),
            best_trial=m.get("best_trial"),
            n_ratings=m["n_ratings"],
            spearman_proxy_vs_rating=m["spearman_proxy_vs_rating"],
        )


def run(params: TuneConfig) -> TuneResult:
    """The tune stage: tune.num_trials trials for tune.checkpoint or the selected STEP."""
    tune(
        params.tune,
        checkpoint_path(params),
        Path(params.data.tokens_dir),
        sample=params.sample,
        eval_params=params.evaluate,
    )
    return TuneResult.read(params)
