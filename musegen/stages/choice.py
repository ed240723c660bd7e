"""What select and tune chose: the STEP and its sampling, as the later stages read them.

`musegen select` writes the STEP to `select.report`; `musegen tune` writes that STEP's
sampling to <tune.out_dir>/best_sampling.yaml. Tune, evaluate, register and the listen
server read both here (`SelectResult.read`, `sampling`), never through the stages that wrote
them, so each reading stage's DVC deps hold these files and this small module, not the
sweep's or the tuner's code (tests/test_dag.py derives deps from imports). The two sections
live here for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Protocol

from musegen import paths
from musegen.config import ParamsError, StageConfig, merge, read_yaml
from musegen.core.generate import GenerateParams
from musegen.core.sampling import SampleParams

#: what may decide the STEP (`select.by`)
BY = ("ratings", "proxy", "valid_loss", "step")


@dataclasses.dataclass(frozen=True)
class SelectParams:
    """The `select` section of params.yaml (every key documented there)."""

    by: str
    min_ratings: int
    step: int
    wait_minutes: float
    ratings_dir: str
    report: str

    def __post_init__(self) -> None:
        if self.by not in BY:
            raise ParamsError(
                f"params.yaml: select.by = {self.by!r}; expected one of {', '.join(BY)}"
            )
        if self.min_ratings < 1 or self.wait_minutes < 0:
            raise ParamsError(
                "params.yaml: select.min_ratings must be >= 1 and select.wait_minutes >= 0, "
                f"found {self.min_ratings} and {self.wait_minutes}"
            )


@dataclasses.dataclass(frozen=True)
class TuneParams:
    """The `tune` section of params.yaml (every key documented there)."""

    checkpoint: str
    temperature_range: dict[str, list[float]]
    top_p_range: dict[str, list[float]]
    num_trials: int
    num_startup_trials: int
    num_clips: int
    prompt_bars: int
    clip_bars: int
    max_clip_words: int
    num_reference: int
    num_pending: int
    storage: str
    artifact_dir: str
    study: str
    listen_study: str
    min_ratings: int
    ridge_alpha: float
    seed: int
    experiment: str
    out_dir: str

    def __post_init__(self) -> None:
        for key, ranges, top in (
            ("temperature_range", self.temperature_range, math.inf),
            ("top_p_range", self.top_p_range, 1.0),
        ):
            for name, pair in ranges.items():
                ok = len(pair) == 2 and 0 <= pair[0] <= pair[1] <= top and pair[1] > 0
                if not ok:
                    raise ParamsError(
                        f"params.yaml: tune.{key}.{name} = {pair!r}; expected [low, high] with "
                        f"0 <= low <= high{' <= 1' if top == 1.0 else ''} (fix the range)"
                    )
        if min(self.num_clips, self.clip_bars, self.prompt_bars, self.num_pending) < 1:
            raise ParamsError(
                "params.yaml: tune.num_clips, clip_bars, prompt_bars and num_pending must be >= 1"
            )


class WithSelect(Protocol):
    """A stage's params holding the `select` section (`config.StageConfig`)."""

    @property
    def select(self) -> SelectParams: ...


class WithTunedSampling(Protocol):
    """A stage's params holding the `sample` and `tune` sections."""

    @property
    def sample(self) -> SampleParams: ...

    @property
    def tune(self) -> TuneParams: ...


class WithTuneSelect(WithSelect, WithTunedSampling, Protocol):
    """A stage's params holding the `select`, `sample` and `tune` sections."""


@dataclasses.dataclass(frozen=True)
class SelectResult:
    """The STEP select chose: its checkpoint, what decided and why (`decided_by`: pairs,
    ratings, proxy, valid_loss, step or person), and each swept STEP's numbers (`steps`:
    valid loss, proxy, ratings, pairs; the table a person sees when the flow asks)."""

    step: int
    checkpoint: Path  # in the repository at the root `read` was given
    by: str
    decided_by: str
    reason: str
    num_ratings: int
    num_pairs: int
    steps: dict[str, dict[str, Any]]
    sweep_page: str | None
    report: Path

    @classmethod
    def read(cls, params: WithSelect, root: Path | str = ".") -> SelectResult:
        """What `musegen select` wrote to select.report (in the repository at `root`).

        Raises:
            FileNotFoundError: select has not run.
        """
        path = Path(root, params.select.report)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no STEP selected yet; run `musegen select` first")
        r = json.loads(path.read_text())
        return cls(
            step=int(r["step"]),
            checkpoint=Path(root, r["checkpoint"]),
            by=r["by"],
            decided_by=r["decided_by"],
            reason=r["reason"],
            num_ratings=r["num_ratings"],
            num_pairs=r["num_pairs"],
            steps=r["steps"],
            sweep_page=r.get("sweep_page"),
            report=path,
        )


def sampling(params: WithTunedSampling, root: Path | str = ".") -> SampleParams:
    """The `sample` section overlaid by tune's best settings when they exist.

    The overlay is <tune.out_dir>/best_sampling.yaml (written by `musegen tune`), in the sample
    section's shape (a `sample:` wrapper is accepted); its maps may name only some fields. CLI
    flags go on top of the result (`SampleParams.with_overrides`).

    Raises:
        ParamsError: the overlay has a key the sample section lacks, or a bad value.
    """
    tuned = paths.best_sampling(Path(root, params.tune.out_dir))
    if not tuned.is_file():
        return params.sample
    extra = read_yaml(tuned)
    section = merge(dataclasses.asdict(params.sample), extra.get("sample", extra), str(tuned))
    try:
        return SampleParams(**section)
    except ParamsError as exc:  # name the file the value came from
        raise ParamsError(f"{tuned}: {exc}", exc.key, exc.problem) from None


@dataclasses.dataclass(frozen=True)
class GenerateConfig(StageConfig):
    """What `musegen generate` reads: its section and the sampling to compose with."""

    generate: GenerateParams
    sample: SampleParams
    tune: TuneParams
