"""Training throughput and model FLOP utilisation (MFU) against a matmul peak from the same run.

For each device (CPU; CUDA in bf16 when present) it times full training steps (forward,
backward, clip, AdamW) of the params.yaml model at train.seq_len x train.batch_size, then
times a large square matmul on the same device for the achieved peak FLOP/s, and prints

    MFU = 3 * flops_per_token * tokens/s / peak   (forward + 2x for backward; PaLM App. B)

The batch is random ids within the vocab sizes: throughput does not depend on the values.

    .venv/bin/python bench/train_throughput.py [--override params-gpu.yaml] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from musegen.config import DataParams, load_section
from musegen.model import ModelConfig, ModelParams, MusicTransformer
from musegen.train import TrainParams


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


def train_rate(
    config: ModelConfig, p: TrainParams, device: torch.device, steps: int
) -> tuple[float, int, int]:
    """Training tokens/s at p.batch_size x p.seq_len, forward FLOPs per token, parameters."""
    torch.manual_seed(0)
    model = MusicTransformer(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, fused=device.type == "cuda")
    sizes = torch.tensor(config.vocab_sizes, device=device)
    # random ids in [0, V_f) per field: (B, T + 1, F)
    shape = (p.batch_size, p.seq_len + 1, len(sizes))
    w = (torch.rand(shape, device=device) * sizes).long()
    x, y = w[:, :-1], w[:, 1:]
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    next_type = y[..., 0] if len(sizes) > 1 else None
    elapsed = 0.0
    for i in range(steps + 2):  # the first 2 steps warm up (allocator, kernels)
        sync(device)
        t = time.perf_counter()
        with autocast:
            logits = model(x, next_type=next_type)
        loss = sum(
            torch.nn.functional.cross_entropy(lg.float().flatten(0, 1), y[..., f].flatten())
            for f, lg in enumerate(logits)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        elapsed += (time.perf_counter() - t) if i >= 2 else 0.0
    tps = steps * p.batch_size * p.seq_len / elapsed
    return tps, model.flops_per_token(p.seq_len), model.num_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--override", action="append", default=[], help="e.g. params-gpu.yaml")
    ap.add_argument("--vocab", help="vocab.json (default <data.tokens_dir>/<repr>/vocab.json)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per device")
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped if absent")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    overrides = tuple(args.override)
    p = load_section(TrainParams, "train", args.params, overrides)
    m = load_section(ModelParams, "model", args.params, overrides)
    tokens = Path(load_section(DataParams, "data", args.params, overrides).tokens_dir)
    vocab_path = Path(args.vocab or tokens / p.representation / "vocab.json")
    if not vocab_path.is_file():
        raise SystemExit(f"{vocab_path}: not found; run `dvc repro tokenize` or pass --vocab")
    config = ModelConfig.from_params(m, json.loads(vocab_path.read_text()))

    results = []
    for name in args.devices.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        device = torch.device(name)
        tps, fpt, n_params = train_rate(config, p, device, args.steps)
        # CPU trains in fp32, CUDA under bf16 autocast: the peak uses the same dtype
        dtype, n = (torch.bfloat16, 8192) if name == "cuda" else (torch.float32, 2048)
        peak = matmul_peak(device, n, dtype, repeat=5)
        mfu = 3 * fpt * tps / peak
        cpu = f"cpu x{torch.get_num_threads()} threads"
        row = {"device": torch.cuda.get_device_name() if name == "cuda" else cpu}
        row |= {"dtype": str(dtype).removeprefix("torch."), "tokens_per_s": round(tps, 1)}
        row |= {
            "train_tflops": round(3 * fpt * tps / 1e12, 4),
            "peak_tflops": round(peak / 1e12, 3),
        }
        row |= {"mfu": round(mfu, 4), "params_m": round(n_params / 1e6, 2)}
        row |= {"seq_len": p.seq_len, "batch_size": p.batch_size, "repr": p.representation}
        results.append(row)
        print(
            f"{row['device']:>24} {row['dtype']:>8}: {tps:12,.0f} tokens/s, "
            f"{row['train_tflops']:.3f} TFLOP/s of {row['peak_tflops']:.3f} matmul peak "
            f"-> MFU {mfu:.1%} ({row['params_m']} M params, B={p.batch_size}, T={p.seq_len})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
