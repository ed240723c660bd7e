"""Files a stage writes inside a folder params.yaml names: each derived path spelled once here.

params.yaml names the folders (`train.out_dir`, `tune.out_dir`, ...); the names of the files
in them live here, so the stage that writes a file and every stage, CLI command and flow that
reads it agree. Each function takes the folder params.yaml gives (e.g. `train.out_dir`).
"""

from __future__ import annotations

from pathlib import Path

#: the corpus build's record of what it wrote, at the top of a corpus folder
CORPUS_MANIFEST = "manifest.json"


def checkpoints(train_out_dir: Path | str) -> Path:
    """train.out_dir/checkpoints: step_<STEP>.pt every train.save_every steps, and best.pt."""
    return Path(train_out_dir) / "checkpoints"


def step_checkpoint(ckpt_dir: Path | str, step: int) -> Path:
    """The checkpoint of STEP `step` in a checkpoints folder."""
    return Path(ckpt_dir) / f"step_{step}.pt"


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
