"""The `sweep` stage: the same prompts continued by every chosen STEP checkpoint, side by side.

For each prompt (a valid-split song's first `prompt_bars` bars) and each STEP checkpoint, the
model continues the prompt with the same seed and the base sampling (params.yaml's `sample:`,
never settings tuned for one STEP); the real song's next `continue_bars` bars are the anchor
column. Every cell gets an MP3 (`render.render_audio`), a piano roll (`render.piano_roll`),
the MIDI file and `metrics.piece_metrics` of the continuation. Clips play prompt +
continuation; metrics measure the continuation only.

The reference (sweep score, z-scores) is the real continuations of the usable valid songs
that are NOT shown as prompts, so the real anchor is never scored against itself, and every
column is scored against the same set. The test split is never read (it is evaluate's).

Each clip has a content hash (`clip`: sha256 of column, row and MIDI bytes): the blind page's
file names, the key `musegen ratings add` maps ratings back to STEPs with, and what makes
ratings of an older model's clips stop counting once the model changes.

Outputs (under `out_dir`): index.html (works from disk: relative links, inline CSS/JS),
assets/, reveal.js in blind mode, and `metrics_file` (per-STEP numbers, clip hashes, MLflow
child run ids and the manifest rows used, for `dvc metrics` and `musegen select`). Each
checkpoint's clips and numbers are also logged to MLflow as a child run of its training run.
Page design: research/evaluation-and-audio.md sections 2 and 5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import miditoolkit
import numpy as np
import pandas as pd

from musegen import paths
from musegen.config import DataParams, ParamsError, StageConfig
from musegen.core import metrics
from musegen.core.midi import DEFAULT_BPM, Score, to_score
from musegen.core.sampling import SampleParams
from musegen.files import from_printable, write_headline
from musegen.stages import sweep_page
from musegen.stages.evaluate import EvaluateParams, score_set
from musegen.stages.train import TrainParams

log = logging.getLogger(__name__)

BAR = metrics.BAR  # 1920 ticks: the tokenizers' 4/4 bar at 480 ticks per beat


@dataclasses.dataclass(frozen=True)
class SweepParams:
    """The `sweep` section of params.yaml (every key documented there)."""

    steps: str | tuple[int, ...]
    every_k: int
    num_prompts: int
    prompt_bars: int
    continue_bars: int
    max_words: int
    seed: int
    use_blind: bool
    renderer: str
    out_dir: str
    metrics_file: str

    def __post_init__(self) -> None:
        if self.steps != "all" and not (
            isinstance(self.steps, tuple) and all(isinstance(s, int) for s in self.steps)
        ):
            raise ParamsError(
                f"params.yaml: sweep.steps = {self.steps!r}; expected `all` or a list of STEPs "
                "such as [100, 300]"
            )
        if (
            min(
                self.every_k, self.num_prompts, self.prompt_bars, self.continue_bars, self.max_words
            )
            < 1
        ):
            raise ParamsError(
                "params.yaml: sweep.every_k, num_prompts, prompt_bars, continue_bars and "
                "max_words must be >= 1 (fix params.yaml)"
            )


def choose_checkpoints(ckpt_dir: Path, steps: str | tuple[int, ...], every_k: int) -> list[Path]:
    """The STEP checkpoints to sweep, in step order.

    Args:
        ckpt_dir: train.out_dir/checkpoints.
        steps: ``all`` or a list of STEPs.
        every_k: with ``all``, every k-th checkpoint counted back from the last (always kept).

    Raises:
        FileNotFoundError: no step_<STEP>.pt, or a listed STEP has no checkpoint.
    """
    found = paths.step_checkpoints(ckpt_dir)
    if not found:
        raise FileNotFoundError(
            f"{ckpt_dir}: no step_<STEP>.pt checkpoints; run `musegen train` (or dvc repro train)"
        )
    if steps == "all":
        return [found[s] for s in sorted(found)[::-1][::every_k][::-1]]
    missing = [s for s in steps if s not in found]
    if missing:
        raise FileNotFoundError(
            f"{ckpt_dir}: no checkpoint for sweep.steps {missing} (found {sorted(found)}); "
            "fix sweep.steps in params.yaml"
        )
    return [found[s] for s in sorted(set(steps))]


def window(midi: miditoolkit.MidiFile, start_bar: int, end_bar: int) -> miditoolkit.MidiFile:
    """Notes with onsets in bars [start_bar, end_bar), cut at end_bar and shifted to bar 0."""
    lo, hi = start_bar * BAR, end_bar * BAR
    out = miditoolkit.MidiFile(ticks_per_beat=midi.ticks_per_beat)
    inst = miditoolkit.Instrument(program=0, is_drum=False, name="piano")
    inst.notes = [
        miditoolkit.Note(n.velocity, n.pitch, n.start - lo, min(n.end, hi) - lo)
        for i in midi.instruments
        for n in i.notes
        if lo <= n.start < hi
    ]
    out.instruments.append(inst)
    # the tempo in force at `lo`, then the changes inside the window
    tempos = sorted(midi.tempo_changes, key=lambda t: t.time)
    before = [t for t in tempos if t.time <= lo][-1:] or [miditoolkit.TempoChange(DEFAULT_BPM, 0)]
    inside = [t for t in tempos if lo < t.time < hi]
    out.tempo_changes = [miditoolkit.TempoChange(t.tempo, max(0, t.time - lo)) for t in before]
    out.tempo_changes += [miditoolkit.TempoChange(t.tempo, t.time - lo) for t in inside]
    out.time_signature_changes = [miditoolkit.TimeSignature(4, 4, 0)]
    out.max_tick = max([n.end for n in inst.notes] + [0])
    return out


#: the split the sweep reads (valid chooses; test is evaluate's alone)
SPLIT = "valid"
#: fewest reference songs the set-level score can use (MGEval needs pairs within a set)
MIN_REFERENCE = 2


def pick_prompts(manifest: Path, raw_dir: Path, tokenizer: Any, params: SweepParams) -> list[dict]:
    """Valid-split songs long enough for prompt + continuation, encoded and decoded once.

    Returns:
        One dict per usable valid song, sorted by path: path, midi (the decoded, i.e.
        quantized, song), real (its continuation Score). The first `num_prompts` of a seeded
        shuffle are flagged ``shown`` (the rows); the others are the reference.

    Raises:
        FileNotFoundError: no manifest. ValueError: too few valid songs are long enough.
    """
    if not Path(manifest).is_file():
        raise FileNotFoundError(f"{manifest}: manifest not found; run `musegen prepare`")
    table = pd.read_csv(manifest)
    rows = table[(table.split == SPLIT) & (table.status == "ok")].sort_values("path")
    need = params.prompt_bars + params.continue_bars
    songs = []
    for rel in rows.path:
        # through the tokenizer: the anchor is quantized exactly as the model's prompt is
        midi = tokenizer.decode(tokenizer.encode(Path(raw_dir) / from_printable(rel)))
        if to_score(midi).end_tick > (need - 1) * BAR:  # notes reach the last bar
            real = window(midi, params.prompt_bars, need)
            songs.append({"path": rel, "midi": midi, "real": to_score(real)})
    if len(songs) < params.num_prompts + MIN_REFERENCE:
        raise ValueError(
            f"{manifest}: {len(songs)} {SPLIT}-split songs have {need} bars (sweep.prompt_bars "
            f"+ continue_bars); the sweep needs sweep.num_prompts ({params.num_prompts}) + "
            f"{MIN_REFERENCE} (the reference, never the prompts' own songs): lower them, or "
            "raise prepare.valid_percent, in params.yaml"
        )
    order = np.random.default_rng(params.seed).permutation(len(songs))
    for rank, i in enumerate(order):
        songs[i]["shown"] = rank < params.num_prompts
    return songs


def set_score(samples: list[Score], reference: list[Score], ev: EvaluateParams) -> dict:
    """evaluate.proxy_score of continuation Scores against the real ones (plus mean OA)."""
    ref = [metrics.piece_metrics(s, ev.seed) for s in reference]
    result = score_set(samples, metrics.set_features(reference, ref), ref, ev)
    return {"sweep_score": result["proxy_score"], "mean_oa": result["mean_oa"]}


def _valid_loss(history: list[dict], step: int) -> float | None:
    """The valid loss of the last evaluation at or before `step` (None if there was none)."""
    rows = [r for r in history if r["step"] <= step]
    return float(rows[-1]["valid_loss"]) if rows else None


def clip_hash(midi_bytes: bytes, col: str, row: int) -> str:
    """A cell's id: its column, row and MIDI content (a new model gives new ids)."""
    return hashlib.sha256(f"musegen-sweep:{col}:{row}:".encode() + midi_bytes).hexdigest()[:16]


def sweep(
    params: SweepParams,
    ckpt_dir: Path,
    manifest: Path,
    raw_dir: Path,
    *,
    sample: SampleParams,
    eval_params: EvaluateParams,
    experiment: str = "musegen",
    progress: bool = True,
) -> dict[str, Any]:
    """Continue the same prompts with every chosen checkpoint; write the page and metrics.

    Args:
        params: the `sweep` section.
        ckpt_dir: train.out_dir/checkpoints.
        manifest: data/prepared/manifest.csv (its test split gives the prompts).
        raw_dir: the corpus folder the manifest's paths are relative to.
        sample: sampling settings (the base `sample` section: never one STEP's tuning).
        eval_params: the `evaluate` section (loop thresholds and GS seed of the sweep score).
        experiment: MLflow experiment for checkpoints whose training run is not in the store.
        progress: print one line per checkpoint.

    Returns:
        The metrics written to `params.metrics_file` (also holds `page`, the index.html path).
    """
    from musegen.core import render
    from musegen.core.generate import generate_batch, load_model, midi_prompt

    t_start = time.perf_counter()
    chosen = choose_checkpoints(ckpt_dir, params.steps, params.every_k)
    out = Path(params.out_dir)
    assets = out / "assets"
    shutil.rmtree(assets, ignore_errors=True)  # this stage's own output: no stale clips
    assets.mkdir(parents=True)
    (out / "reveal.js").unlink(missing_ok=True)
    timing = {"generate": 0.0, "render": 0.0, "mlflow": 0.0}

    def cell(midi: miditoolkit.MidiFile, col: str, row: int, cont: Score) -> dict:
        clip = window(midi, 0, params.prompt_bars + params.continue_bars)
        tmp = assets / ".clip.mid"
        clip.dump(str(tmp))
        digest = clip_hash(tmp.read_bytes(), col, row)
        stem = digest if params.use_blind else f"p{row}_{col}"  # blind: names no STEP
        tmp.replace(assets / f"{stem}.mid")
        t0 = time.perf_counter()
        audio = render.render_audio(
            assets / f"{stem}.mid", assets / f"{stem}.mp3", renderer=params.renderer
        )
        render.piano_roll(
            clip, assets / f"{stem}.png", width=6, height=2.4, prompt_beats=4 * params.prompt_bars
        )
        timing["render"] += time.perf_counter() - t0
        return {
            "stem": stem,
            "clip": digest,
            "seconds": round(audio.seconds, 2),
            "renderer": audio.renderer,
            "metrics": metrics.piece_metrics(cont, eval_params.seed),
        }

    loaded = load_model(chosen[0])  # its tokenizer encodes the prompts (same for every STEP)
    songs = pick_prompts(manifest, raw_dir, loaded.tokenizer, params)
    shown = [s for s in songs if s["shown"]]
    others = [s for s in songs if not s["shown"]]  # never a prompt's own song
    reference = [s["real"] for s in others]
    columns: list[dict[str, Any]] = [
        {
            "key": "real",
            "label": "real",
            "step": None,
            "cells": [cell(s["midi"], "real", r, s["real"]) for r, s in enumerate(shown)],
        }
    ]
    columns[0] |= set_score([s["real"] for s in shown], reference, eval_params)

    for i, path in enumerate(chosen):
        loaded = loaded if i == 0 else load_model(path)
        step = paths.step_of(path)
        col = {"key": f"step_{step}", "label": f"STEP {step}", "step": step, "cells": []}
        conts = []
        bars = params.prompt_bars + params.continue_bars  # the caps count the prompt's bars
        stats: list[dict[str, Any]] = []
        t0 = time.perf_counter()  # every row of this column decodes as one batch
        fulls = generate_batch(
            loaded,
            sample,
            [
                midi_prompt(
                    loaded.tokenizer, Path(raw_dir) / from_printable(s["path"]), params.prompt_bars
                )
                for s in shown
            ],
            [params.seed + r for r in range(len(shown))],
            max_bars=bars,
            min_bars=bars,  # every cell holds the same bars: EOS is masked until then
            max_words=params.max_words,
            stats=stats,
        )
        timing["generate"] += time.perf_counter() - t0
        for r, (full, got) in enumerate(zip(fulls, stats, strict=True)):
            midi = loaded.tokenizer.decode(full)
            conts.append(
                to_score(
                    window(midi, params.prompt_bars, params.prompt_bars + params.continue_bars)
                )
            )
            col["cells"].append(cell(midi, col["key"], r, conts[-1]))
            # a cell the word cap cut short is shown, marked, and left out of the score
            col["cells"][-1] |= {"n_words": len(full), "complete": got["bars"] >= bars}
        history = torch_history(path)
        col["valid_loss"] = _valid_loss(history, step)
        done = [c for c, x in zip(conts, col["cells"], strict=True) if x["complete"]]
        # no complete cell: the proxy's floor (OA 0, every loop penalty), ranked last
        col |= (
            set_score(done, reference, eval_params)
            if done
            else {"sweep_score": -1.0, "mean_oa": 0.0}
        )
        col["num_incomplete"] = len(conts) - len(done)
        t0 = time.perf_counter()
        col["mlflow_run_id"] = _log_child(loaded.mlflow_run_id, experiment, col, assets, params)
        timing["mlflow"] += time.perf_counter() - t0
        columns.append(col)
        if progress:
            print(
                f"sweep: STEP {step}: score {col['sweep_score']:.3f}, valid loss "
                f"{col['valid_loss']}, {i + 1}/{len(chosen)} checkpoints"
            )

    result = _summarize(columns, shown, others, params)
    result |= _curves(
        chosen, columns, result["best_step"], out, run=loaded.mlflow_run_id, exp=experiment
    )
    result["seconds"] = {k: round(v, 2) for k, v in timing.items()}
    result["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    ref = _mean_sd([{"metrics": metrics.piece_metrics(r, eval_params.seed)} for r in reference])
    result["reference"] = {k: v["mean"] for k, v in ref.items()}
    result["page"] = str(sweep_page.write_page(out, columns, shown, ref, params))
    Path(params.metrics_file).parent.mkdir(parents=True, exist_ok=True)
    Path(params.metrics_file).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    write_headline(params.metrics_file, sweep_score=result["best_sweep_score"])
    return result


def _curves(
    chosen: list[Path], columns: list[dict], best_step: int, out: Path, *, run: str | None, exp: str
) -> dict[str, Any]:
    """curves.png: the valid curves of the last checkpoint's history, the STEP checkpoints,
    the best valid loss and the sweep's STEP marked; logged to the training run in MLflow."""
    import mlflow
    from musegen import tracking
    from musegen.core import render

    history = max((torch_history(p) for p in chosen), key=len)  # the latest holds every eval
    best_valid = int(min(history, key=lambda r: r["valid_loss"])["step"])
    marks = {"best valid loss": best_valid, "best sweep score": int(best_step)}
    steps = [c["step"] for c in columns if c["step"] is not None]
    path = render.loss_curves(history, out / "curves.png", checkpoints=steps, marks=marks)
    _, nesting = tracking.child_of(run, exp, "sweep curves")
    if nesting:  # the training run is in this store: the image sits beside its metrics
        mlflow.MlflowClient().log_artifact(run, str(path), "sweep")
    return {"best_valid_step": best_valid, "curves": str(path)}


def torch_history(path: Path) -> list[dict]:
    """The eval history stored in a checkpoint (read and checked like any checkpoint)."""
    from musegen.core.checkpoint import load

    return list(load(path, ("history",))["history"])


def _mean_sd(cells: list[dict]) -> dict[str, dict[str, float]]:
    table = {k: np.array([c["metrics"][k] for c in cells]) for k in metrics.PIECE_METRICS}
    return {
        k: {"mean": float(v.mean()), "sd": float(v.std()), "n": len(v)} for k, v in table.items()
    }


def _summarize(columns: list[dict], shown: list[dict], others: list[dict], p: SweepParams) -> dict:
    """metrics.json: per-STEP numbers, the real anchor's, the best STEP by sweep score, each
    column's clip hashes (row order) and MLflow run, and the manifest rows read (prompts,
    reference_pieces)."""
    per_step = {}
    for col in columns:
        stats = _mean_sd(col["cells"])
        col["stats"] = stats
        entry = {
            "sweep_score": col["sweep_score"],
            "mean_oa": col["mean_oa"],
            **({"num_incomplete": col["num_incomplete"]} if "num_incomplete" in col else {}),
            **({"valid_loss": col["valid_loss"]} if col.get("valid_loss") is not None else {}),
            **{k: stats[k]["mean"] for k in metrics.PIECE_METRICS},
            "clips": [c["clip"] for c in col["cells"]],
            **({"mlflow_run_id": col["mlflow_run_id"]} if col.get("mlflow_run_id") else {}),
            **({"step": col["step"]} if col["step"] is not None else {}),
        }
        per_step[col["key"]] = entry
    steps = [c for c in columns if c["step"] is not None]
    best = max(steps, key=lambda c: c["sweep_score"])
    return {
        "best_step": best["step"],
        "best_sweep_score": best["sweep_score"],
        "num_checkpoints": len(steps),
        "num_prompts": len(shown),
        "num_reference": len(others),
        "split": SPLIT,
        "prompts": [s["path"] for s in shown],
        "reference_pieces": [s["path"] for s in others],
        "prompt_bars": p.prompt_bars,
        "continue_bars": p.continue_bars,
        "columns": per_step,
    }


def _log_child(
    parent: str | None, experiment: str, col: dict, assets: Path, params: SweepParams
) -> str:
    """One MLflow run per checkpoint, a child of its training run; returns its run id."""
    import mlflow
    from musegen import tracking

    exp_id, nesting = tracking.child_of(parent, experiment, f"sweep run of STEP {col['step']}")
    # MLflow's own nesting tag: the compare view groups a training run's sweep runs
    tags = {"musegen.stage": "sweep", "step": str(col["step"])} | nesting
    with mlflow.start_run(experiment_id=exp_id, run_name=f"sweep {col['label']}", tags=tags) as run:
        mlflow.log_params(
            {
                "step": col["step"],
                "prompt_bars": params.prompt_bars,
                "continue_bars": params.continue_bars,
                "seed": params.seed,
            }
        )
        logged = {"sweep_score": col["sweep_score"], "mean_oa": col["mean_oa"]}
        logged["num_incomplete"] = col["num_incomplete"]
        if col["valid_loss"] is not None:
            logged["valid_loss"] = col["valid_loss"]
        for k in metrics.PIECE_METRICS:
            logged[f"mean_{k}"] = float(np.mean([c["metrics"][k] for c in col["cells"]]))
        mlflow.log_metrics(logged, step=col["step"])
        for c in col["cells"]:
            for ext in ("mp3", "png", "mid"):
                mlflow.log_artifact(str(assets / f"{c['stem']}.{ext}"), "sweep")
        return run.info.run_id


@dataclasses.dataclass(frozen=True)
class SweepConfig(StageConfig):
    """What the sweep reads: its section, the valid split's files, the checkpoints (and the
    experiment of a run not in the store), the base sampling, the proxy's settings."""

    sweep: SweepParams
    data: DataParams
    train: TrainParams
    sample: SampleParams
    evaluate: EvaluateParams


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What the sweep wrote: the listening page, metrics.json and its headline figures."""

    page: Path
    metrics: Path
    best_step: int
    best_sweep_score: float
    num_checkpoints: int
    seconds: float

    @classmethod
    def read(cls, params: SweepConfig, root: Path | str = ".") -> SweepResult:
        """sweep.metrics_file and the page beside it (in the repository at `root`)."""
        path = Path(root, params.sweep.metrics_file)
        m = json.loads(path.read_text())
        page = paths.sweep_page(Path(root, params.sweep.out_dir))
        figures = {k: m[k] for k in ("best_step", "best_sweep_score", "num_checkpoints")}
        return cls(page, path, **figures, seconds=m["seconds"]["total"])


def run(params: SweepConfig) -> SweepResult:
    """The sweep stage: every kept STEP with the base sampling (never one STEP's tuning)."""
    sweep(
        params.sweep,
        paths.checkpoints(params.train.out_dir),
        params.data.manifest,
        params.data.raw_dir,
        sample=params.sample,
        eval_params=params.evaluate,
        experiment=params.train.experiment,
    )
    return SweepResult.read(params)
