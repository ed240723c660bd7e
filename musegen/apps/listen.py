"""Listening with people: rate clips in optuna-dashboard, Optuna proposes the next settings.

`listen` keeps `tune.num_pending` trials of the listen study open. Each trial draws per-field
temperature / top-p from the same space as `musegen tune`, continues the same valid-split prompts
(fixed seeds), renders MP3 and uploads MP3 + MIDI as trial artifacts named by content hash
(blind: no parameter or checkpoint in a file name). The proxy score and clip metrics go to
trial system attrs, which optuna-dashboard does not show: raters see audio and the form. A
person plays them in the dashboard and picks a score in the trial's form; this process reads
the choice and tells Optuna, so the next trials move toward what people like. Ratings live in
the study storage (any RDB URL).

No untouched submit becomes a score: optuna-dashboard preselects a form's first choice and
starts a slider at its minimum (research/evaluation-and-audio.md section 3). The form is a
user-attr ChoiceWidget whose first choice is "not rated" (value 0); this process, not the
dashboard, tells Optuna: 1-5 completes the trial with that value, 0 fails it (samplers ignore
failed trials) and enqueues the same settings again for a later rating.

Pairwise mode (`pairwise=True`, study `<listen_study>-pairwise`) plays the trial's settings
against the incumbent (best so far by a Bradley-Terry fit over all pairs; params.yaml's
`sample:` at first), as "set 1" / "set 2" in random order. The trial's value is 1 (new set
better), 0.5 (no preference) or 0. optuna-dashboard's own preferential mode needs
`optuna-dashboard[preferential]` (botorch, gpytorch, pyro-ppl: a second heavy stack beside
torch) and a GP sampler of its own, so this mode keeps TPE and one storage instead.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
import optuna
from optuna.trial import TrialState

from musegen.apps.ui import ServeParams, ServerError
from musegen.config import DataParams, StageConfig
from musegen.core.sampling import SampleParams
from musegen.stages import tune as tn
from musegen.stages.choice import SelectParams, TuneParams
from musegen.stages.evaluate import EvaluateParams

RATING_KEY = "rating"
PREFERENCE_KEY = "preference"
NOT_RATED = 0
RATING_CHOICES = ["not rated yet", "1 bad", "2 poor", "3 fair", "4 good", "5 excellent"]
PREFERENCE_CHOICES = ["not rated yet", "set 1 is better", "set 2 is better", "no preference"]
#: trial system attrs (not shown as user attrs): which set is new, the incumbent's settings
A_FIRST, B_VALUES = "musegen:a_first", "musegen:b_values"


def register_forms(study: optuna.Study, pairwise: bool) -> None:
    """Put the rating (or preference) form on every running trial of `study`."""
    from optuna_dashboard import ChoiceWidget, register_user_attr_form_widgets

    if pairwise:
        widget = ChoiceWidget(
            choices=PREFERENCE_CHOICES,
            values=list(range(len(PREFERENCE_CHOICES))),
            description="Play every clip of set 1 and set 2 (same openings), then pick a set.",
            user_attr_key=PREFERENCE_KEY,
        )
    else:
        widget = ChoiceWidget(
            choices=RATING_CHOICES,
            values=list(range(len(RATING_CHOICES))),
            description="Play the clips (the first bars are real music), then score them 1-5. "
            "Submitting 'not rated yet' skips the trial; it comes back later.",
            user_attr_key=RATING_KEY,
        )
    register_user_attr_form_widgets(study, widgets=[widget])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per audio range request would bury the progress output


def start_dashboard(
    storage: Any, artifact_dir: Path | str, port: int, host: str
) -> tuple[WSGIServer, threading.Thread]:
    """Serve optuna-dashboard with the artifact store in a daemon thread on `host` (serve.host).

    Returns:
        (server, thread); `server.server_port` is the bound port (pass port 0 for any free
        one); stop with `server.shutdown()`.

    Raises:
        ServerError: the port cannot be bound (taken, or privileged); the message names it.
    """
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi

    app = wsgi(storage, artifact_store=FileSystemArtifactStore(str(artifact_dir)))
    try:
        server = make_server(host, port, app, handler_class=_QuietHandler)
    except OSError as exc:
        raise ServerError(
            f"{host}:{port}: cannot serve optuna-dashboard ({exc.strerror}); is the port taken? "
            "pass --port or set serve.optuna_port in params.yaml"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="optuna-dashboard", daemon=True)
    thread.start()
    return server, thread


@dataclasses.dataclass
class Session:
    """Everything a listen trial needs; build with `open_session`."""

    tp: tn.TuneParams
    ev: EvaluateParams
    base: SampleParams
    loaded: Any
    bench: tn.Bench
    storage: Any
    study: optuna.Study
    store: Any
    pairwise: bool


@dataclasses.dataclass(frozen=True)
class ListenConfig(StageConfig):
    """What a listening session reads: tune's space and storage, the proxy's settings, the
    prompts, the base sampling, the STEP select chose, the dashboard's host and port
    (`ListenConfig.load`, as every stage's params)."""

    tune: TuneParams
    evaluate: EvaluateParams
    data: DataParams
    sample: SampleParams
    select: SelectParams
    serve: ServeParams


def open_session(params: ListenConfig, pairwise: bool = False) -> Session:
    """Load the checkpoint, prompts and reference; create or load the listen study."""
    from optuna.artifacts import FileSystemArtifactStore

    from musegen.core.generate import load_model

    tp, ev, data = params.tune, params.evaluate, params.data
    loaded = load_model(tn.checkpoint_path(params))
    repr_dir = Path(data.tokens_dir) / loaded.vocab["representation"]
    storage = tn.open_storage(tp.storage)
    name = tp.listen_study + ("-pairwise" if pairwise else "")
    # one listener process per study: a seed that moves with the history, so a restarted
    # session neither repeats its random startup points nor differs between identical runs
    done = next(
        (x.n_trials for x in optuna.get_all_study_summaries(storage) if x.study_name == name), 0
    )
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=tp.num_startup_trials, seed=tp.seed + done
    )
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", sampler=sampler, load_if_exists=True
    )
    register_forms(study, pairwise)
    Path(tp.artifact_dir).mkdir(parents=True, exist_ok=True)
    return Session(
        tp=tp,
        ev=ev,
        base=params.sample,
        loaded=loaded,
        bench=tn.load_bench(repr_dir, loaded.tokenizer, tp, ev.seed),
        storage=storage,
        study=study,
        store=FileSystemArtifactStore(tp.artifact_dir),
        pairwise=pairwise,
    )


def base_values(s: Session) -> dict[str, float]:
    """params.yaml's `sample:` values of the tuned knobs (the first incumbent)."""
    values = {f"temperature.{f}": s.base.temperature[f] for f in s.tp.temperature_range}
    return values | {f"top_p.{f}": s.base.top_p[f] for f in s.tp.top_p_range}


def prepare(s: Session, trial: optuna.Trial) -> None:
    """Generate, measure, render and upload one trial's clips; mark it ready to rate."""
    values = tn.suggest(trial, s.tp)
    with tempfile.TemporaryDirectory(prefix="musegen-listen-") as tmp:
        work = Path(tmp)
        clips = tn.make_clips(s.loaded, tn.to_sampling(s.base, values), s.bench, s.tp, work / "a")
        clips = tn.complete_only(clips, trial)  # raters hear only clips of the full length
        result = tn.measure([c.score for c in clips], s.bench, s.ev)
        trial.set_user_attr("mode", "preference" if s.pairwise else "rating")
        # system attrs: kept for the learned listener, never shown to the rater by the dashboard
        s.storage.set_trial_system_attr(trial._trial_id, tn.PROXY_KEY, result["proxy_score"])
        s.storage.set_trial_system_attr(trial._trial_id, tn.METRICS_KEY, result["metrics"])
        if not s.pairwise:
            trial.set_user_attr("clips", tn.upload_clips(clips, trial, s.store, work))
            return
        b_values = s.study.user_attrs.get("incumbent") or base_values(s)
        b_clips = tn.make_clips(
            s.loaded, tn.to_sampling(s.base, b_values), s.bench, s.tp, work / "b"
        )
        b_clips = [c for c in b_clips if c.complete]
        # the new set plays first or second at random: the position tells the rater nothing
        a_first = bool(np.random.default_rng([s.tp.seed, trial.number]).random() < 0.5)
        first, second = (clips, b_clips) if a_first else (b_clips, clips)
        s.storage.set_trial_system_attr(trial._trial_id, A_FIRST, a_first)
        s.storage.set_trial_system_attr(trial._trial_id, B_VALUES, b_values)
        ids = tn.upload_clips(first, trial, s.store, work, "set1-")
        ids += tn.upload_clips(second, trial, s.store, work, "set2-")
        trial.set_user_attr("clips", ids)


def collect(s: Session) -> tuple[int, int]:
    """Tell Optuna every submitted choice; return (told, skipped).

    A "not rated" submission fails the trial and enqueues its settings again.
    """
    key = PREFERENCE_KEY if s.pairwise else RATING_KEY
    told = skipped = 0
    for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "clips" not in t.user_attrs or key not in t.user_attrs:
            continue
        choice = int(t.user_attrs[key])
        if choice == NOT_RATED or not 0 < choice < (4 if s.pairwise else 6):
            s.study.tell(t.number, state=TrialState.FAIL)
            s.study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})
            skipped += 1
            continue
        if s.pairwise:
            a_first = t.system_attrs[A_FIRST]
            # choice 1: set 1 better, 2: set 2 better, 3: no preference -> the new set's score
            value = 0.5 if choice == 3 else float((choice == 1) == a_first)
        else:
            value = float(choice)
        s.study.tell(t.number, value)
        told += 1
    if told and s.pairwise:
        s.study.set_user_attr("incumbent", incumbent(s.study, base_values(s)))
    return told, skipped


def _key(values: Mapping[str, float]) -> str:
    return json.dumps({k: round(float(v), 4) for k, v in sorted(values.items())})


def preference_pairs(study: optuna.Study) -> list[tuple[str, str, float]]:
    """(new settings, incumbent settings, new's score 1 / 0.5 / 0) of every told pair."""
    return [
        (_key(t.params), _key(t.system_attrs[B_VALUES]), float(t.value))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if B_VALUES in t.system_attrs
    ]


def bradley_terry(pairs: Sequence[tuple[str, str, float]], iters: int = 200) -> dict[str, float]:
    """Bradley-Terry log-strengths from (a, b, a's score) pairs (MM algorithm, Hunter 2004).

    A tie counts as half a win each. Every item also gets one virtual tie against a fixed
    anchor of strength 1 (a weak prior), so an item that never lost stays finite.

    Returns:
        item -> log strength (0 = as strong as the anchor); higher is better.
    """
    items = sorted({x for a, b, _ in pairs for x in (a, b)})
    index = {x: i for i, x in enumerate(items)}
    n = len(items)
    wins = np.full(n, 0.5)  # the virtual tie
    games = np.zeros((n, n))
    for a, b, score in pairs:
        i, j = index[a], index[b]
        wins[i] += score
        wins[j] += 1 - score
        games[i, j] += 1
        games[j, i] += 1
    p = np.ones(n)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(1) + 1 / (p + 1)  # + anchor game
        p = wins / denom
    return {x: float(np.log(p[index[x]])) for x in items}


def incumbent(study: optuna.Study, default: dict[str, float]) -> dict[str, float]:
    """The settings with the highest Bradley-Terry strength (`default` before any pair)."""
    strengths = bradley_terry(preference_pairs(study))
    return json.loads(max(strengths, key=strengths.get)) if strengths else default


def summary(study: optuna.Study) -> dict[str, Any]:
    """Ratings so far: count, best trial and its settings, Bradley-Terry table when pairwise."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out: dict[str, Any] = {"study": study.study_name, "n_rated": len(done)}
    if done:
        best = max(done, key=lambda t: t.value)
        out |= {"best_trial": best.number, "best_value": best.value, "best_params": best.params}
    pairs = preference_pairs(study)
    if pairs:
        out["bradley_terry"] = dict(
            sorted(bradley_terry(pairs).items(), key=lambda kv: -kv[1])[:10]
        )
    return out


def listen(
    params: ListenConfig,
    *,
    n_trials: int | None = None,
    pairwise: bool = False,
    serve: bool = False,
    port: int | None = None,
    poll_seconds: float = 2.0,
    timeout_s: float | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the listening loop until `n_trials` new ratings (default tune.num_trials) arrive.

    Trials left open by an earlier run (clips uploaded, not rated) are picked up again;
    ones that died before their clips were uploaded are failed. Ctrl-C stops cleanly: the
    dashboard shuts down and open trials keep their clips for the next run.

    Args:
        params: the sections it reads (the `tune` section holds the space and the storage).
        n_trials: ratings to collect in this run.
        pairwise: A/B preference mode instead of 1-5 scores.
        serve: also serve optuna-dashboard on serve.host:`port` (printed).
        port: the dashboard's port; None = serve.optuna_port (0 = any free port).
        poll_seconds: how often to look for submitted ratings.
        timeout_s: stop after this long even without enough ratings (None = never).
        echo: where progress lines go.

    Returns:
        `summary(study)` plus told / skipped counts of this run.
    """
    s = open_session(params, pairwise)
    n_trials = s.tp.num_trials if n_trials is None else n_trials
    for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "clips" not in t.user_attrs:  # a run died while generating it
            s.study.tell(t.number, state=TrialState.FAIL)
    server = None
    told = skipped = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        if serve:
            sp = params.serve
            port = sp.optuna_port if port is None else port
            server, _ = start_dashboard(s.storage, s.tp.artifact_dir, port, sp.host)
            echo(f"optuna-dashboard: http://{sp.host}:{server.server_port}/dashboard/")
        while told < n_trials and (deadline is None or time.monotonic() < deadline):
            new, skip = collect(s)
            told, skipped = told + new, skipped + skip
            if new or skip:
                echo(f"listen: {told}/{n_trials} rated, {skipped} skipped")
            open_trials = s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if len(open_trials) < s.tp.num_pending and told + len(open_trials) < n_trials:
                trial = s.study.ask()
                try:
                    prepare(s, trial)
                except optuna.TrialPruned as exc:  # no clip of the full length: nothing to rate
                    s.study.tell(trial.number, state=TrialState.PRUNED)
                    echo(f"listen: trial {trial.number} skipped: {exc}")
                    continue
                echo(f"listen: trial {trial.number} ready to rate")
                continue
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        echo("listen: stopped; open trials keep their clips for the next run")
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    return summary(s.study) | {"told": told, "skipped": skipped}


def markdown(result: Mapping[str, Any]) -> str:
    """A short markdown report of a `listen` result (for the Prefect UI)."""
    lines = [
        f"**{result['study']}**: {result.get('told', 0)} rated this run, "
        f"{result.get('skipped', 0)} skipped, {result['n_rated']} rated in all",
    ]
    if "best_params" in result:
        lines.append(f"best trial {result['best_trial']} ({result['best_value']:.2f}):")
        lines += [f"- `{k}` = {v:.3f}" for k, v in sorted(result["best_params"].items())]
    for item, strength in result.get("bradley_terry", {}).items():
        lines.append(f"- BT {strength:+.2f}: `{item}`")
    return "\n".join(lines)
