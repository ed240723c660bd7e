"""CP vs REMI on one backbone and one budget; relative vs absolute attention at equal steps.

Trains three models with musegen.stages.train on the real tokens (<data.tokens_dir>/{cp,remi}):
CP + relative attention, REMI + relative attention, CP + absolute attention; same model
section, seq_len, batch and steps (so the same number of positions per step). Reports

- sequence lengths: CP words vs REMI tokens per song (train split), and their ratio;
- validation NLL per note: the summed NLL of the fixed validation windows (every target
  scored once) divided by the notes among those targets (CP: type Note words; REMI: Pitch
  tokens), so the two representations are comparable;
- the plateau: each one's best NLL per note (and its step), the budget being long enough
  when both bottom out before the end (valid loss rising or flat after the best);
- time to target: training wall time (eval excluded) and steps until each first reaches
  several NLL-per-note targets between the start and the worse of the two plateaus, and the
  ratio REMI / CP at each (steps too: on a shared machine the seconds of two sequential runs
  see different load; both step on the same backbone, batch and seq_len);
- relative vs absolute attention: final valid loss at the same step (--absolute).

    .venv/bin/python -m bench.cp_vs_remi [--steps 300] [--eval-every 25] [--override F]

Runs log to MLflow experiment `musegen-bench`; outputs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from musegen.config import DataParams, load_section
from musegen.core.checkpoint import load as load_checkpoint
from musegen.core.model import ModelParams
from musegen.stages import train as stage


def note_share(tokens: Path, p: stage.TrainParams) -> tuple[float, float]:
    """Scored targets and notes among them, over the same fixed windows train evaluates."""
    vocab = json.loads((tokens / p.representation / "vocab.json").read_text())
    rows, offsets = stage.load_split(tokens / p.representation, "valid")
    wins, masks = stage.valid_windows(rows, offsets, vocab, p.seq_len, p.num_valid_windows)
    targets = wins[:, 1:, 0]  # (N, T): type (CP) or the token itself (REMI)
    if p.representation == "cp":
        is_note = targets == vocab["events"]["type"].index("Note")
    else:
        pitch_ids = [i for i, e in enumerate(vocab["events"]["token"]) if e.startswith("Pitch_")]
        is_note = np.isin(targets, pitch_ids)
    return float(masks.sum()), float((is_note * masks).sum())


def song_lengths(tokens: Path, representation: str) -> np.ndarray:
    return np.diff(np.load(tokens / representation / "train_offsets.npy"))


def run(
    tokens: Path, tmp: Path, p: stage.TrainParams, m: ModelParams, name: str
) -> list[dict[str, float]]:
    """Train one variant; return its eval history with `nll_per_note` added."""
    out = tmp / name
    p = dataclasses.replace(
        p, metrics_file=str(out / "metrics.json"), plots_file=str(out / "loss.csv")
    )
    print(f"\n== {name}: {p.representation}, {m.attention} attention, {p.max_steps} steps")
    final = stage.train(tokens, dataclasses.replace(p, out_dir=str(out)), m)
    history = load_checkpoint(final, ("history",))["history"]
    n_targets, n_notes = note_share(tokens, p)
    for row in history:  # valid_loss = summed field NLL per target (weights are all 1)
        row["nll_per_note"] = row["valid_loss"] * n_targets / n_notes
    return history


def first_reach(history: list[dict[str, float]], level: float) -> dict[str, float]:
    """Training seconds and step at the first eval whose NLL per note is <= `level`."""
    row = next(r for r in history if r["nll_per_note"] <= level + 1e-9)
    return {"seconds": row["seconds"], "step": row["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--override", action="append", default=[], help="e.g. params-gpu.yaml")
    ap.add_argument("--steps", type=int, help="training steps per run (default train.max_steps)")
    ap.add_argument("--eval-every", type=int, default=25, help="eval interval (curve resolution)")
    ap.add_argument("--absolute", action="store_true", help="also train CP + absolute attention")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the goal: 2)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    overrides = tuple(args.override)
    p = load_section(stage.TrainParams, "train", args.params, overrides)
    m = load_section(ModelParams, "model", args.params, overrides)
    tokens = Path(load_section(DataParams, "data", args.params, overrides).tokens_dir)
    # NLL per note needs the plain sum of field NLLs: every weight 1; windows cover all songs
    p = dataclasses.replace(
        p,
        experiment="musegen-bench",
        max_steps=args.steps or p.max_steps,
        eval_every=args.eval_every,
        save_every=args.steps or p.max_steps,
        num_valid_windows=100_000,
        loss_weights=dict.fromkeys(p.loss_weights, 1.0),
    )

    words, toks = song_lengths(tokens, "cp"), song_lengths(tokens, "remi")
    print(
        f"sequence length per song (train, {len(words)} songs): CP words mean {words.mean():.0f} "
        f"median {np.median(words):.0f}; REMI tokens mean {toks.mean():.0f} median "
        f"{np.median(toks):.0f}; REMI / CP = {toks.sum() / words.sum():.2f}x"
    )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cp-vs-remi-") as tmp:
        cp = run(tokens, Path(tmp), p, m, "cp-relative")
        remi = run(tokens, Path(tmp), dataclasses.replace(p, representation="remi"), m, "remi")
        absolute = dataclasses.replace(m, attention="absolute")
        cp_abs = run(tokens, Path(tmp), p, absolute, "cp-absolute") if args.absolute else None

    best = {
        name: min(h, key=lambda r: r["nll_per_note"]) for name, h in (("cp", cp), ("remi", remi))
    }
    floor = max(b["nll_per_note"] for b in best.values())  # the worse plateau: both reach it
    # a short run can leave one above the other's start: then every target is the floor
    start = max(min(cp[0]["nll_per_note"], remi[0]["nll_per_note"]), floor)
    level = floor  # (after overfitting, the final figures are past the plateaus)
    t_cp, t_remi = first_reach(cp, level)["seconds"], first_reach(remi, level)["seconds"]
    targets = [floor + share * (start - floor) for share in (0.5, 0.25, 0.1, 0.0)]
    reach = [{"target": t, "cp": first_reach(cp, t), "remi": first_reach(remi, t)} for t in targets]
    results = {
        "steps": p.max_steps,
        "seq_len": p.seq_len,
        "batch_size": p.batch_size,
        "device": p.device
        if p.device != "auto"
        else ("cuda" if torch.cuda.is_available() else "cpu"),
        "cp_words_per_song_mean": float(words.mean()),
        "remi_tokens_per_song_mean": float(toks.mean()),
        "remi_over_cp_length": float(toks.sum() / words.sum()),
        "cp_final_nll_per_note": cp[-1]["nll_per_note"],
        "remi_final_nll_per_note": remi[-1]["nll_per_note"],
        "cp_seconds": cp[-1]["seconds"],
        "remi_seconds": remi[-1]["seconds"],
        "common_nll_per_note": level,
        "cp_seconds_to_common": t_cp,
        "remi_seconds_to_common": t_remi,
        "remi_over_cp_time_to_common": t_remi / t_cp,
        "threads": args.threads,
        "plateau": {
            k: {"nll_per_note": b["nll_per_note"], "step": b["step"], "seconds": b["seconds"]}
            for k, b in best.items()
        },
        "time_to_target": reach,
        "relative_final_valid_loss": cp[-1]["valid_loss"],
        "absolute_final_valid_loss": cp_abs[-1]["valid_loss"] if cp_abs else None,
    }
    print("\n== results")
    print(
        f"NLL per note after {p.max_steps} steps: CP {results['cp_final_nll_per_note']:.3f} "
        f"({results['cp_seconds']:.0f} s), REMI {results['remi_final_nll_per_note']:.3f} "
        f"({results['remi_seconds']:.0f} s)"
    )
    print(
        f"time to the worse plateau, NLL/note {level:.3f}: CP {t_cp:.1f} s, REMI {t_remi:.1f} s -> "
        f"REMI / CP = {t_remi / t_cp:.2f}x"
    )
    for k, b in best.items():
        last = "still falling" if b["step"] == p.max_steps else "then flat or rising"
        print(f"{k} plateau: NLL/note {b['nll_per_note']:.3f} at step {b['step']} ({last})")
    print(f"{'target':>8} {'CP s':>7} {'REMI s':>7} {'ratio':>6} {'CP step':>8} {'REMI step':>10}")
    for r in reach:
        cp_r, remi_r = r["cp"], r["remi"]
        print(f"{r['target']:8.3f} {cp_r['seconds']:7.1f} {remi_r['seconds']:7.1f} "
              f"{remi_r['seconds'] / max(cp_r['seconds'], 1e-9):5.2f}x {cp_r['step']:8d} "
              f"{remi_r['step']:10d}")  # fmt: skip
    if cp_abs:
        print(
            f"CP valid loss at step {p.max_steps}: relative "
            f"{results['relative_final_valid_loss']:.4f} vs absolute "
            f"{results['absolute_final_valid_loss']:.4f}"
        )
    print(f"({args.threads} threads; the box may be shared: seconds of sequential runs vary)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
