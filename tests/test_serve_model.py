"""The registered model as a network service: one input schema, every request checked first.

The rules (`register.check_request`) are tested in-process; then a tiny model is registered in
a temporary sqlite store and served with `mlflow models serve` on 127.0.0.1, and the hostile
requests go over HTTP: a server path as the prompt, base64 MIDI, bars 0 and 100000.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import miditoolkit
import pandas as pd
import pytest
from test_register import kept
from test_sweep import PARAMS, make_checkpoint

from mlflow.exceptions import MlflowException
from musegen.config import load_section
from musegen.core.sampling import SampleParams
from musegen.stages import register as stage

# generate.max_bars 32, max_words 4096, max_file_mb 4, min_bars 32
LIMITS = stage.limits_for(stage.RegisterConfig.load(PARAMS))


@pytest.fixture(scope="module")
def prompt_midi(real_midi_dir: Path) -> Path:
    """A real chorale without same-pitch overlaps (see test_register.prompt)."""
    return real_midi_dir / "bach__bwv355.mid"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---- the rules, in-process ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"bars": 0}, r"row 0: bars = 0; expected 1 to 32 \(generate\.max_bars"),
        ({"bars": -5}, "bars = -5; expected 1 to 32"),
        ({"bars": 100000}, "bars = 100000; expected 1 to 32"),
        ({"bars": 4, "prompt_bars": 0.0}, "prompt_bars = 0; expected 1 to 32"),
        ({"bars": 4, "prompt_bars": 2.5}, "prompt_bars = 2.5; expected a whole number"),
        ({"bars": 4, "min_bars": 5}, r"min_bars = 5; expected a whole number 0 to 4 \(bars"),
        ({"bars": 4, "min_bars": -1}, "min_bars = -1; expected a whole number 0 to 4"),
        ({"bars": 4, "min_bars": 1.5}, "min_bars = 1.5; expected a whole number 0 to 4"),
        ({"bars": 4, "prompt": "/etc/passwd"}, "prompt is not a MIDI file's bytes in base64"),
        ({"bars": 4, "prompt": "/etc/passwd1"}, "a path is never opened"),  # valid base64
        ({"bars": 4, "prompt": b64(b"root:x:0:0:root")}, "not a MIDI file's bytes"),
        ({"bars": 4, "prompt": "A" * 6_000_000}, r"prompt over 4 MB \(prepare\.max_file_mb\)"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else "",
)
def test_check_request_refuses_in_one_line(row: dict, message: str) -> None:
    with pytest.raises(MlflowException, match=message) as caught:
        stage.check_request(pd.DataFrame([{"seed": 1} | row]), LIMITS)
    text = caught.value.message
    assert "\n" not in text and "root:x" not in text and caught.value.get_http_status_code() == 400


def test_check_request_reads_no_file_and_bounds_rows(prompt_midi: Path) -> None:
    # a real MIDI path on the server is still only a string: refused, never opened
    with pytest.raises(MlflowException, match="not a MIDI file's bytes in base64"):
        stage.check_request(
            pd.DataFrame([{"seed": 0, "bars": 2, "prompt": str(prompt_midi)}]), LIMITS
        )
    rows = pd.DataFrame({"seed": range(stage.MAX_ROWS + 1), "bars": 2})
    with pytest.raises(MlflowException, match=f"{stage.MAX_ROWS + 1} rows; at most"):
        stage.check_request(rows, LIMITS)
    data = prompt_midi.read_bytes()
    (req,) = stage.check_request(
        pd.DataFrame([{"seed": 3, "bars": 2, "prompt": b64(data)}]), LIMITS
    )
    assert (req.seed, req.bars, req.prompt, req.prompt_bars) == (3, 2, data, 4)
    assert req.min_bars is None  # the version's generate.min_bars


def test_the_pyfunc_composes_the_bars_asked(tmp_path: Path, prompt_midi: Path) -> None:
    """A model that always wants to stop (EOS logit +40), served by the pyfunc: a request for
    N bars gets N (generate.min_bars, as `musegen generate --bars N`); min_bars overrides."""
    from types import SimpleNamespace

    import yaml
    from test_generate import save_random

    sampling = tmp_path / "sampling.yaml"
    plain = stage._plain(load_section(SampleParams, "sample", PARAMS))
    sampling.write_text(yaml.safe_dump(plain))
    ckpt = save_random(tmp_path / "eos.pt", bias={(0, 1): 40.0})  # type id 1 = EOS
    composer = stage.Composer()
    artifacts = {"checkpoint": str(ckpt), "sampling": str(sampling)}
    composer.load_context(SimpleNamespace(artifacts=artifacts, model_config=LIMITS))
    prompt = b64(prompt_midi.read_bytes())
    rows = [
        {"seed": 1, "bars": 6},
        {"seed": 1, "bars": 6, "min_bars": 0},  # the model decides: it stops at once
        {"seed": 1, "bars": 6, "min_bars": 2},
        {"seed": 1, "bars": 3, "prompt": prompt, "prompt_bars": 2},
        {"seed": 1, "bars": 3, "prompt": prompt, "prompt_bars": 2, "min_bars": 1},
    ]
    out = composer.predict(None, pd.DataFrame(rows))
    assert list(out.columns) == list(stage.OUTPUTS)
    assert list(out.n_bars) == [6, 1, 2, 5, 3] and out.n_words[1] < out.n_words[0], out
    # a version registered before min_bars was bundled composes as it did (min_bars 0)
    old = {k: v for k, v in LIMITS.items() if k != "min_bars"}
    composer.load_context(SimpleNamespace(artifacts=artifacts, model_config=old))
    assert list(composer.predict(None, pd.DataFrame(rows[:1])).n_bars) == [1]


def test_limits_need_a_word_and_bar_cap(tmp_path: Path) -> None:
    import yaml

    from musegen.config import ParamsError

    params = yaml.safe_load(PARAMS.read_text())
    params["generate"]["max_words"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"generate\.max_words = 0 \(no cap\)"):
        stage.limits_for(stage.RegisterConfig.load(tmp_path / "params.yaml"))


# ---- over HTTP: `mlflow models serve` on 127.0.0.1 ----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(training_run: dict) -> Iterator[str]:
    """A tiny CP model registered as musegen@champion and served; yields the base URL."""
    tmp, run_id = training_run["tmp"], training_run["run_id"]
    make_checkpoint(tmp / "checkpoints/step_1.pt", 1, 1, run_id)
    params = load_section(stage.RegisterParams, "register", PARAMS)
    sample = load_section(SampleParams, "sample", PARAMS)
    stage.register(params, tmp / "checkpoints/step_1.pt", sample, limits=LIMITS)
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m"]
    cmd += ["models:/musegen@champion", "--env-manager", "local", "-h", "127.0.0.1"]
    cmd += ["-p", str(port), "-w", "1"]
    log = (tmp / "serve.log").open("w")
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` from PATH
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=log,
        start_new_session=True,  # its own process group: uvicorn's worker stops with it
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/ping", timeout=2).close()
                break
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer in 180 s"
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone when it failed to start
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def ask(url: str, rows: list[dict]) -> tuple[int, dict, float]:
    """POST rows to /invocations; (status, JSON body, seconds)."""
    body = json.dumps({"dataframe_records": rows}).encode()
    req = urllib.request.Request(
        f"{url}/invocations", body, {"Content-Type": "application/json"}, method="POST"
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    return status, json.loads(text), time.perf_counter() - t0


def notes(b64_midi: str) -> list:
    return miditoolkit.MidiFile(file=io.BytesIO(base64.b64decode(b64_midi))).instruments[0].notes


@pytest.mark.slow
def test_served_model_over_http(server: str, prompt_midi: Path) -> None:
    # a valid request composes
    status, body, _ = ask(server, [{"seed": 1, "bars": 2}])
    assert status == 200, body
    (piece,) = body["predictions"]
    assert len(notes(piece["midi_base64"])) == piece["n_notes"] > 0 and piece["n_bars"] == 2
    # min_bars is part of the served schema, checked like bars
    status, body, _ = ask(server, [{"seed": 1, "bars": 2, "min_bars": 1}])
    assert status == 200 and body["predictions"][0]["n_bars"] >= 1, body
    status, body, _ = ask(server, [{"seed": 1, "bars": 2, "min_bars": 3}])
    assert status == 400 and "min_bars = 3" in body["message"], body

    # a server path as the prompt: refused, nothing of the file in the answer
    secret = Path("/etc/passwd").read_bytes()[:4].decode(errors="replace")  # "root"
    for path in ("/etc/passwd", "/etc/shadow", "/dev/zero", str(prompt_midi)):
        status, body, seconds = ask(server, [{"seed": 1, "bars": 8, "prompt": path}])
        text = json.dumps(body)
        assert status == 400 and "not a MIDI file's bytes in base64" in body["message"], text
        assert f"found b'{secret}" not in text and "stack_trace" not in text and seconds < 30

    # base64 MIDI: accepted, and the piece opens with the prompt's first two bars
    data = prompt_midi.read_bytes()
    status, body, _ = ask(server, [{"seed": 1, "bars": 2, "prompt": b64(data), "prompt_bars": 2}])
    assert status == 200, body
    from musegen.core.tokenizer import get_tokenizer

    tok = get_tokenizer("cp")
    real = [(n.start, n.pitch) for n in tok.decode(tok.encode(prompt_midi)).instruments[0].notes]
    got = [(n.start, n.pitch) for n in notes(body["predictions"][0]["midi_base64"])]
    assert kept(got, real, bars=2)

    # bars out of 1..generate.max_bars: refused at once, naming the bound
    for bars in (100000, 0, -3):
        status, body, seconds = ask(server, [{"seed": 1, "bars": bars}])
        assert status == 400 and f"bars = {bars}; expected 1 to 32" in body["message"], body
        assert seconds < 10

    # the most a request may ask for (generate.max_bars bars) ends within generate.max_words
    status, body, seconds = ask(server, [{"seed": 2, "bars": 32}])
    assert status == 200 and body["predictions"][0]["n_words"] <= LIMITS["max_words"] + 2
