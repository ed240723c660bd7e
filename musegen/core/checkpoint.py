"""Checkpoint files: one atomic writer, and one reader that checks a file before anything uses it.

Every stage that reads a checkpoint (train --resume, generate, sweep, tune, listen, evaluate,
register and the served model) goes through `load`: a regular file, read with
`torch.load(weights_only=True)` (no pickled code runs), holding the keys its reader needs, a
`model_config` that builds a model, weights whose names and shapes are that model's, and no NaN
or inf in any tensor. Anything else is a `CheckpointError`: one line naming the file, what is
wrong and the fix. `newest_good` is the resume rule: the newest step_<STEP>.pt that passes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from musegen import files, paths

#: what generating needs (a registered model's slim checkpoint has only these and a few more)
MODEL_KEYS = ("model", "model_config", "vocab")
#: what `musegen train --resume` needs on top: the whole training state
TRAIN_KEYS = (*MODEL_KEYS, "step", "optimizer", "scheduler", "rng", "params", "vocab_hash")
TRAIN_KEYS += ("history", "best", "seconds", "train_sum")
#: temp files of a checkpoint write (files.temp_name: `.step_<N>.pt.<pid>-<hex>.tmp.pt`; before
#: it, `step_<N>.tmp<pid>`): a writer killed mid-write leaves one behind
_TEMP = re.compile(r"\.(step_\d+|best)\.pt\.\d+-[0-9a-f]+\.tmp\.pt|(step_\d+|best)\.tmp\d+")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: `path`, `problem`; the message adds the fix."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        fix = "pass a step_<STEP>.pt or best.pt from train.out_dir/checkpoints"
        super().__init__(f"{path}: {problem}; {fix}")


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to a temp file beside `path`, then rename: a kill leaves the old file or none.

    A failed write removes its temp file; one left by a kill is removed by `remove_temps`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.replacing(path) as tmp:
        torch.save(state, tmp)


def copy(src: Path, dst: Path) -> None:
    """Copy a checkpoint file atomically (same temp-and-rename rule as `save`)."""
    files.write_atomic(dst, Path(src).read_bytes())


def remove_temps(folder: Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that a kill interrupted."""
    gone = [p for p in Path(folder).glob("*tmp*") if _TEMP.fullmatch(p.name)]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def load(path: Path | str, keys: tuple[str, ...] = MODEL_KEYS) -> dict[str, Any]:
    """Read and check a checkpoint; see the module docstring for what is checked.

    Args:
        path: a .pt file written by `musegen train` (or `musegen register`'s slim copy).
        keys: the keys the caller needs (MODEL_KEYS to generate, TRAIN_KEYS to resume).

    Returns:
        The checkpoint dict, on the CPU.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: anything else (not a regular file, unreadable, truncated, not a
            musegen checkpoint, a model_config that does not build, wrong names or shapes,
            a NaN or inf).
    """
    path = Path(path)
    with contextlib.ExitStack() as stack:
        try:  # the one safe read: a regular file (no FIFO or device is opened), checked on its fd
            fh, size = stack.enter_context(files.open_regular(path))
        except files.FileRefusedError as exc:
            if exc.reason == "missing":
                raise FileNotFoundError(f"{path}: checkpoint not found ({exc.detail})") from None
            raise CheckpointError(path, exc.detail) from None
        if size == 0:
            raise CheckpointError(path, "empty (0 bytes): a write that never finished")
        try:
            ckpt = torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as exc:  # zip, pickle, EOF and weights_only errors: all mean unreadable
            reason = str(exc).split("\n")[0][:160]
            what = f"not a musegen checkpoint: unreadable or truncated ({type(exc).__name__}"
            what += f": {reason})"
            raise CheckpointError(path, what) from None
    problem = next(_problems(ckpt, keys), None)
    if problem:
        raise CheckpointError(path, problem)
    return ckpt


def _problems(ckpt: Any, keys: tuple[str, ...]) -> Iterator[str]:
    """What is wrong with a loaded checkpoint, first problem first (`load` takes only the first,
    so each check may assume the ones before it passed)."""
    from musegen.core.model import ModelConfig, MusicTransformer

    if not isinstance(ckpt, dict):
        yield f"holds a {type(ckpt).__name__}, not a musegen checkpoint dict"
    missing = [k for k in keys if k not in ckpt]
    if missing:
        yield f"not a musegen checkpoint: key {missing[0]!r} missing (it has {sorted(ckpt)[:8]})"
    if not isinstance(ckpt["model_config"], dict):
        yield f"model_config is a {type(ckpt['model_config']).__name__}, expected a dict"
    try:
        config = ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        yield f"its model_config does not build a model ({type(exc).__name__}: {exc})"
    vocab = ckpt["vocab"]
    sizes = vocab.get("sizes") if isinstance(vocab, dict) else None
    if not isinstance(sizes, list | tuple) or list(sizes) != list(config.vocab_sizes):
        yield f"its vocab sizes {sizes} differ from model_config's {list(config.vocab_sizes)}"
    weights = ckpt["model"]
    if not isinstance(weights, dict):
        yield f"model is a {type(weights).__name__}, expected a state dict"
    with torch.device("meta"):  # names and shapes only: no memory, no init cost
        expected = {k: tuple(v.shape) for k, v in MusicTransformer(config).state_dict().items()}
    for name in sorted(set(expected) | set(weights)):
        tensor = weights.get(name)
        if name not in weights:
            yield f"weight {name!r} is missing for its model_config"
        if name not in expected or not isinstance(tensor, torch.Tensor):
            yield f"weight {name!r} is not one of its model_config's tensors"
        if tuple(tensor.shape) != expected[name]:
            yield f"weight {name!r} has shape {tuple(tensor.shape)}, model_config: {expected[name]}"
    for where, tensor in _tensors(ckpt):
        floating = tensor.is_floating_point() or tensor.is_complex()
        if floating and not bool(torch.isfinite(tensor).all()):
            yield f"{where} holds NaN or inf (corrupt, or saved after training diverged)"
    step = ckpt.get("step", 0)
    if not isinstance(step, int) or step < 0:
        yield f"step {step!r} is not a count of steps"


def _tensors(obj: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts, lists and tuples, with its path (`model.blocks.0.w`)."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{where}[{i}]")


def newest_good(folder: Path, keys: tuple[str, ...] = TRAIN_KEYS) -> tuple[Path, dict, list[str]]:
    """The newest step_<STEP>.pt in `folder` that `load` accepts.

    Returns:
        (its path, the checkpoint, one "name (problem)" per newer file that was skipped).

    Raises:
        CheckpointError: no step_<STEP>.pt at all, or none that loads (every problem listed).
    """
    skipped = []
    for path in reversed(paths.step_checkpoints(folder).values()):
        try:
            return path, load(path, keys), skipped
        except CheckpointError as exc:
            skipped.append(f"{path.name} ({exc.problem})")
        except FileNotFoundError:  # removed meanwhile (keep_last of another writer)
            continue
    if not skipped:
        raise CheckpointError(folder, "no checkpoint step_<STEP>.pt in it")
    raise CheckpointError(folder, f"no usable checkpoint: {'; '.join(skipped)}")
