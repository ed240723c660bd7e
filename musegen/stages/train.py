"""Train the CP (or REMI) Transformer: one function read top to bottom, nanoGPT style.

Order: setup (device, seeds, DDP), data (bar-aligned windows), model (scratch or resume),
optimizer, MLflow, loop (lr, micro-steps, clip, step, log, eval, checkpoint), reports.
Checkpoints hold only tensors, plain containers and primitives, so `torch.load(...,
weights_only=True)` reads them; a run killed at any point and resumed on CPU ends with the same
weights, bit for bit, as one that never stopped.

DDP: ``torchrun --standalone --nproc_per_node=N -m musegen train [--resume] [--override F]``;
each rank samples its own stream, rank 0 alone logs and saves.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from musegen import paths, tracking
from musegen.config import DataParams, StageConfig, flatten
from musegen.core import checkpoint
from musegen.core.augment import Augmenter
from musegen.core.model import ModelParams
from musegen.files import write_headline

#: train.* keys that do not change the weights: a resume may change them.
UNHASHED = ("out_dir", "metrics_file", "plots_file", "experiment", "device", "compile")
UNHASHED += ("eval_every", "save_every", "keep_last", "log_every")


class TrainError(RuntimeError):
    """Training cannot start or resume (no checkpoint, changed params, tracking store down)."""


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """The `train` section of params.yaml (every key documented there)."""

    representation: str
    out_dir: str
    metrics_file: str
    plots_file: str
    experiment: str
    device: str
    seed: int
    seq_len: int
    batch_size: int
    num_micro_steps: int
    max_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    loss_weights: dict[str, float]
    transpose_range: int
    tempo_shift_range: int
    eval_every: int
    save_every: int
    keep_last: int
    log_every: int
    num_valid_windows: int
    compile: bool


def load_split(tokens_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one split: rows (N, F) (REMI becomes (N, 1)) and song offsets (S + 1,)."""
    rows = np.load(paths.split_rows(tokens_dir, split), mmap_mode="r")
    offsets = np.load(paths.split_offsets(tokens_dir, split))
    return (rows if rows.ndim == 2 else rows.reshape(-1, 1)), offsets


def bar_starts(rows: np.ndarray, offsets: np.ndarray, vocab: dict) -> np.ndarray:
    """Rows where a window may start: every song start and every Bar (sorted, unique)."""
    # CP marks bars in the bar_beat field, REMI with a "Bar" token in its only field.
    field = "bar_beat" if "bar_beat" in vocab["fields"] else vocab["fields"][0]
    bar_id = vocab["events"][field].index("Bar")
    col = np.asarray(rows[:, vocab["fields"].index(field)])
    return np.union1d(offsets[:-1], np.flatnonzero(col == bar_id))


def window(rows: np.ndarray, start: int, end: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows start..start+seq_len (inclusive, for targets) clipped at `end`, zero-padded.

    Returns:
        (seq_len + 1, F) int64 rows and a (seq_len,) float32 target mask (0 past the song end).
    """
    take = np.asarray(rows[start : min(start + seq_len + 1, end)], dtype=np.int64)
    out = np.zeros((seq_len + 1, rows.shape[1]), dtype=np.int64)  # id 0 = padding in every field
    out[: len(take)] = take
    mask = (np.arange(seq_len) < len(take) - 1).astype(np.float32)  # target t is row t + 1
    return out, mask


def valid_windows(
    rows: np.ndarray, offsets: np.ndarray, vocab: dict, seq_len: int, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed windows tiling every valid song; each target row is scored exactly once.

    A song's windows start at its first row, then at the last bar start inside the previous
    window, and mask targets the previous window already scored. More than `cap` windows are
    thinned to `cap` evenly spaced ones (songs stay represented).

    Returns:
        windows (N, seq_len + 1, F) int64 and masks (N, seq_len) float32.
    """
    starts = bar_starts(rows, offsets, vocab)
    wins, masks = [], []
    for begin, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        s, scored = begin, begin + 1  # rows < scored already have a loss (the first row never)
        while scored < end:
            w, m = window(rows, s, end, seq_len)
            m[: max(0, scored - s - 1)] = 0  # target t is row s + t + 1
            wins.append(w)
            masks.append(m)
            scored = min(s + seq_len + 1, end)
            # next start: the last bar start that still sees row `scored` as a target
            inside = starts[(starts > s) & (starts < scored)]
            s = int(inside[-1]) if len(inside) else scored - 1
    if not wins:
        raise TrainError("valid split has no song with 2 or more rows: re-run `musegen tokenize`")
    keep = np.unique(np.linspace(0, len(wins) - 1, min(cap, len(wins))).round().astype(int))
    return np.stack(wins)[keep], np.stack(masks)[keep]


def per_type_unigram(rows: np.ndarray, targets: np.ndarray, sizes: list[int]) -> list[float]:
    """The training stage's baseline: per field, the mean NLL (nats) of `targets` under add-one
    smoothed train frequencies of the first field (type; REMI's one token), and of each other
    field given the word's type (the model's other heads see the type too). Below it = the
    model learned more than which values each word type carries.

    Args:
        rows: (N, F) train split ids; targets: (M, F) ids to score; sizes: vocab size per field.
    """
    out = []
    for f, size in enumerate(sizes):
        ids = np.asarray(rows[:, f])
        by_type = [ids] if f == 0 else [ids[rows[:, 0] == t] for t in range(sizes[0])]
        counts = np.stack([np.bincount(g, minlength=size) + 1.0 for g in by_type])  # (1|V_0, V_f)
        logp = np.log(counts / counts.sum(1, keepdims=True))
        row = 0 if f == 0 else targets[:, 0]  # the table row: the target word's type
        out.append(float(-logp[row, targets[:, f]].mean()))
    return out


def field_losses(
    logits: list[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked per-field cross-entropy and correct-count sums.

    Args:
        logits: one (B, T, V_f) tensor per field.
        targets: (B, T, F) ids; mask: (B, T) with 1 where a target counts.

    Returns:
        (F,) summed cross-entropies (float32) and (F,) summed correct predictions.
    """
    ce, correct = [], []
    for f, lg in enumerate(logits):
        y = targets[..., f]
        # fp32 softmax even under bf16 autocast; "ignore" ids are real targets (paper: fields
        # that do not apply learn to predict 0), only padding is masked
        nll = F.cross_entropy(lg.float().flatten(0, 1), y.flatten(), reduction="none")
        ce.append((nll * mask.flatten()).sum())
        correct.append(((lg.argmax(-1) == y).float() * mask).sum())
    return torch.stack(ce), torch.stack(correct)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    wins: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-field mean NLL and accuracy over fixed windows (summed over DDP ranks when active).

    Returns:
        (F,) mean NLL per target, (F,) accuracy, and the number of targets.
    """
    model.eval()
    rank, world = _rank_world()
    sums = torch.zeros(3, wins.shape[-1], dtype=torch.float64, device=device)  # ce, correct, n
    for i in range(rank * batch_size, len(wins), batch_size * world):  # rank-strided batches
        w = torch.from_numpy(wins[i : i + batch_size]).to(device)  # (B, T + 1, F)
        m = torch.from_numpy(masks[i : i + batch_size]).to(device)  # (B, T)
        x, y = w[:, :-1], w[:, 1:]
        with autocast:
            logits = model(x, next_type=y[..., 0] if y.shape[-1] > 1 else None)
        ce, correct = field_losses(logits, y, m)
        sums += torch.stack([ce.double(), correct.double(), m.sum().double().expand_as(ce)])
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train()
    n = sums[2, 0].item()
    return (sums[0] / n).cpu().numpy(), (sums[1] / n).cpu().numpy(), n


def _fail_run_on_exit(fn: Callable[..., Path]) -> Callable[..., Path]:
    """End train's MLflow run FAILED on an error, KILLED on Ctrl-C or SIGTERM, not RUNNING.

    SIGTERM (what DVC, Prefect and torchrun send) becomes SystemExit while training, so this
    runs; a SIGKILL cannot be caught: the next start marks that run KILLED (`_end_stale_runs`).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Path:
        main = threading.current_thread() is threading.main_thread()  # signal needs it
        old = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            import mlflow

            if mlflow.active_run():
                stop = isinstance(exc, KeyboardInterrupt | SystemExit)
                mlflow.end_run("KILLED" if stop else "FAILED")
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, old)

    return wrapper


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@_fail_run_on_exit
def train(
    tokens_dir: Path,
    params: TrainParams,
    model_params: ModelParams,
    *,
    all_params: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> Path:
    """Train on `tokens_dir/<representation>/`; checkpoints go to `params.out_dir/checkpoints/`.

    Args:
        tokens_dir: the tokenize stage's root (data.tokens_dir).
        params: the `train` section; its out_dir is the run folder (checkpoints/step_<STEP>.pt,
            best.pt).
        model_params: the `model` section (musegen.core.model.ModelParams).
        all_params: the whole merged params file, logged to MLflow (default: model + train).
        resume: continue from the last checkpoint in out_dir (same params and vocab).

    Returns:
        The final checkpoint, params.out_dir/checkpoints/step_<max_steps>.pt.

    Raises:
        TrainError: nothing to resume, params or vocab changed since the checkpoint, or the
            MLflow tracking store is unreachable (all before the first step).
    """
    from musegen.core.model import ModelConfig, MusicTransformer

    # ---- setup: ranks, device, precision, seeds -------------------------------------------
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = params.device == "cuda" or (params.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    # bf16 needs no loss scaling; CPU stays fp32 so resume is bit-exact
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    if not cuda:
        torch.use_deterministic_algorithms(True)
    random.seed(params.seed + rank)
    np.random.seed(params.seed + rank)
    torch.manual_seed(params.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    master = rank == 0

    # ---- data: vocab, splits, bar-aligned window starts, fixed valid windows ---------------
    repr_dir = Path(tokens_dir) / params.representation
    vocab_path = paths.vocab(repr_dir)
    if not vocab_path.is_file():
        raise TrainError(f"{vocab_path}: not found; run `musegen tokenize` (or dvc repro)")
    vocab = json.loads(vocab_path.read_text())
    vocab_hash = _sha(vocab)
    fields = list(vocab["fields"])
    weights = _loss_weights(params.loss_weights, fields)
    rows, offsets = load_split(repr_dir, "train")
    starts = bar_starts(rows, offsets, vocab)
    ends = offsets[np.searchsorted(offsets, starts, side="right")]  # each start's song end
    keep = ends - starts >= 2  # a window needs one input and one target
    starts, ends = starts[keep], ends[keep]
    wins, masks = valid_windows(
        *load_split(repr_dir, "valid"), vocab, params.seq_len, params.num_valid_windows
    )
    # the baseline scores the same valid targets as the model; output biases start at the
    # train unigram log-prior (natural log of each field's frequency)
    entropy = per_type_unigram(rows, wins[:, 1:][masks.astype(bool)], vocab["sizes"])
    unigram = []
    for f in range(len(fields)):
        freq = np.bincount(np.asarray(rows[:, f]), minlength=vocab["sizes"][f]) / len(rows)
        unigram.append(torch.tensor(np.log(freq + 1e-6), dtype=torch.float32))  # (V_f,)
    # same keys as the valid rows: valid_loss (weighted sum), valid_loss_<field>
    baseline = {"valid_loss": float(np.dot(weights, entropy))}
    baseline |= {f"valid_loss_{n}": h for n, h in zip(fields, entropy, strict=True)}
    sampler = np.random.default_rng([params.seed, rank])  # own stream per rank
    augment = Augmenter(vocab, params.transpose_range, params.tempo_shift_range)  # train only

    # ---- model: from scratch, or the last checkpoint --------------------------------------
    hashed = flatten({"model": dataclasses.asdict(model_params), "train": _hashed(params)})
    params_hash = _sha(hashed)
    out_dir = Path(params.out_dir)
    ckpt_dir = paths.checkpoints(out_dir)
    ckpt = None
    if master:
        checkpoint.remove_temps(ckpt_dir)  # temp files of writes a kill interrupted
    if resume:
        # the newest checkpoint that loads and checks out (a kill or a bad disk may have
        # left the last one truncated or corrupt); nothing usable: stop, never start afresh
        try:
            last, ckpt, skipped = checkpoint.newest_good(ckpt_dir)
        except checkpoint.CheckpointError as exc:
            raise TrainError(f"--resume: {exc.path}: {exc.problem}; drop --resume") from None
        if skipped and master:
            print(f"--resume: skipped {'; '.join(skipped)}; resuming from {last}", file=sys.stderr)
        _check_same(last, ckpt, hashed=hashed, vocab_hash=vocab_hash, world=world)
    config = ModelConfig.from_params(model_params, vocab)
    if params.seq_len > config.max_len:
        raise TrainError(f"train.seq_len {params.seq_len} > model.max_len {config.max_len}")
    raw_model = MusicTransformer(config)
    with torch.no_grad():
        # output biases start at the train unigram log-prior (Karpathy, "init well"): step 0
        # already scores the baseline, so near-constant fields (rest, tempo) only improve
        for head, prior in zip(raw_model.heads, unigram, strict=True):
            head.bias.copy_(prior)
    raw_model.to(device)
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
    # torch.compile fuses the step's small ops (bench.train_throughput --compile: measured
    # both ways); eval windows have another batch size, so they compile once more
    model = torch.compile(raw_model) if params.compile else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if cuda else None
        )

    # ---- optimizer: AdamW, decay on matrices only; warmup then cosine to min_lr ------------
    matrices = [p for p in raw_model.parameters() if p.dim() >= 2]
    others = [p for p in raw_model.parameters() if p.dim() < 2]  # biases, norms
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": params.weight_decay}, {"params": others}],
        lr=params.lr,
        betas=tuple(params.betas),
        weight_decay=0.0,
        fused=True,  # one kernel for every parameter (CPU and CUDA), same update
    )
    floor = params.min_lr / params.lr

    def lr_factor(i: int) -> float:  # i = updates done so far
        if i < params.warmup_steps:
            return (i + 1) / params.warmup_steps
        progress = min(
            1.0, (i - params.warmup_steps) / max(1, params.max_steps - params.warmup_steps)
        )
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    step, history, best, seconds = 0, [], {"valid_loss": math.inf, "step": 0}, 0.0
    train_sum = [0.0, 0]  # train loss summed since the last eval, and its count
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, history, best, seconds = ckpt["step"], ckpt["history"], ckpt["best"], ckpt["seconds"]
        train_sum = list(ckpt["train_sum"])
        # after model init (which consumed the RNG): the streams continue where they stopped
        _set_rng(ckpt["rng"][rank], sampler)
        if master:  # best.pt and the reports as of this step (a kill may have left them apart)
            _restore_best(ckpt_dir, last, ckpt)
            if history:
                _write_reports(params, history, best, baseline)

    # ---- MLflow: connect (fail before the first step), one run per training ---------------
    run_id = ckpt["mlflow_run_id"] if ckpt else None
    if master:
        import mlflow

        try:
            experiment_id = tracking.connect(params.experiment)
        except tracking.TrackingError as exc:
            raise TrainError(str(exc)) from exc
        where = {"musegen.out_dir": str(Path(out_dir).resolve()), "musegen.pid": str(os.getpid())}
        where["musegen.host"] = socket.gethostname()
        _end_stale_runs(experiment_id, where, keep=run_id)
        # named here: MLflow draws its names from `random`, which is seeded above (same name
        # for every run); a resumed run keeps its name
        name = f"train {params.representation} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            run_name=None if run_id else f"{name} {secrets.token_hex(2)}",
        )
        if not run_id:  # a resumed run keeps its params (MLflow forbids changing them)
            run_id = run.info.run_id
            logged = all_params or {"model": model_params, "train": params}
            mlflow.log_params(flatten({k: _plain(v) for k, v in logged.items()}))
            mlflow.log_params({f"baseline_{k}": round(v, 4) for k, v in baseline.items()})
            mlflow.log_artifact(str(vocab_path))
        mlflow.set_tags(
            {"git_commit": _git_commit(), "device": str(device), "world_size": world}
            | {"representation": params.representation, "params_hash": params_hash}
            | ({"dvc_exp_name": os.environ["DVC_EXP_NAME"]} if "DVC_EXP_NAME" in os.environ else {})
            | where
        )
    # steps a resumed run re-runs were logged before the kill: log each step once
    logged_to = _last_logged_step(run_id) if master and ckpt else 0

    # ---- loop: micro-steps, clip, step, log; eval; checkpoint -----------------------------
    from tqdm import tqdm

    bar = tqdm(total=params.max_steps, initial=step, disable=not master, desc="train", unit="step")
    weight_t = torch.tensor(weights, device=device)  # (F,)
    window_tokens, window_t = 0, time.perf_counter()
    while step < params.max_steps:
        t0 = time.perf_counter()
        loss_sum, n_tokens = 0.0, 0
        for micro in range(params.num_micro_steps):
            picks = sampler.integers(0, len(starts), params.batch_size)  # uniform over bar starts
            batch = [window(rows, starts[i], ends[i], params.seq_len) for i in picks]
            if augment.active:
                batch = [(augment(w, sampler), m) for w, m in batch]
            w = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)  # (B, T + 1, F)
            m = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)  # (B, T)
            x, y = w[:, :-1], w[:, 1:]
            if world > 1:  # all-reduce gradients on the last micro-step only
                model.require_backward_grad_sync = micro == params.num_micro_steps - 1
            with autocast:
                # type-first heads are teacher-forced with the true next type (CP only)
                logits = model(x, next_type=y[..., 0] if len(fields) > 1 else None)
            ce, _ = field_losses(logits, y, m)
            # weighted sum over fields of the masked mean NLL of this micro-batch
            loss = (ce * weight_t).sum() / m.sum()
            (loss / params.num_micro_steps).backward()
            loss_sum += loss.item() / params.num_micro_steps
            n_tokens += int(m.sum().item()) * world  # real (unpadded) targets, all ranks
        norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), params.grad_clip))
        if not (math.isfinite(loss_sum) and math.isfinite(norm)):  # one NaN step poisons all
            raise TrainError(
                f"step {step + 1}: train loss {loss_sum:.4g}, gradient norm {norm:.4g}: not "
                f"finite, stopped before the update (checkpoints up to step {step} are intact); "
                "lower train.lr or check train.loss_weights"
            )
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seconds += time.perf_counter() - t0
        train_sum = [train_sum[0] + loss_sum, train_sum[1] + 1]
        window_tokens += n_tokens

        if master and (step % params.log_every == 0 or step == params.max_steps):
            tps = window_tokens / (time.perf_counter() - window_t)
            window_tokens, window_t = 0, time.perf_counter()
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}")
            # asynchronous: a sqlite commit can take a second on a busy disk, the loop goes on
            # batch_loss: this step's batch; train_loss (eval rows): the mean since the last eval
            logged = {"batch_loss": loss_sum, "lr": lr, "tokens_per_s": tps}
            if step > logged_to:
                mlflow.log_metrics(logged, step=step, synchronous=False)
        bar.update()

        is_best = False
        evaluated = step % params.eval_every == 0 or step == params.max_steps
        if evaluated:
            nll, acc, _ = evaluate(
                model, wins, masks, batch_size=params.batch_size, device=device, autocast=autocast
            )
            row = {"step": step, "seconds": round(seconds, 3)}
            row |= {"train_loss": train_sum[0] / max(1, train_sum[1])}
            row |= {"valid_loss": float((nll * np.array(weights)).sum())}
            row |= {f"valid_loss_{n}": float(v) for n, v in zip(fields, nll, strict=True)}
            row |= {f"valid_acc_{n}": float(v) for n, v in zip(fields, acc, strict=True)}
            if not math.isfinite(row["valid_loss"]):
                raise TrainError(f"step {step}: valid loss {row['valid_loss']}: not finite")
            history.append(row)
            train_sum = [0.0, 0]
            is_best = row["valid_loss"] < best["valid_loss"]
            best = row if is_best else best
            if master:
                logged = {k: v for k, v in row.items() if k != "step"}
                if step > logged_to:
                    mlflow.log_metrics(logged, step=step, synchronous=False)
                unigram = baseline["valid_loss"]
                bar.write(f"step {step}: valid {row['valid_loss']:.4f} (unigram {unigram:.4f})")
        save = step % params.save_every == 0 or step == params.max_steps
        if save or is_best:
            # every rank's RNG streams (rank 0 writes them; a resume hands each its own)
            rngs = [_get_rng(sampler)]
            if world > 1:
                rngs = [None] * world
                torch.distributed.all_gather_object(rngs, _get_rng(sampler))
            state = {
                "step": step,
                "model": raw_model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": rngs,
                "model_config": dataclasses.asdict(config),
                "params": hashed,
                "params_hash": params_hash,
                "vocab_hash": vocab_hash,
                "vocab": vocab,
                "mlflow_run_id": run_id,
                "history": history,
                "best": best,
                "seconds": seconds,
                "train_sum": train_sum,
            }
            bad = [n for n, t in state["model"].items() if not torch.isfinite(t).all()]
            if bad:  # the loss was finite, yet an update overflowed: never save such weights
                raise TrainError(f"step {step}: weight {bad[0]} is not finite; not saved")
            if master and save:
                checkpoint.save(state, paths.step_checkpoint(ckpt_dir, step))
                old = list(paths.step_checkpoints(ckpt_dir))
                for s in old[: -params.keep_last] if params.keep_last > 0 else []:
                    paths.step_checkpoint(ckpt_dir, s).unlink()
            if master and is_best:
                checkpoint.save(state, paths.best_checkpoint(ckpt_dir))
        if master and evaluated:  # after the checkpoints: metrics.json never runs ahead of best.pt
            _write_reports(params, history, best, baseline)
    bar.close()

    # ---- finish: final checkpoint and reports as artifacts --------------------------------
    final = paths.step_checkpoint(ckpt_dir, params.max_steps)
    if master:
        mlflow.flush_async_logging()
        mlflow.log_artifact(str(final), "checkpoints")
        mlflow.log_artifact(params.metrics_file, "reports")
        mlflow.log_artifact(params.plots_file, "reports")
        mlflow.end_run()
    if world > 1:
        torch.distributed.barrier()  # nobody exits while rank 0 still writes
        torch.distributed.destroy_process_group()
    return final


@dataclasses.dataclass(frozen=True)
class TrainConfig(StageConfig):
    """What training reads: its section, the tokens, the model's shape."""

    train: TrainParams
    data: DataParams
    model: ModelParams


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What training wrote: the run folder, its final and best checkpoints, the loss reports
    (metrics_file, plots_file) and the best STEP by valid loss."""

    out_dir: Path
    checkpoint: Path
    best_checkpoint: Path
    metrics: Path
    loss: Path
    best_step: int
    best_valid_loss: float

    @classmethod
    def read(cls, params: TrainConfig, root: Path | str = ".") -> TrainResult:
        """train.out_dir and the reports (in the repository at `root`)."""
        p, out = params.train, Path(root, params.train.out_dir)
        metrics = Path(root, p.metrics_file)
        best = json.loads(metrics.read_text())["best"]
        ckpt_dir = paths.checkpoints(out)
        return cls(
            out_dir=out,
            checkpoint=paths.step_checkpoint(ckpt_dir, p.max_steps),
            best_checkpoint=paths.best_checkpoint(ckpt_dir),
            metrics=metrics,
            loss=Path(root, p.plots_file),
            best_step=best["step"],
            best_valid_loss=best["valid_loss"],
        )


def run(
    params: TrainConfig, *, resume: bool = False, all_params: Mapping[str, Any] | None = None
) -> TrainResult:
    """The train stage (`train`): `all_params`, the whole params file, goes to MLflow."""
    p = params
    train(Path(p.data.tokens_dir), p.train, p.model, all_params=all_params, resume=resume)
    return TrainResult.read(params)


def _plain(section: Any) -> Any:
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _hashed(params: TrainParams) -> dict[str, Any]:
    """The train keys that change the weights (a resume must keep them)."""
    return {k: v for k, v in dataclasses.asdict(params).items() if k not in UNHASHED}


def _loss_weights(weights: Mapping[str, float], fields: list[str]) -> list[float]:
    """Weights in field order; the map may also list other representations' fields."""
    missing = [f for f in fields if f not in weights]
    if missing:
        raise TrainError(
            f"params.yaml: train.loss_weights has no weight for field {missing[0]!r} "
            f"(it has: {', '.join(weights)}); add `{missing[0]}: 1.0`"
        )
    return [float(weights[f]) for f in fields]


def _check_same(path: Path, ckpt: dict, *, hashed: dict, vocab_hash: str, world: int) -> None:
    """Refuse a resume whose params, vocab or world size differ from the checkpoint's."""
    if ckpt["params"] != hashed:
        keys = sorted(set(hashed) | set(ckpt["params"]))
        key = next(k for k in keys if hashed.get(k) != ckpt["params"].get(k))
        raise TrainError(
            f"--resume: {path} was trained with {key} = {ckpt['params'].get(key)!r}, params now "
            f"say {hashed.get(key)!r}; restore it, or train afresh in another train.out_dir"
        )
    if ckpt["vocab_hash"] != vocab_hash:
        raise TrainError(
            f"--resume: {path} was trained on another vocab.json (vocab hash "
            f"{ckpt['vocab_hash']} != {vocab_hash}); the tokens changed, train afresh"
        )
    if len(ckpt["rng"]) != world:
        raise TrainError(
            f"--resume: {path} was written by {len(ckpt['rng'])} rank(s), this run has {world}; "
            "resume with the same --nproc_per_node"
        )


def _get_rng(sampler: np.random.Generator) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),  # MT19937 keys
        "numpy_pos": int(np.random.get_state()[2]),
        "python": random.getstate(),
        "sampler": sampler.bit_generator.state,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict[str, Any], sampler: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate(state["python"])
    sampler.bit_generator.state = state["sampler"]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _restore_best(ckpt_dir: Path, resumed: Path, ckpt: dict[str, Any]) -> None:
    """Make best.pt the checkpoint of the resumed state's best STEP.

    A kill between writing step_<STEP>.pt and best.pt (or during best.pt) leaves best.pt at an
    older STEP; a resume from an earlier checkpoint may find it at a later one.
    """
    want, path = ckpt["best"]["step"], paths.best_checkpoint(ckpt_dir)
    if not want:
        return  # no eval yet, no best
    with contextlib.suppress(checkpoint.CheckpointError, FileNotFoundError):
        if checkpoint.load(path).get("step") == want:
            return
    source = resumed if ckpt["step"] == want else paths.step_checkpoint(ckpt_dir, want)
    try:
        checkpoint.load(source)
    except (checkpoint.CheckpointError, FileNotFoundError):
        print(
            f"--resume: {path} is not STEP {want} (the best so far) and {source.name} is gone "
            "or unusable; best.pt is rewritten at the next new best",
            file=sys.stderr,
        )
        return
    checkpoint.copy(source, path)
    print(f"--resume: {path} restored to STEP {want} (the best so far)", file=sys.stderr)


def _end_stale_runs(experiment_id: str, where: dict[str, str], keep: str | None) -> None:
    """Mark KILLED the runs of this out_dir that a killed training left RUNNING.

    A run counts as stale when it has this out_dir and its process is gone (or ran on another
    host: two trainings cannot share one out_dir).
    """
    import mlflow

    client = mlflow.MlflowClient()
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=500)
    for run in running:
        tags = run.data.tags
        if run.info.run_id == keep or tags.get("musegen.out_dir") != where["musegen.out_dir"]:
            continue
        pid = int(tags.get("musegen.pid", "0"))
        if tags.get("musegen.host") == where["musegen.host"] and pid > 0 and _alive(pid):
            continue  # still training
        client.set_terminated(run.info.run_id, "KILLED")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _last_logged_step(run_id: str) -> int:
    """The last step the run logged (train and eval metrics), 0 when none."""
    import mlflow

    client = mlflow.MlflowClient()
    steps = [m.step for key in ("lr", "valid_loss") for m in client.get_metric_history(run_id, key)]
    return max(steps, default=0)


def _write_reports(params: TrainParams, history: list[dict], best: dict, baseline: dict) -> None:
    """reports/train/metrics.json (best, final, baseline) and loss.csv (one row per eval)."""
    losses = list(baseline)  # valid_loss, valid_loss_<field> ...
    metrics = {name: {k: row[k] for k in ["step", *losses]} for name, row in
               [("best", best), ("final", history[-1])]}  # fmt: skip
    metrics["baseline"] = baseline
    Path(params.metrics_file).parent.mkdir(parents=True, exist_ok=True)
    Path(params.metrics_file).write_text(json.dumps(metrics, indent=2) + "\n")
    write_headline(params.metrics_file, valid_loss=best["valid_loss"])
    Path(params.plots_file).parent.mkdir(parents=True, exist_ok=True)
    with Path(params.plots_file).open("w", newline="") as fh:
        out = csv.DictWriter(fh, ["step", "train_loss", *losses], extrasaction="ignore")
        out.writeheader()
        out.writerows(history)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
