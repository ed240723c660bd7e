"""Files a stage writes inside a folder params.yaml names: each derived path spelled once here.

params.yaml names the folders (`train.out_dir`, `tune.out_dir`, ...); the names of the files
in them live here, so the stage that writes a file and every stage, CLI command and flow that
reads it agree. Each function takes the folder params.yaml gives (e.g. `train.out_dir`).
"""

from __future__ import annotations

from pathlib import Path

#: the corpus build's record of what it wrote, at the top of a corpus folder
CORPUS_MANIFEST = "manifest.json"


def vocab(repr_dir: Path | str) -> Path:
    """<data.tokens_dir>/<representation>/vocab.json: the tokenizer, enough to decode alone."""
    return Path(repr_dir) / "vocab.json"


def split_rows(repr_dir: Path | str, split: str) -> Path:
    """<data.tokens_dir>/<representation>/<split>.npy: the split's songs, concatenated."""
    return Path(repr_dir) / f"{split}.npy"


def split_offsets(repr_dir: Path | str, split: str) -> Path:
    """<split>_offsets.npy beside the rows: song k is rows offsets[k]:offsets[k + 1]."""
    return Path(repr_dir) / f"{split}_offsets.npy"


def split_pieces(repr_dir: Path | str) -> Path:
    """pieces.json beside the rows: each split's manifest paths, in row order."""
    return Path(repr_dir) / "pieces.json"


def checkpoints(train_out_dir: Path | str) -> Path:
    """train.out_dir/checkpoints: step_<STEP>.pt every train.save_every steps, and best.pt."""
    return Path(train_out_dir) / "checkpoints"


def step_checkpoint(ckpt_dir: Path | str, step: int) -> Path:
    """The checkpoint of STEP `step` in a checkpoints folder."""
    return Path(ckpt_dir) / f"step_{step}.pt"


def step_of(checkpoint: Path | str) -> int | None:
    """The STEP of a step_<STEP>.pt path; None for any other name (best.pt, step_x.pt)."""
    name = Path(checkpoint).name
    digits = name.removeprefix("step_").removesuffix(".pt")
    return int(digits) if name == f"step_{digits}.pt" and digits.isdigit() else None


def step_checkpoints(ckpt_dir: Path | str) -> dict[int, Path]:
    """Every step_<STEP>.pt in a checkpoints folder, by STEP in ascending order."""
    found = {step_of(p): p for p in Path(ckpt_dir).glob("step_*.pt")}
    return {step: found[step] for step in sorted(s for s in found if s is not None)}


def best_checkpoint(ckpt_dir: Path | str) -> Path:
    """best.pt in a checkpoints folder: the lowest validation loss so far."""
    return Path(ckpt_dir) / "best.pt"


def best_sampling(tune_out_dir: Path | str) -> Path:
    """tune.out_dir/best_sampling.yaml: the tuned settings, in the `sample:` section's shape."""
    return Path(tune_out_dir) / "best_sampling.yaml"


def metrics(out_dir: Path | str) -> Path:
    """<tune.out_dir or evaluate.out_dir>/metrics.json: the headline numbers (dvc metrics)."""
    return Path(out_dir) / "metrics.json"


def sweep_page(sweep_out_dir: Path | str) -> Path:
    """sweep.out_dir/index.html: the side-by-side listening page."""
    return Path(sweep_out_dir) / "index.html"


def corpus_manifest(corpus_dir: Path | str) -> Path:
    """<corpus folder>/manifest.json (`CORPUS_MANIFEST`)."""
    return Path(corpus_dir) / CORPUS_MANIFEST
