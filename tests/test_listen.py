"""Listening with people: ratings through optuna-dashboard's HTTP API steer the study.

A scripted rater plays the person: it scores each trial 5 - |pitch temperature - 0.8| * 4
(rounded to the 1-5 choices) and submits the trial's form over HTTP, exactly as the browser
does (POST /api/trials/<trial_id>/user-attrs). The study must move toward 0.8.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import soundfile as sf
from optuna.trial import TrialState

from musegen.apps import listen as ls
from musegen.apps.ui import ServeParams
from musegen.config import load_section
from musegen.stages import tune as tn
from tests.test_tune import make_workspace

TARGET = 0.8


def score(t: optuna.trial.FrozenTrial) -> int:
    """The scripted rater: best at pitch temperature 0.8, one point per 0.25 away."""
    return int(np.clip(round(5 - abs(t.params["temperature.pitch"] - TARGET) * 4), 1, 5))


def post(url: str, body: dict) -> int:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def rater(storage_url: str, study_name: str, base: str, stop: threading.Event) -> list[int]:
    """Rate every trial that is ready; the first one is submitted untouched ("not rated")."""
    storage = optuna.storages.RDBStorage(storage_url)
    seen: list[int] = []
    while not stop.is_set():
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            time.sleep(0.05)
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "clips" not in t.user_attrs or t._trial_id in seen:
                continue
            value = ls.NOT_RATED if not seen else score(t)
            status = post(f"{base}/api/trials/{t._trial_id}/user-attrs", {"user_attrs": {
                ls.RATING_KEY: value}})  # fmt: skip
            assert status == 204
            seen.append(t._trial_id)
        time.sleep(0.05)
    return seen


@pytest.fixture(autouse=True)
def numpy_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSEGEN_RENDERER", "numpy")


@pytest.fixture
def params(tmp_path: Path, real_midi_files: list[Path]) -> Path:
    return make_workspace(
        tmp_path,
        real_midi_files,
        temperature_range={"pitch": [0.2, 2.0]},
        top_p_range={},
        num_clips=1,
        num_pending=1,
        num_startup_trials=5,
    )


def test_ratings_over_http_move_the_study_toward_the_liked_setting(params: Path) -> None:
    tp = load_section(tn.TuneParams, "tune", params)
    storage = tn.open_storage(tp.storage)
    host = load_section(ServeParams, "serve", params).host
    server, _ = ls.start_dashboard(storage, tp.artifact_dir, port=0, host=host)
    assert server.server_address[0] == host == "127.0.0.1"
    base = f"http://127.0.0.1:{server.server_port}"
    stop = threading.Event()
    seen: list[int] = []
    thread = threading.Thread(
        target=lambda: seen.extend(rater(tp.storage, tp.listen_study, base, stop)), daemon=True
    )
    thread.start()
    try:
        summary = ls.listen(
            ls.ListenConfig.load(params), n_trials=20, poll_seconds=0.05, timeout_s=150, echo=print
        )
        study = optuna.load_study(study_name=tp.listen_study, storage=tp.storage)
        # the dashboard serves the trial's MP3 (what the browser's <audio> plays)
        first = study.trials[1]
        clip = first.user_attrs["clips"][0]
        url = f"{base}/artifacts/{study._study_id}/{first._trial_id}/{clip['mp3']}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.headers["Content-Type"] == "audio/mpeg"
            assert len(resp.read()) > 1000
    finally:
        stop.set()
        thread.join(5)
        server.shutdown()
        server.server_close()

    assert summary["told"] == 20 and summary["skipped"] == 1
    skipped = study.trials[0]
    assert skipped.state == TrialState.FAIL  # the untouched submit is no score ...
    assert skipped.user_attrs[ls.RATING_KEY] == ls.NOT_RATED
    requeued = [t for t in study.trials if t.user_attrs.get("requeued_from") == 0]
    assert requeued and requeued[0].params == skipped.params  # ... and comes back
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 20 and all(t.value == score(t) for t in done)
    dist = [abs(t.params["temperature.pitch"] - TARGET) for t in done]
    early, late = np.mean(dist[:6]), np.mean(dist[-6:])
    print(f"mean |t - 0.8|: first 6 {early:.3f}, last 6 {late:.3f}; best {min(dist):.3f}")
    assert late < early
    assert abs(summary["best_params"]["temperature.pitch"] - TARGET) < 0.2
    for t in done:  # blind: hash names only; the dashboard shows raters no score or metric
        assert all(len(c["name"]) == 16 for c in t.user_attrs["clips"])
        assert set(t.user_attrs) <= {"mode", "clips", ls.RATING_KEY, "requeued_from"}
        assert tn.PROXY_KEY in t.system_attrs and tn.METRICS_KEY in t.system_attrs


def test_pairwise_mode_plays_new_against_incumbent(params: Path) -> None:
    tp = load_section(tn.TuneParams, "tune", params)
    session = ls.open_session(ls.ListenConfig.load(params), pairwise=True)
    for _ in range(3):
        trial = session.study.ask()
        ls.prepare(session, trial)
        frozen = session.study.trials[trial.number]
        names = [c["name"] for c in frozen.user_attrs["clips"]]
        assert len(names) == 2 * tp.num_clips
        assert sorted(n.split("-")[0] for n in names) == ["set1", "set2"]
        a_first = frozen.system_attrs[ls.A_FIRST]
        new_d = abs(frozen.params["temperature.pitch"] - TARGET)
        old_d = abs(frozen.system_attrs[ls.B_VALUES]["temperature.pitch"] - TARGET)
        new_better = new_d < old_d
        choice = 1 if new_better == a_first else 2  # set 1 or set 2, as a person would click
        session.storage.set_trial_user_attr(trial._trial_id, ls.PREFERENCE_KEY, choice)
        assert ls.collect(session) == (1, 0)
        assert session.study.trials[trial.number].value == float(new_better)
    # the incumbent (Bradley-Terry best) is never worse for the rater than the first one
    best = session.study.user_attrs["incumbent"]
    base_t = ls.base_values(session)["temperature.pitch"]
    assert abs(best["temperature.pitch"] - TARGET) <= abs(base_t - TARGET)
    assert ls.summary(session.study)["bradley_terry"]


def test_bradley_terry_orders_items_by_wins() -> None:
    rng = np.random.default_rng(0)
    strength = {"a": 2.0, "b": 1.0, "c": 0.0}
    pairs = []
    for _ in range(400):
        x, y = rng.choice(list(strength), 2, replace=False)
        p = 1 / (1 + np.exp(strength[y] - strength[x]))
        pairs.append((x, y, float(rng.random() < p)))
    fit = ls.bradley_terry(pairs)
    assert fit["a"] > fit["b"] > fit["c"]
    assert fit["a"] - fit["c"] == pytest.approx(2.0, abs=0.4)
    # an item that never lost stays finite (the virtual tie)
    assert np.isfinite(ls.bradley_terry([("x", "y", 1.0)])["x"])


@pytest.mark.slow
def test_cli_serve_real_audio_and_ctrl_c(params: Path) -> None:
    """`musegen listen --serve` prints the URL, serves FluidSynth MP3, stops on SIGINT."""
    import socket

    tp = load_section(tn.TuneParams, "tune", params)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MUSEGEN_RENDERER"}  # the real path
    cmd = [sys.executable, "-m", "musegen", "listen", "--serve", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--params", str(params), "--trials", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        while not any("ready to rate" in x for x in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert f"http://127.0.0.1:{port}/dashboard/" in "".join(lines)
        study = optuna.load_study(study_name=tp.listen_study, storage=tp.storage)
        trial = study.trials[0]
        clip = trial.user_attrs["clips"][0]
        url = f"http://127.0.0.1:{port}/artifacts/{study._study_id}/{trial._trial_id}/"
        with urllib.request.urlopen(url + clip["mp3"], timeout=10) as resp:
            data = resp.read()
        mp3 = params.parent / "clip.mp3"
        mp3.write_bytes(data)
        audio, rate = sf.read(mp3)
        assert rate == 22050 and np.abs(audio).max() > 0.1
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "stopped" in out
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard/", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_flow_session_task_serves_and_collects(params: Path) -> None:
    """flows/listen.py's session task (called through .fn) rates and its report names the best."""
    from flows.listen import session

    tp = load_section(tn.TuneParams, "tune", params)
    tn.open_storage(tp.storage)  # the tables, before two threads race to create them in sqlite

    def rate_one() -> None:  # a person who rates the first ready trial 4
        storage = optuna.storages.RDBStorage(tp.storage)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                study = optuna.load_study(study_name=tp.listen_study, storage=storage)
            except KeyError:  # the session has not created it yet
                continue
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if "clips" in t.user_attrs:
                    storage.set_trial_user_attr(t._trial_id, ls.RATING_KEY, 4)
                    return

    thread = threading.Thread(target=rate_one, daemon=True)
    thread.start()
    result = session.fn(params, n_trials=1, pairwise=False, port=0, timeout_s=60)
    thread.join(5)
    assert result["told"] == 1 and result["best_value"] == 4
    text = ls.markdown(result)
    assert "`temperature.pitch`" in text and "1 rated this run" in text


def test_cli_serve_on_a_taken_port_is_one_line_naming_it(params: Path) -> None:
    """The port comes from serve.optuna_port; taken, it is one error line, not a traceback."""
    import socket

    import yaml

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = yaml.safe_load(params.read_text())
        config["serve"]["optuna_port"] = port
        params.write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "musegen", "listen", "--serve", "--params", str(params)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "%|" not in x]
    lines = [x for x in lines if not x.startswith("[I ")]  # optuna's log: the study is opened
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [
        f"error: 127.0.0.1:{port}: cannot serve optuna-dashboard (Address already in use); "
        "is the port taken? pass --port or set serve.optuna_port in params.yaml"
    ], proc.stderr[-3000:]
