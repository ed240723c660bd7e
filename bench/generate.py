"""Generation speed, real-time factor and a 36-minute piece, against a recompute peer.

1. Real-time factor of `generate()` end to end (sampling and grammar masks included): seconds
   of music per second of compute, with --checkpoint (a trained model gives a realistic
   music-per-word rate; without it, a random-init model of the params.yaml shape).
2. A 36-minute piece (max_minutes=36, EOS suppressed so only the cap ends it): wall time,
   peak RSS (getrusage; tracemalloc would miss tensors and slows Python ~2x), and per
   2-minute window the duplicate-bar rate and pitch-class entropy (metrics.piece_metrics).
3. Words/s of one decoding step at 256, 1k and 4k words of context on the params.yaml model
   shape (random init, max_len = context): the KV cache (one new word against a cache trimmed
   to max_len - 1, as `musegen.generate` runs it) vs recomputing the whole window each step
   (what a cache-less sampler such as netpi's CP port does). The peer gets its best thread
   count (1 or all); the cached path runs on 1 thread, as `generate` does on CPU.
   Runs last, so the 4k-word peer's memory does not show in part 2's peak RSS.

    .venv/bin/python -m bench.generate --checkpoint models/cp/checkpoints/best.pt

(Run it as a module: by path, bench/ comes first on sys.path and bench/tokenize.py shadows
the standard library's tokenize.)
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from musegen import generate as gen
from musegen.config import load_section
from musegen.metrics import piece_metrics
from musegen.midi import TICKS_PER_BEAT, Score, to_score
from musegen.model import ModelConfig, ModelParams, MusicTransformer
from musegen.sampling import SampleParams
from musegen.tokenizer import EOS, get_tokenizer

BAR_TICKS = 4 * TICKS_PER_BEAT


def step_rates(shape: ModelParams, vocab: dict, context: int, steps: int) -> dict[str, float]:
    """Words/s of one step at `context` words: cached vs full-window recompute."""
    config = ModelConfig.from_params(dataclasses.replace(shape, max_len=context), vocab)
    model = MusicTransformer(config).eval()
    words = np.load(Path("data/tokens/cp/test.npy"), mmap_mode="r")[: context + steps]
    x = torch.as_tensor(np.asarray(words, np.int64))[None]  # (1, T, F) real words
    out = {}
    with torch.inference_mode():
        torch.set_num_threads(1)
        _, cache = model.hidden(x[:, : context - 1], window=context)  # a full window
        t = time.perf_counter()
        for i in range(steps):
            cache = cache.trim(context - 1)
            h, cache = model.hidden(x[:, context - 1 + i : context + i], cache)
            model.head_logits(h)
        out["cached"] = steps / (time.perf_counter() - t)
        best = 0.0
        for threads in sorted({1, torch.get_num_interop_threads(), _cores()}):
            torch.set_num_threads(threads)
            n = max(2, steps // (context // 64))  # fewer recompute steps: each costs O(T^2)
            t = time.perf_counter()
            for i in range(n):
                h, _ = model.hidden(x[:, i + 1 : context + i + 1])
                model.head_logits(h[:, -1:])
            best = max(best, n / (time.perf_counter() - t))
        out["recompute"] = best
    torch.set_num_threads(_cores())
    return out


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def tick_seconds(score: Score, ticks: np.ndarray) -> np.ndarray:
    """Seconds of many ticks under the score's tempo map (vectorised Score.seconds)."""
    tempos = sorted(score.tempos) or [(0, 120.0)]
    if tempos[0][0] > 0:
        tempos = [(0, 120.0), *tempos]
    at = np.array([t for t, _ in tempos], float)
    spt = 60.0 / (np.array([b for _, b in tempos]) * TICKS_PER_BEAT)  # seconds per tick
    start_sec = np.concatenate([[0.0], np.cumsum(np.diff(at) * spt[:-1])])
    i = np.searchsorted(at, ticks, side="right") - 1
    return start_sec[i] + (ticks - at[i]) * spt[i]


def windows(score: Score, seconds: float) -> list[dict[str, float]]:
    """piece_metrics of each `seconds`-long window, shifted to start on a bar line."""
    sec = tick_seconds(score, score.notes[:, 0].astype(float))
    rows = []
    for w in range(int(sec.max() // seconds) + 1 if len(sec) else 0):
        notes = score.notes[(sec >= w * seconds) & (sec < (w + 1) * seconds)].copy()
        if not len(notes):
            rows.append({"window": w, "notes": 0})
            continue
        notes[:, :2] -= notes[0, 0] // BAR_TICKS * BAR_TICKS
        m = piece_metrics(Score(notes=notes))
        rows.append({"window": w, "notes": len(notes), **m})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="trained checkpoint for parts 1 and 2")
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--steps", type=int, default=64, help="cached steps timed per context")
    ap.add_argument("--minutes", type=float, default=36.0)
    ap.add_argument("--rtf-words", type=int, default=2000)
    args = ap.parse_args()
    shape = load_section(ModelParams, "model", "params.yaml")
    sample = load_section(SampleParams, "sample", "params.yaml")
    vocab = get_tokenizer("cp").vocab

    if args.checkpoint:
        loaded = gen.load_model(args.checkpoint, device="cpu")
        what = f"{args.checkpoint} (step {loaded.step})"
    else:
        tmp = Path(tempfile.mkdtemp()) / "random.pt"
        config = ModelConfig.from_params(shape, vocab)
        state = {"model": MusicTransformer(config).state_dict(), "vocab": vocab}
        torch.save(state | {"model_config": dataclasses.asdict(config)}, tmp)
        loaded, what = gen.load_model(tmp, device="cpu"), "random init (pass --checkpoint)"
    with torch.no_grad():  # only the caps end a piece here
        loaded.model.heads[0].bias[EOS] = float("-inf")

    print(f"1. real-time factor of generate(), {what}")
    t = time.perf_counter()
    out = gen.generate(loaded, sample, max_words=args.rtf_words, seed=0)
    took = time.perf_counter() - t
    music = gen.piece_seconds(loaded.tokenizer, out)
    print(f"{len(out) - 2} words in {took:.2f} s = {(len(out) - 2) / took:.0f} words/s; "
          f"{music:.0f} s of music -> real-time factor {music / took:.0f}x")  # fmt: skip

    print(f"\n2. a {args.minutes:g}-minute piece (max_minutes), {what}")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    out = gen.generate(loaded, sample, max_minutes=args.minutes, max_words=500_000, seed=1)
    took = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    score = to_score(loaded.tokenizer.decode(out))
    music = score.seconds()
    print(f"{len(out) - 2} words, {len(score.notes)} notes, {music / 60:.1f} min of music in "
          f"{took:.1f} s ({(len(out) - 2) / took:.0f} words/s, real-time {music / took:.0f}x); "
          f"peak RSS {rss / 1024:.0f} MiB (before: {rss0 / 1024:.0f}); "
          f"grammar violations {loaded.tokenizer.check(out)}")  # fmt: skip
    print(f"{'window':>6} {'notes':>6} {'dup_bar_rate':>13} {'pc_entropy':>11}")
    for row in windows(score, 120.0):
        if row["notes"]:
            print(f"{row['window'] * 2:>4}m {row['notes']:>6} {row['dup_bar_rate']:>13.3f} "
                  f"{row['pitch_class_entropy']:>11.3f}")  # fmt: skip
        else:
            print(f"{row['window'] * 2:>4}m      0  (silent)")

    # last: the 4k-word recompute peer would otherwise set the peak RSS of part 2
    print(f"\n3. one decoding step, d_model {shape.d_model}, {shape.n_layer} layers, CPU")
    print(f"{'context':>8} {'cached w/s':>11} {'recompute w/s':>14} {'speed-up':>9}")
    for context in (int(c) for c in args.contexts.split(",")):
        r = step_rates(shape, vocab, context, args.steps)
        print(f"{context:>8} {r['cached']:>11.1f} {r['recompute']:>14.2f} "
              f"{r['cached'] / r['recompute']:>8.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
