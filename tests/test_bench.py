"""Every bench/ script, run as the README says (`python -m bench.<name>` from a repository
root, a clean environment without MLFLOW_* variables), on the smallest budget its flags allow.

Each test checks what the script promises to print: its ratios against a peer from the same
run, as finite numbers that agree with the figures beside them. bench.tokenize runs on the
real pieces of `real_midi_dir` from this checkout; the others need a repository after
`dvc repro` (tokens, checkpoints), the end-to-end repo of conftest, so they are slow.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import needs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUMBER = r"(-?[\d,]+\.?\d*|nan|inf)"


def bench(name: str, *args: str | Path, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """`python -m bench.<name> args` through bash in `cwd`, as a new user's shell runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    script = shlex.join(["python", "-m", f"bench.{name}", *map(str, args)])
    proc = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if ok:
        assert proc.returncode == 0, f"{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def numbers(pattern: str, text: str) -> list[float]:
    """The numbers of the one line matching `pattern` ({} marks each number), all finite."""
    found = re.findall(pattern.replace("{}", NUMBER), text, flags=re.MULTILINE)
    assert len(found) == 1, f"{len(found)} lines match {pattern!r}:\n{text}"
    values = [float(v.replace(",", "")) for v in np.atleast_1d(found[0])]
    assert all(math.isfinite(v) for v in values), (pattern, values)
    return values


@pytest.fixture(scope="module")
def root(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository root as a user has it after `dvc repro`: the end-to-end repo's params,
    data and models (copied, so no bench changes that repo or its MLflow store) and bench/."""
    root = tmp_path_factory.mktemp("bench") / "musegen"
    root.mkdir()
    shutil.copy(repo / "params.yaml", root / "params.yaml")
    for src in (repo / "data", repo / "models", ROOT / "bench"):
        shutil.copytree(src, root / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_tokenize_prints_speed_ups_over_miditok(real_midi_dir: Path) -> None:
    out = bench(
        "tokenize", "--midi-dir", real_midi_dir, "--repeat", "1", "--limit", "3", cwd=ROOT
    ).stdout
    assert numbers(r"^{} files, {} notes from ", out)[0] == 3
    for rep in ("remi", "cp"):
        fast, slow, peer, speed_up = numbers(rf"^{rep}\s+{{}}\s+{{}}\s+{{}}\s+{{}}x$", out)
        assert min(fast, slow, peer) > 0
        assert speed_up == pytest.approx(fast / peer, rel=0.01, abs=0.06), out  # to 0.1
    parse = r"symusic read_score {} files/s, miditoolkit load_midi {} files/s \({}x\)"
    sym, mtk, ratio = numbers(parse, out)
    assert ratio == pytest.approx(sym / mtk, abs=0.6), out  # printed to 1


@pytest.mark.slow
def test_train_throughput_prints_each_attention_path_against_absolute(
    root: Path, tmp_path: Path
) -> None:
    out = bench("train_throughput", "--steps", "1", "--json", tmp_path / "t.json", cwd=root).stdout
    peak = numbers(r"^cpu x\d+, float32, B=\d+ T=\d+: matmul peak {} TFLOP/s", out)[0]
    assert peak > 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "t.json").read_text())}
    assert set(rows) == {"absolute", "relative/skew", "relative/gather"}, rows
    for variant, row in rows.items():
        tps, ratio, mfu = numbers(rf"^\s+{variant}\s+{{}}\s+{{}}x\s+{{}}%$", out)
        assert tps == pytest.approx(row["tokens_per_s"], abs=1)
        assert ratio == pytest.approx(row["vs_absolute"], abs=0.006)
        assert row["vs_absolute"] == pytest.approx(
            row["tokens_per_s"] / rows["absolute"]["tokens_per_s"], rel=0.01
        )
        assert 0 < mfu == pytest.approx(100 * row["mfu"], abs=0.1)
    assert numbers(r"^data: one batch from the memory-mapped tokens takes {} ms", out)[0] > 0


@pytest.mark.slow
def test_generate_prints_batched_cached_and_long_piece_figures(root: Path) -> None:
    checkpoint = "models/cp/checkpoints/best.pt"
    out = bench(
        "generate", "--checkpoint", checkpoint, "--contexts", "32,128", "--steps", "4",
        "--minutes", "0.5", "--rtf-words", "32", "--n", "2", cwd=root,
    ).stdout  # fmt: skip
    # pieces, words/s, (CPU), music s, real-time, (CPU): the 1-piece and the 2-piece rows
    row = r"^\s+{}\s+{}\s+{}\s+{}\s+{}x\s+{}x$"
    rows = {n: numbers(row.replace("{}", str(n), 1), out)[0] for n in (1, 2)}  # words/s
    ratio, cpu_ratio, rtf, _ = numbers(
        r"^batched 2 vs 1: {}x words/s \({}x per CPU second; goal >= 5x at 8\); aggregate "
        r"real-time factor {}x \({}x per CPU second", out
    )  # fmt: skip
    assert ratio == pytest.approx(rows[2] / rows[1], rel=0.05) and cpu_ratio > 0 and rtf > 0
    assert numbers(r"single stream {} words/s = {}% of it", out)[1] > 0
    words, notes, minutes, violations = numbers(
        r"^{} words, {} notes, {} min of music in .* grammar violations {}$", out
    )
    assert words > 0 and notes > 0 and violations == 0
    assert minutes == pytest.approx(0.5, abs=0.1)  # only the cap ends it
    for context in (32, 128):  # 32 < 64: the recompute peer's step count once divided by 0
        cached, recompute, speed_up = numbers(rf"^\s+{context}\s+{{}}\s+{{}}\s+{{}}x$", out)
        assert speed_up == pytest.approx(cached / recompute, rel=0.05, abs=0.06)


@pytest.mark.slow
def test_generate_refuses_contexts_longer_than_the_test_split(root: Path) -> None:
    words = len(np.load(root / "data/tokens/cp/test.npy", mmap_mode="r"))
    proc = bench("generate", "--contexts", str(words), cwd=root, ok=False)
    assert proc.returncode == 1 and not proc.stdout, proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"data/tokens/cp/test.npy: {words} words, too few for --contexts {words} + --steps 64; "
        "pass smaller --contexts"
    ]


@pytest.mark.slow
def test_cp_vs_remi_prints_remi_over_cp_ratios(root: Path, tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    out = bench(
        "cp_vs_remi", "--steps", "4", "--eval-every", "2", "--absolute", "--threads", "1",
        "--json", result, cwd=root,
    ).stdout  # fmt: skip
    lengths = {
        rep: np.diff(np.load(root / f"data/tokens/{rep}/train_offsets.npy")).sum()
        for rep in ("cp", "remi")
    }
    length_ratio = numbers(r"^sequence length per song .* REMI / CP = {}x$", out)[0]
    assert length_ratio == pytest.approx(lengths["remi"] / lengths["cp"], abs=0.006)
    level, t_cp, t_remi, ratio = numbers(
        r"^time to the worse plateau, NLL/note {}: CP {} s, REMI {} s -> REMI / CP = {}x$", out
    )
    figures = json.loads(result.read_text())
    assert figures["steps"] == 4 and figures["threads"] == 1
    assert level == pytest.approx(figures["common_nll_per_note"], abs=6e-4)
    assert t_cp == pytest.approx(figures["cp_seconds_to_common"], abs=0.06) and t_cp > 0
    assert t_remi == pytest.approx(figures["remi_seconds_to_common"], abs=0.06) and t_remi > 0
    assert ratio == pytest.approx(figures["remi_over_cp_time_to_common"], abs=0.006)
    # 4 steps leave one above the other's start: every target still lies at or above the
    # worse plateau, so both reach it (they once ran past their histories)
    floor = max(b["nll_per_note"] for b in figures["plateau"].values())
    assert len(figures["time_to_target"]) == 4
    for row in figures["time_to_target"]:
        assert row["target"] >= floor - 1e-9, (row, floor)
        assert row["cp"]["step"] <= 4 and row["remi"]["step"] <= 4
    relative, absolute = numbers(r"^CP valid loss at step 4: relative {} vs absolute {}$", out)
    assert relative == pytest.approx(figures["relative_final_valid_loss"], abs=6e-5)
    assert absolute == pytest.approx(figures["absolute_final_valid_loss"], abs=6e-5)
    # the three runs went to the root's own MLflow store, experiment musegen-bench
    with sqlite3.connect(root / "mlflow/mlflow.db") as db:
        runs = db.execute(
            "select count(*) from runs join experiments using (experiment_id) "
            "where experiments.name = 'musegen-bench'"
        ).fetchone()[0]
    assert runs == 3


@needs(
    "fluidsynth", install="apt-get install --no-install-recommends fluidsynth timgm6mb-soundfont"
)
@pytest.mark.slow
def test_transcribe_scores_a_held_out_piece_against_its_peers(root: Path, tmp_path: Path) -> None:
    # the shortest held-out piece alone: bench.transcribe takes its test and valid splits
    manifest = pd.read_csv(root / "data/prepared/manifest.csv", keep_default_na=False)
    held = manifest[(manifest.status == "ok") & (manifest.split != "train")]
    piece = held.sort_values("seconds").iloc[0]
    folder = root / "short"
    folder.mkdir(exist_ok=True)
    shutil.copy(root / "data/raw/m21-keyboard" / Path(piece.path).name, folder)
    result = tmp_path / "t.json"
    out = bench(
        "transcribe", "--midi-dir", "short", "--num-files", "1", "--long-minutes", "0",
        "--json", result, cwd=root,
    ).stdout  # fmt: skip
    assert out.startswith("1 held-out pieces from short, rendered to "), out
    figures = json.loads(result.read_text())["figures"]
    assert figures["files"] == 1
    assert figures["audio_minutes"] == pytest.approx(float(piece.seconds) / 60, abs=0.1)
    clean = figures["clean"]
    assert all(0 <= v <= 1 for v in clean.values()), clean
    # a rendered piece transcribes back well; basic-pitch's own predict() is the peer
    assert clean["onset_f1"] > 0.6 and clean["peer_onset_f1"] > 0.6, clean
    assert clean["beat_f"] > 0.6, clean
    if shutil.which("sox"):
        assert all(0 <= v <= 1 for v in figures["noisy"].values()), figures["noisy"]
    for key in ("x_realtime_1_thread", "peer_x_realtime_1_thread", "x_realtime_folder_all_cores",
                "x_realtime_model_alone_1_thread"):  # fmt: skip
        assert figures[key] > 0, (key, figures[key])
