"""Hostile checkpoints and killed trainings: one loader refuses bad files in one line, --resume
falls back to the newest good checkpoint, training stops on a non-finite loss, a kill leaves
best.pt, the temp files and the MLflow run in order.

Files are damaged the way disks, kills and people damage them: 0 bytes, cut short, random
bytes, tensor bytes overwritten in place (NaN), a FIFO, a wrong model_config. Kills are real
process deaths (`os._exit` inside the checkpoint write), not exceptions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_sweep import make_checkpoint
from test_train import ROOT, tiny_params, write_override, write_tokens

from musegen.core import generate as gen
from musegen.stages import train as stage


def flip_tensor_bytes(path: Path) -> None:
    """Overwrite the first bytes of the checkpoint's largest tensor with 0xFF (a NaN pattern)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len  # the stored (uncompressed) bytes
    data[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def damage(path: Path, how: str) -> None:
    """Damage a checkpoint file in place."""
    if how == "zero_bytes":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "random_bytes":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif how == "nan_bytes":
        flip_tensor_bytes(path)
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        raise AssertionError(how)


def resave(path: Path, change) -> Path:
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


DAMAGE = ("zero_bytes", "truncated", "random_bytes", "nan_bytes")
EDITS = {
    "model_config_unknown_key": lambda c: c["model_config"].update(heads=4),
    "model_config_missing_key": lambda c: c["model_config"].pop("d_model"),
    "model_config_bad_value": lambda c: c["model_config"].update(n_head=3),
    "model_config_not_dict": lambda c: c.update(model_config=[1, 2]),
    "shape_mismatch": lambda c: c["model_config"].update(d_ff=128),
    "weight_missing": lambda c: c["model"].pop("heads.0.bias"),
    "inf_weight": lambda c: c["model"]["heads.0.bias"].fill_(math.inf),
    "no_model_key": lambda c: c.pop("model"),
}


# ---- one loader: every reader refuses a bad file in one line ------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", [*DAMAGE, *EDITS, "fifo", "directory"])
def test_load_model_refuses_a_bad_checkpoint_in_one_line(tmp_path: Path, how: str) -> None:
    path = make_checkpoint(tmp_path / "step_3.pt", 3, 0, None)
    if how in EDITS:
        resave(path, EDITS[how])
    elif how == "directory":
        path.unlink()
        path.mkdir()
    else:
        damage(path, how)
    with pytest.raises(ValueError) as caught:
        gen.load_model(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message


def test_generate_cli_names_a_wrong_model_config_in_one_line(tmp_path: Path) -> None:
    path = resave(
        make_checkpoint(tmp_path / "bad.pt", 3, 0, None), EDITS["model_config_unknown_key"]
    )
    cmd = [sys.executable, "-m", "musegen", "generate", "--checkpoint", str(path)]
    cmd += ["--n", "1", "--bars", "1", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), done.stderr
    assert not list((tmp_path / "out").glob("*.mid"))


# ---- --resume: the newest good checkpoint; none good: one line, exit 1 ---------------------


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("tokens"))


RUN = {"max_steps": 12, "eval_every": 4, "save_every": 4, "log_every": 2}


def train_tiny(tokens: Path, out: Path, *, resume: bool = False, **changes: object) -> Path:
    p, m = tiny_params(out.parent, **(RUN | changes))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reductions in every run: bit-exact resumes
    try:
        return stage.train(tokens, dataclasses.replace(p, out_dir=str(out)), m, resume=resume)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted tiny run: step_4, step_8, step_12 and best.pt."""
    out = tmp_path_factory.mktemp("straight") / "model"
    train_tiny(tokens, out)
    return out


def copy_run(straight: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(straight, out)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", [*DAMAGE, "fifo"])
def test_resume_falls_back_to_the_newest_good_checkpoint(
    tokens: Path, straight: Path, tmp_path: Path, how: str, capsys: pytest.CaptureFixture
) -> None:
    out = copy_run(straight, tmp_path)
    damage(out / "checkpoints/step_12.pt", how)
    final = train_tiny(tokens, out, resume=True)
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "skipped" in x)
    assert "step_12.pt" in line and line.endswith(
        "resuming from " + str(out / "checkpoints/step_8.pt")
    )
    # the re-run steps 9-12 give the same weights as the run that never broke (CPU: bit-exact)
    a = torch.load(straight / "checkpoints/step_12.pt", weights_only=True)["model"]
    b = torch.load(final, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["nan_bytes", "zero_bytes"])
def test_resume_with_no_good_checkpoint_fails_in_one_line(
    tokens: Path, straight: Path, tmp_path: Path, how: str
) -> None:
    out = copy_run(straight, tmp_path)
    for name in ("step_8.pt", "step_12.pt", "best.pt"):
        (out / "checkpoints" / name).unlink()
    damage(out / "checkpoints/step_4.pt", how)
    done = run_train(tmp_path, tokens, "--resume")
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "step_4.pt" in lines[0] and "--resume" in lines[0], done.stderr
    assert not (out / "checkpoints/step_12.pt").exists()


# ---- a non-finite loss stops training at once, naming the STEP -----------------------------


def test_non_finite_loss_stops_at_its_step(tokens: Path, tmp_path: Path) -> None:
    import mlflow

    p, _ = tiny_params(tmp_path)
    weights = p.loss_weights | {"pitch": math.nan}
    with pytest.raises(stage.TrainError, match=r"^step 1: train loss nan") as caught:
        train_tiny(tokens, tmp_path / "model", loss_weights=weights)
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "model/checkpoints").glob("*.pt"))  # nothing NaN saved
    (run,) = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`musegen.out_dir` = '{(tmp_path / 'model').resolve()}'",
        output_format="list",
    )
    assert run.info.status == "FAILED"  # not RUNNING forever


# ---- kills: best.pt, temp files, the MLflow run --------------------------------------------

#: `musegen train` that dies (os._exit: no cleanup, like SIGKILL) inside the write of the
#: temp file of `<name>.pt` for STEP `step` (files.temp_name), after the store received
#: what was logged
DYING_TRAIN = """
import os, sys
from pathlib import Path
import mlflow, torch
name, step = sys.argv.pop(1), int(sys.argv.pop(1))
save = torch.save
def dying_save(obj, f, *args, **kwargs):
    if Path(f).name.startswith(f".{name}.pt.") and obj["step"] == step:
        Path(f).write_bytes(b"PK\\x03\\x04 half a checkpoint")
        mlflow.flush_async_logging()
        os._exit(137)
    return save(obj, f, *args, **kwargs)
torch.save = dying_save
from musegen.apps.cli import main
sys.argv = ["musegen", "train", *sys.argv[1:]]
main()
"""


def run_train(
    tmp: Path, tokens: Path, *args: str, die_in: tuple[str, int] | None = None, **train: object
) -> subprocess.CompletedProcess:
    """`musegen train` on tmp/model, MLflow experiment tmp.name; `die_in`: (temp name, STEP)."""
    override = write_override(tmp, tokens, tmp / "model", experiment=tmp.name, **(RUN | train))
    cmd = [sys.executable, "-m", "musegen", "train"]
    if die_in:
        cmd = [sys.executable, "-c", DYING_TRAIN, die_in[0], str(die_in[1])]
    cmd += ["--override", str(override), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the session's store (conftest), no migrations
    run = {"cwd": ROOT, "env": env, "capture_output": True, "text": True, "timeout": 180}
    return subprocess.run(cmd, check=False, **run)  # type: ignore[call-overload]


def runs(tmp: Path) -> list:
    """The MLflow runs of run_train(tmp, ...), oldest first."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs([client.get_experiment_by_name(tmp.name).experiment_id])
    return sorted(found, key=lambda r: r.info.start_time)


@pytest.mark.slow
def test_kill_while_best_pt_is_written_then_resume(tokens: Path, tmp_path: Path) -> None:
    killed = run_train(tmp_path, tokens, die_in=("best", 8), max_steps=8)
    assert killed.returncode == 137, killed.stderr[-2000:]
    ckpts = tmp_path / "model/checkpoints"
    assert list(ckpts.glob(".best.pt.*")), "the kill left no temp file: nothing tested"
    resumed = run_train(tmp_path, tokens, "--resume", max_steps=8)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((tmp_path / "model/metrics.json").read_text())
    assert torch.load(ckpts / "best.pt", weights_only=True)["step"] == metrics["best"]["step"] == 8
    assert not [p.name for p in ckpts.iterdir() if ".tmp" in p.name]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_leaves_no_running_run(
    tokens: Path, tmp_path: Path
) -> None:
    assert run_train(tmp_path, tokens, die_in=("step_4", 4)).returncode == 137
    assert [r.info.status for r in runs(tmp_path)] == ["RUNNING"]
    again = run_train(tmp_path, tokens)  # no checkpoint: a fresh start, as a user would
    assert again.returncode == 0, again.stderr[-2000:]
    first, second = runs(tmp_path)
    assert (first.info.status, second.info.status) == ("KILLED", "FINISHED")
    assert first.info.run_name != second.info.run_name  # `random` is seeded before MLflow names
    assert not [p.name for p in (tmp_path / "model/checkpoints").iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_resumed_run_logs_each_step_once(tokens: Path, tmp_path: Path) -> None:
    import mlflow

    assert run_train(tmp_path, tokens, die_in=("step_12", 12)).returncode == 137  # logged 2..12
    resumed = run_train(tmp_path, tokens, "--resume")  # re-runs 9..12
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (run,) = runs(tmp_path)
    client = mlflow.MlflowClient()

    def steps(key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))

    assert steps("lr") == steps("batch_loss") == [2, 4, 6, 8, 10, 12]
    # train_loss is one thing: the mean since the last eval, beside valid_loss (and loss.csv)
    assert steps("train_loss") == steps("valid_loss") == [4, 8, 12]
    rows = (tmp_path / "model/loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,train_loss,valid_loss") and len(rows) == 4


@pytest.mark.slow
def test_sigterm_ends_the_run_killed(tokens: Path, tmp_path: Path) -> None:
    override = write_override(
        tmp_path,
        tokens,
        tmp_path / "model",
        experiment=tmp_path.name,
        **(RUN | {"max_steps": 5000}),
    )
    cmd = [sys.executable, "-m", "musegen", "train", "--override", str(override)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        import mlflow

        deadline = time.monotonic() + 120
        while not (mlflow.MlflowClient().get_experiment_by_name(tmp_path.name) and runs(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)  # inside the loop by now (5000 steps take minutes)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM, (tmp_path / "train.log").read_text()
    finally:
        proc.kill()
        log.close()
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED"
