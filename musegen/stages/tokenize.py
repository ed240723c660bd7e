"""The `tokenize` stage: the manifest's ok files -> CP and REMI arrays per split, plus vocab.

For each representation in `params.representations`, `out_dir/<repr>/` gets:

- `{train,valid,test}.npy`: int32, every song of the split concatenated in manifest order,
  each ending with its EOS (CP: [n_words_total, 8]; REMI: [n_tokens_total]);
- `{train,valid,test}_offsets.npy`: int64 [n_songs + 1], song k is rows offsets[k]:offsets[k+1];
- `vocab.json`: fields, sizes, the event string of every id and the tokenizer config (enough to
  decode alone; see musegen.core.tokenizer);
- `pieces.json`: {split: [manifest path of song k]}, so a stage that reads a split can name
  (and record) the manifest rows it used.

Each file is parsed once (musegen.core.midi.read_score) and encoded by every tokenizer. A file that
prepare accepted but that fails here is named on stderr, skipped and counted in the metrics
JSON (`params.metrics`), never a crash.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from musegen import paths
from musegen.config import DataParams, ParamsError, StageConfig
from musegen.core.midi import read_score
from musegen.core.tokenizer import FIELDS, Tokenizer, get_tokenizer
from musegen.files import from_printable, replacing, write_headline
from musegen.stages.prepare import read_manifest

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    """The `tokenize` section of params.yaml (see the comments there)."""

    representations: tuple[str, ...]
    num_workers: int
    use_chords: bool
    num_rest_bars: int
    metrics: str

    def __post_init__(self) -> None:
        bad = [r for r in self.representations if r not in ("cp", "remi")]
        if bad or not self.representations:
            raise ParamsError(
                f"tokenize.representations must list cp and/or remi, found "
                f"{list(self.representations)} (fix params.yaml)"
            )
        if self.num_workers < 0 or self.num_rest_bars < 1:
            raise ParamsError(
                "tokenize.num_workers must be >= 0 (0 = all cores) and tokenize.num_rest_bars "
                f">= 1, found {self.num_workers} and {self.num_rest_bars} (fix params.yaml)"
            )


@lru_cache(maxsize=4)
def _tokenizers(reps: tuple[str, ...], use_chords: bool, num_rest_bars: int) -> list[Tokenizer]:
    """One tokenizer per representation, built once per worker process."""
    return [get_tokenizer(r, use_chords=use_chords, num_rest_bars=num_rest_bars) for r in reps]


def _encode_file(path: Path, params: TokenizeParams) -> tuple[list[np.ndarray], int] | str:
    """Arrays per representation and the notes dropped (out of range), or an error message."""
    try:
        score = read_score(path)
        toks = _tokenizers(params.representations, params.use_chords, params.num_rest_bars)
        words = toks[0].words(score)  # once for every representation (chorder is the costly part)
        return [t.from_words(words) for t in toks], toks[0].last_encode_dropped
    except Exception as exc:  # reported by name and skipped: one bad file must not stop a corpus
        return f"{type(exc).__name__}: {exc}"


def _save(path: Path, array: np.ndarray) -> None:
    with replacing(path) as tmp:  # atomic: a killed run never leaves a half-written array
        np.save(tmp, array)


def _stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"songs": 0, "total": 0, "mean": 0.0, "median": 0.0, "max": 0}
    a = np.array(lengths)
    return {
        "songs": len(a),
        "total": int(a.sum()),
        "mean": round(float(a.mean()), 1),
        "median": float(np.median(a)),
        "max": int(a.max()),
    }


def tokenize(raw_dir: Path, manifest: Path, out_dir: Path, params: TokenizeParams) -> Path:
    """Tokenize the manifest's ok rows into out_dir/<repr>/ and write the metrics JSON.

    Args:
        raw_dir: the corpus folder; manifest paths are relative to it.
        manifest: data/prepared/manifest.csv (columns path, status, split, ...).
        out_dir: the tokens folder (data/tokens).
        params: the `tokenize` section.

    Returns:
        out_dir.

    Raises:
        FileNotFoundError: the manifest is missing.
        ValueError: the manifest has no ok rows, or an ok row has no split.
    """
    raw_dir, manifest, out_dir = Path(raw_dir), Path(manifest), Path(out_dir)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: manifest not found; run `musegen prepare` first")
    table = read_manifest(manifest)
    ok = table[table.status == "ok"]
    if ok.empty:
        raise ValueError(f"{manifest}: no ok rows to tokenize; see its reason column")
    bad_split = ok[~ok.split.isin(SPLITS)]
    if not bad_split.empty:
        raise ValueError(
            f"{manifest}: ok row {bad_split.path.iloc[0]!r} has split "
            f"{bad_split.split.iloc[0]!r}, expected one of {SPLITS}; re-run `musegen prepare`"
        )
    sources = [raw_dir / from_printable(p) for p in ok.path]  # the manifest's text -> the name
    workers = min(params.num_workers or os.cpu_count() or 1, len(sources))
    encode = partial(_encode_file, params=params)
    bar = partial(tqdm, total=len(sources), desc=f"tokenize {raw_dir}", unit="file")
    if workers == 1:
        results = [encode(p) for p in bar(sources)]
    else:
        # forkserver, not fork: callers (Prefect, MLflow) may hold threads (as in prepare)
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            chunk = max(1, len(sources) // (workers * 8))
            results = list(bar(pool.map(encode, sources, chunksize=chunk)))  # keeps order

    failed = {str(p): r for p, r in zip(ok.path, results, strict=True) if isinstance(r, str)}
    for path, message in failed.items():
        tqdm.write(f"tokenize: skipped {raw_dir / path}: {message}", file=sys.stderr)
    metrics: dict[str, Any] = {
        "songs": {s: int(((ok.split == s) & ~ok.path.isin(failed)).sum()) for s in SPLITS},
        "failed": len(failed),
        "failed_files": sorted(failed)[:20],
        "dropped_notes": sum(r[1] for r in results if not isinstance(r, str)),
    }
    for i, rep in enumerate(params.representations):
        tok = _tokenizers(params.representations, params.use_chords, params.num_rest_bars)[i]
        rep_dir = out_dir / rep
        rep_dir.mkdir(parents=True, exist_ok=True)
        tok.save(rep_dir)
        metrics[rep] = {}
        kept = {s: [] for s in SPLITS}
        for path, split, r in zip(ok.path, ok.split, results, strict=True):
            if not isinstance(r, str):
                kept[split].append(str(path))
        paths.split_pieces(rep_dir).write_text(json.dumps(kept, indent=0) + "\n")
        for split in SPLITS:
            songs = [
                r[0][i]
                for r, s in zip(results, ok.split, strict=True)
                if s == split and not isinstance(r, str)
            ]
            empty = np.zeros((0, len(FIELDS)) if rep == "cp" else (0,), np.int32)
            lengths = [len(a) for a in songs]
            _save(paths.split_rows(rep_dir, split), np.concatenate(songs) if songs else empty)
            offsets = np.cumsum([0, *lengths], dtype=np.int64)
            _save(paths.split_offsets(rep_dir, split), offsets)
            metrics[rep][split] = _stats(lengths)
    if {"cp", "remi"} <= set(params.representations):
        # how much shorter CP is: REMI tokens per CP word, over each split
        metrics["remi_tokens_per_cp_word"] = {
            s: round(metrics["remi"][s]["total"] / max(metrics["cp"][s]["total"], 1), 3)
            for s in SPLITS
        }
    path = Path(params.metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    cp_words = sum(s["total"] for s in metrics["cp"].values()) if "cp" in metrics else None
    write_headline(path, words=cp_words)
    return out_dir


@dataclasses.dataclass(frozen=True)
class TokenizeConfig(StageConfig):
    """What the tokenize stage reads: its section and the data folders."""

    tokenize: TokenizeParams
    data: DataParams


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    """What tokenize wrote: the tokens folder and, per representation and split, the stats
    of tokenize.metrics (songs, total words or tokens, ...)."""

    tokens_dir: Path
    metrics: Path
    splits: dict[str, dict[str, dict[str, float]]]

    @classmethod
    def read(cls, params: TokenizeConfig, root: Path | str = ".") -> TokenizeResult:
        """The tokens and metrics params name (in the repository at `root`)."""
        metrics = Path(root, params.tokenize.metrics)
        stats = json.loads(metrics.read_text())
        splits = {rep: stats[rep] for rep in ("cp", "remi") if rep in stats}
        return cls(Path(root, params.data.tokens_dir), metrics, splits)


def run(params: TokenizeConfig) -> TokenizeResult:
    """The tokenize stage: the manifest's ok files into data.tokens_dir (see `tokenize`)."""
    data = params.data
    tokenize(data.raw_dir, data.manifest, Path(data.tokens_dir), params.tokenize)
    return TokenizeResult.read(params)
