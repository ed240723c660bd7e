"""Training throughput and model FLOP utilisation (MFU) against a matmul peak from the same run.

For each device (CPU; CUDA in bf16 when present) it times full training steps (forward,
backward, clip, fused AdamW) of the params.yaml model at train.seq_len x train.batch_size:
absolute attention, and relative attention through each path that has a backward there
(skew, gather; flex on CUDA), optionally compiled (--compile); then it times a large square
matmul on the same device for the achieved peak FLOP/s, and prints per variant tokens/s, the
ratio to absolute attention, and

    MFU = 3 * flops_per_token * tokens/s / peak   (forward + 2x for backward; PaLM App. B)

(on CUDA also against the vendor's dense bf16 peak). The README's "auto" choice per device
comes from this table.

The batch is random ids within the vocab sizes: throughput does not depend on the values.

    .venv/bin/python -m bench.train_throughput [--override params-gpu.yaml] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from musegen.config import DataParams, load_section
from musegen.core.model import ModelConfig, ModelParams, MusicTransformer
from musegen.core.tokenizer import get_tokenizer
from musegen.stages import train as stage
from musegen.stages.train import TrainParams

#: dense bf16 tensor-core peaks from the vendor's data sheets (FLOP/s), matched by name
VENDOR_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def vendor_peak(name: str) -> float | None:
    return next((v for k, v in VENDOR_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, repeat: int) -> float:
    """Achieved FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs), best of `repeat`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, thread pool)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_step(
    config: ModelConfig, p: TrainParams, device: torch.device, impl: str, compiled: bool
) -> tuple[Callable[[], None], MusicTransformer]:
    """One full training step (forward, backward, clip, AdamW) of a fresh model, as a closure."""
    torch.manual_seed(0)
    model = MusicTransformer(config).to(device).set_attention_impl(impl)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, fused=True)  # fused: CPU and CUDA
    forward = torch.compile(model) if compiled else model
    sizes = torch.tensor(config.vocab_sizes, device=device)
    # random ids in [0, V_f) per field: (B, T + 1, F)
    shape = (p.batch_size, p.seq_len + 1, len(sizes))
    w = (torch.rand(shape, device=device) * sizes).long()
    x, y = w[:, :-1], w[:, 1:]
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    next_type = y[..., 0] if len(sizes) > 1 else None

    def step() -> None:
        with autocast:
            logits = forward(x, next_type=next_type)
        loss = sum(
            torch.nn.functional.cross_entropy(lg.float().flatten(0, 1), y[..., f].flatten())
            for f, lg in enumerate(logits)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def time_steps(
    steps: dict[str, Callable[[], None]], device: torch.device, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Best seconds per step of each variant, the variants interleaved round by round, and
    the seconds of each variant's first step (for a compiled one: compilation included).

    Interleaving and the minimum keep the ratios fair on a shared machine: a burst of load
    from other processes hits every variant, and the least-disturbed step is the estimate.
    """
    first = {}
    for name, step in steps.items():  # warm-up: allocator, kernels, compilation
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        first[name] = time.perf_counter() - t
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t)
    return best, first


def batch_seconds(repr_dir: Path, vocab: dict, p: TrainParams, repeat: int = 20) -> float:
    """Best seconds to assemble one training batch the way `musegen train` does."""
    rows, offsets = stage.load_split(repr_dir, "train")
    starts = stage.bar_starts(rows, offsets, vocab)
    ends = offsets[np.searchsorted(offsets, starts, side="right")]
    rng, best = np.random.default_rng(0), float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        picks = rng.integers(0, len(starts), p.batch_size)
        batch = [stage.window(rows, starts[i], ends[i], p.seq_len) for i in picks]
        torch.from_numpy(np.stack([b[0] for b in batch]))
        torch.from_numpy(np.stack([b[1] for b in batch]))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--override", action="append", default=[], help="e.g. params-gpu.yaml")
    ap.add_argument("--vocab", help="vocab.json (default <data.tokens_dir>/<repr>/vocab.json)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (rounds)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped if absent")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    overrides = tuple(args.override)
    p = load_section(TrainParams, "train", args.params, overrides)
    m = load_section(ModelParams, "model", args.params, overrides)
    tokens = Path(load_section(DataParams, "data", args.params, overrides).tokens_dir)
    vocab_path = Path(args.vocab or tokens / p.representation / "vocab.json")
    if vocab_path.is_file():
        vocab = json.loads(vocab_path.read_text())
    else:  # before `dvc repro tokenize`: the tokenizer's default vocab has the same sizes
        vocab = get_tokenizer(p.representation).vocab
    config = ModelConfig.from_params(m, vocab)

    results = []
    for name in args.devices.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped (GPU figures not measured)")
            continue
        device = torch.device(name)
        impls = ["skew", "gather"] + (["flex"] if name == "cuda" else [])
        variants = {
            "absolute": make_step(replace(config, attention="absolute"), p, device, "auto", False)
        }
        if config.attention == "relative":
            variants |= {f"relative/{i}": make_step(config, p, device, i, False) for i in impls}
        if args.compile:  # train.compile: true, the auto path compiled
            variants["relative/auto compiled"] = make_step(config, p, device, "auto", True)
        best, first = time_steps({k: v[0] for k, v in variants.items()}, device, args.steps)
        # CPU trains in fp32, CUDA under bf16 autocast: the peak uses the same dtype
        dtype, n = (torch.bfloat16, 8192) if name == "cuda" else (torch.float32, 2048)
        peak = matmul_peak(device, n, dtype, repeat=5)
        label = (
            torch.cuda.get_device_name() if name == "cuda" else f"cpu x{torch.get_num_threads()}"
        )
        vendor = vendor_peak(label) if name == "cuda" else None
        print(f"\n{label}, {str(dtype).removeprefix('torch.')}, B={p.batch_size} T={p.seq_len}: "
              f"matmul peak {peak / 1e12:.3f} TFLOP/s (measured)"
              + (f", vendor bf16 peak {vendor / 1e12:.0f}" if vendor else ""))  # fmt: skip
        print(f"{'variant':>24} {'tokens/s':>10} {'vs absolute':>12} {'MFU':>7}"
              + (f" {'MFU vendor':>11}" if vendor else ""))  # fmt: skip
        tps_abs = p.batch_size * p.seq_len / best["absolute"]
        for variant, (_, model) in variants.items():
            tps = p.batch_size * p.seq_len / best[variant]
            mfu = 3 * model.flops_per_token(p.seq_len) * tps / peak
            row = {"device": label, "variant": variant, "dtype": str(dtype).removeprefix("torch.")}
            row |= {"tokens_per_s": round(tps, 1), "vs_absolute": round(tps / tps_abs, 3)}
            row |= {"peak_tflops": round(peak / 1e12, 3), "mfu": round(mfu, 4)}
            row |= {"params_m": round(model.num_params() / 1e6, 2), "seq_len": p.seq_len}
            line = f"{variant:>24} {tps:10,.0f} {tps / tps_abs:11.2f}x {mfu:7.1%}"
            if vendor:
                row["mfu_vendor"] = round(mfu * peak / vendor, 4)
                line += f" {row['mfu_vendor']:11.1%}"
            print(line)
            results.append(row)
        if args.compile:  # train.compile both ways over a whole run of train.max_steps
            model = variants["relative/auto compiled"][1]
            auto = f"relative/{model.blocks[0].attn.resolved_impl(device)}"
            auto = auto if auto in best else "absolute"
            extra = first["relative/auto compiled"] - best["relative/auto compiled"]
            words = p.max_steps * p.batch_size * p.seq_len
            eager = words / (p.max_steps * best[auto])
            compiled = words / (p.max_steps * best["relative/auto compiled"] + extra)
            print(f"train.compile over train.max_steps = {p.max_steps}: false {eager:,.0f} "
                  f"words/s ({auto}), true {compiled:,.0f} words/s including {extra:.0f} s of "
                  f"compilation: {compiled / eager:.2f}x")  # fmt: skip
            results.append(
                {
                    "device": label,
                    "train_compile_speedup": round(compiled / eager, 3),
                    "compile_seconds": round(extra, 1),
                    "max_steps": p.max_steps,
                }
            )
    if (tokens / p.representation / "train.npy").is_file():
        seconds = batch_seconds(tokens / p.representation, vocab, p)
        step = min(
            r["seq_len"] * p.batch_size / r["tokens_per_s"] for r in results if "seq_len" in r
        )
        print(f"data: one batch from the memory-mapped tokens takes {seconds * 1e3:.2f} ms, "
              f"{seconds / step:.2%} of the fastest step: not worth a loader thread")  # fmt: skip
    print("\n(variants interleaved, best step of each; the box may be shared: compare ratios)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
