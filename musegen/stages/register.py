"""The `register` stage: the chosen bundle as ONE version of a composing model in MLflow.

The bundle is what the DAG decided: the STEP `musegen select` chose, the sampling `musegen
tune` tuned for that STEP, and what `musegen evaluate` measured for both on the test split
(`check_bundle` refuses a bundle whose parts name different STEPs). It is logged as an MLflow
pyfunc model in a child run of its training run (checkpoint + sampling as artifacts; STEP,
sampling, evaluation and rating counts as run params/metrics and version tags), registered as
a new version of model `register.name` (``musegen``), and alias `register.alias`
(``champion``) moves to it. Older versions stay, with their history. Facts and traps:
research/mlops-stack.md section 2 (explicit pip_requirements, no pt2 serialization, aliases
instead of stages).

Using it (from any folder inside the repository; `mlflow.pyfunc.load_model` works too once
MLFLOW_TRACKING_URI names the store, see `load_champion`)::

    import musegen, pandas as pd
    model = musegen.load_champion()  # models:/musegen@champion
    out = model.predict(pd.DataFrame({"seed": [0, 1], "bars": [8, 8]}))
    # seed: sampling seed; bars: bars to compose (after the prompt when there is one)
    # optional columns: prompt (a .mid file's bytes in base64; "" = compose from scratch),
    # prompt_bars (bars of the prompt kept, default 4), min_bars (bars, counted like
    # `bars`, before a piece may end; 0 = the model may end it; default: generate.min_bars
    # when the version was registered, at most `bars`, so 8 bars asked are 8 bars composed)
    # out: one row per input row: midi_base64 (a .mid file, base64), n_words, n_notes,
    # n_bars (bars in the piece, prompt included)

Served (`mlflow models serve -m models:/musegen@champion --env-manager local -h 127.0.0.1`),
it is a network service, so every request is checked before any work (`check_request`): at
most MAX_ROWS rows; `bars` and `prompt_bars` in 1..generate.max_bars, `min_bars` in
0..`bars`; a prompt is MIDI bytes
(base64) of at most prepare.max_file_mb, never a path (nothing on the server is opened); each
piece stops at generate.max_words sampled words. The bounds are the params.yaml values at
registration, stored with the version (`limits_for`). A refused request is HTTP 400 with one
line naming the row, the column and the bound.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import mlflow
import mlflow.pyfunc
from musegen import paths, tracking
from musegen.config import ParamsError, StageConfig, load_section, repo_root
from musegen.core.generate import GenerateParams
from musegen.core.sampling import SampleParams
from musegen.stages import choice
from musegen.stages.choice import SelectParams, SelectResult, TuneParams
from musegen.stages.evaluate import EvaluateParams
from musegen.stages.prepare import PrepareParams
from musegen.stages.train import TrainParams

#: same store as training (musegen.stages.train): MLFLOW_TRACKING_URI, else the repo's sqlite file.
#: checkpoint keys a generating model needs; optimizer, scheduler and RNG state are dropped.
SLIM_KEYS = (
    "step",
    "model",
    "model_config",
    "vocab",
    "params",
    "params_hash",
    "vocab_hash",
    "mlflow_run_id",
    "history",
    "best",
)
#: what the served model imports; explicit, so log_model does not spend ~4 s inferring them.
REQUIREMENTS = ("torch", "numpy", "pandas", "miditoolkit", "pyyaml", "mlflow", "symusic")
DEFAULT_PROMPT_BARS = 4
#: pieces one request may ask for: each costs up to generate.max_words words of decoding
MAX_ROWS = 16
#: the served model's answer, one row per request row: column -> MLflow schema type
OUTPUTS = {"midi_base64": "string", "n_words": "long", "n_notes": "long", "n_bars": "long"}


@dataclasses.dataclass(frozen=True)
class RegisterParams:
    """The `register` section of params.yaml (every key documented there)."""

    name: str
    alias: str
    report: str


class BundleError(ValueError):
    """The selected STEP, its tuned sampling and its evaluation do not belong together."""


def check_bundle(step: int, tune_metrics: Path, evaluate_metrics: Path) -> dict[str, Any]:
    """Evaluate's headline metrics, once tune and evaluate are shown to have used STEP `step`.

    Raises:
        FileNotFoundError: a metrics file is missing. BundleError: a STEP differs (the fix:
        `dvc repro`, which re-runs the stale stage).
    """
    found = {}
    for stage, path in (("tune", tune_metrics), ("evaluate", evaluate_metrics)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: not found; run `musegen {stage}` first")
        found[stage] = json.loads(Path(path).read_text())
        if found[stage].get("checkpoint_step") != step:
            raise BundleError(
                f"{path}: {stage} used STEP {found[stage].get('checkpoint_step')}, but select "
                f"chose STEP {step}; run `dvc repro` (or `musegen {stage}`) to bring it up to date"
            )
    return found["evaluate"]


@dataclasses.dataclass(frozen=True)
class RegisterConfig(StageConfig):
    """What registering reads: its section, the STEP and sampling chosen (`choice`), the
    tune and evaluate figures that must be about that STEP, the training run's experiment,
    and the request limits (generate's caps, prepare's file size)."""

    register: RegisterParams
    select: SelectParams
    tune: TuneParams
    evaluate: EvaluateParams
    sample: SampleParams
    train: TrainParams
    generate: GenerateParams
    prepare: PrepareParams


@dataclasses.dataclass(frozen=True)
class RegisterResult:
    """What registering wrote to register.report: the version, its STEP and sampling."""

    report: Path
    version: int
    step: int
    uri: str
    selected_by: str
    sampling: dict[str, dict[str, float]]
    evaluate_proxy_score: float | None

    @classmethod
    def read(cls, params: RegisterConfig, root: Path | str = ".") -> RegisterResult:
        """register.report (in the repository at `root`)."""
        path = Path(root, params.register.report)
        return cls(path, **json.loads(path.read_text()))


def run(params: RegisterConfig) -> RegisterResult:
    """The register stage: the selected STEP + its tuned sampling + its evaluation as one
    version; the alias moves to it; register.report says which.

    Raises:
        FileNotFoundError: select, tune or evaluate has not run.
        BundleError: tune or evaluate used another STEP (`check_bundle`).
    """
    p, chosen = params.register, SelectResult.read(params)
    evaluation = check_bundle(
        chosen.step, paths.metrics(params.tune.out_dir), paths.metrics(params.evaluate.out_dir)
    )
    version = register(
        p,
        chosen.checkpoint,
        choice.sampling(params),
        limits=limits_for(params),
        evaluation=evaluation,
        selection=dataclasses.asdict(chosen),
        experiment=params.train.experiment,
    )
    report = {
        "version": int(version.version),
        "step": int(version.tags["step"]),
        "uri": f"models:/{p.name}@{p.alias}",
        "selected_by": chosen.decided_by,
        "sampling": json.loads(version.tags["sampling"]),
        "evaluate_proxy_score": evaluation.get("proxy_score"),
    }
    Path(p.report).parent.mkdir(parents=True, exist_ok=True)
    Path(p.report).write_text(json.dumps(report, indent=2) + "\n")
    return RegisterResult.read(params)


def limits_for(params: RegisterConfig) -> dict[str, float]:
    """What one served request may ask for (see the module docstring), from params.yaml, and
    the bars a piece holds unless the request says otherwise (generate.min_bars).

    Raises:
        ParamsError: generate.max_words or generate.max_bars is 0 (no cap): a network
            service needs both bounds.
    """
    gen = params.generate
    for key in ("max_words", "max_bars"):
        if getattr(gen, key) <= 0:
            raise ParamsError(
                f"params.yaml: generate.{key} = {getattr(gen, key)} (no cap); the served model "
                "needs a bound on every request: set it > 0"
            )
    return {
        "max_bars": gen.max_bars,
        "max_words": gen.max_words,
        "max_file_mb": params.prepare.max_file_mb,
        "min_bars": gen.min_bars,
    }


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked row of a request: `prompt` is MIDI bytes (None: compose from scratch);
    `min_bars` counts new bars like `bars` (None: the version's generate.min_bars)."""

    seed: int
    bars: int
    prompt: bytes | None
    prompt_bars: int
    min_bars: int | None = None


def check_request(frame: pd.DataFrame, limits: dict[str, float]) -> list[Request]:
    """Check every row before any work; see the module docstring for the rules.

    Raises:
        mlflow.exceptions.MlflowException: INVALID_PARAMETER_VALUE (HTTP 400), one line naming
            the row, the column and the bound; it never quotes a prompt's bytes.
    """
    from musegen.core.midi import MidiError, read_header

    if len(frame) > MAX_ROWS:
        raise _refuse(f"{len(frame)} rows; at most {MAX_ROWS} pieces per request")
    max_bars, max_bytes = int(limits["max_bars"]), int(limits["max_file_mb"] * 1e6)
    out = []
    for i, row in enumerate(frame.to_dict("records")):
        bars, keep, text = row.get("bars"), row.get("prompt_bars"), row.get("prompt")
        keep = DEFAULT_PROMPT_BARS if keep is None or pd.isna(keep) else keep
        for name, value in (("bars", bars), ("prompt_bars", keep)):
            if value is None or pd.isna(value) or value != int(value):
                raise _refuse(f"row {i}: {name} = {value!r}; expected a whole number of bars")
            if not 1 <= int(value) <= max_bars:
                raise _refuse(
                    f"row {i}: {name} = {int(value)}; expected 1 to {max_bars} (generate.max_bars "
                    "when this version was registered)"
                )
        least = row.get("min_bars")
        if least is not None and not pd.isna(least):
            if least != int(least) or not 0 <= int(least) <= int(bars):
                raise _refuse(
                    f"row {i}: min_bars = {least!r}; expected a whole number 0 to {int(bars)} "
                    "(bars; 0 = the model may end the piece)"
                )
            least = int(least)
        else:
            least = None
        prompt = None
        if isinstance(text, str) and text:
            if len(text) > 4 * (max_bytes // 3 + 1):
                raise _refuse(f"row {i}: prompt over {max_bytes / 1e6:g} MB (prepare.max_file_mb)")
            try:
                prompt = base64.b64decode(text, validate=True)
                read_header(prompt, "prompt")
            except (binascii.Error, ValueError, MidiError):
                raise _refuse(
                    f"row {i}: prompt is not a MIDI file's bytes in base64 (a .mid file starts "
                    "'TVRo' in base64; a path is never opened)"
                ) from None
        elif text is not None and not (isinstance(text, str) or pd.isna(text)):
            raise _refuse(f"row {i}: prompt must be a string (base64 MIDI bytes) or empty")
        out.append(Request(int(row["seed"]), int(bars), prompt, int(keep), least))
    return out


class Composer(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc that composes with a musegen checkpoint (see the module docstring).

    Build with no arguments; MLflow calls `load_context` with artifacts ``checkpoint`` (a
    slim .pt) and ``sampling`` (the SampleParams YAML the version was registered with), and
    the request limits as the model config (`limits_for`).
    """

    def load_context(self, context: Any) -> None:
        from musegen.core.generate import load_model

        self.loaded = load_model(context.artifacts["checkpoint"])
        cfg = yaml.safe_load(Path(context.artifacts["sampling"]).read_text())
        self.sample = SampleParams(**cfg)
        self.limits = dict(context.model_config or {})
        missing = {"max_bars", "max_words", "max_file_mb"} - set(self.limits)
        if missing:
            raise ValueError(
                f"this model version carries no request limits ({sorted(missing)}); register "
                "it again with `musegen register`"
            )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """One composition per row: columns seed, bars, optional prompt, prompt_bars and
        min_bars; returns OUTPUTS."""
        from musegen.core.generate import generate, prompt_of
        from musegen.core.midi import to_score

        rows = []
        tok = self.loaded.tokenizer
        for i, req in enumerate(check_request(pd.DataFrame(model_input), self.limits)):
            caps = {"seed": req.seed, "max_words": int(self.limits["max_words"])}
            prompt = None
            if req.prompt is not None:
                prompt = prompt_of(
                    tok, tok.encode(to_score(_parse(req.prompt, i))), req.prompt_bars
                )
                if not len(prompt):
                    raise _refuse(f"row {i}: the prompt has no notes before bar {req.prompt_bars}")
            # generate's max_bars and min_bars count the prompt's bars too; `bars` and a
            # request's min_bars count new ones only; generate.min_bars is at most max_bars
            # as in `musegen generate` (a version registered before it: 0)
            opening = req.prompt_bars if prompt is not None else 0
            bars = req.bars + opening
            if req.min_bars is None:
                least = min(int(self.limits.get("min_bars", 0)), bars)
            else:
                least = req.min_bars + opening if req.min_bars else 0
            got: dict[str, Any] = {}
            tokens = generate(
                self.loaded, self.sample, prompt=prompt, max_bars=bars, min_bars=least,
                stats=got, **caps,
            )  # fmt: skip
            midi = tok.decode(tokens)
            buf = io.BytesIO()
            midi.dump(file=buf)
            rows.append(
                {
                    "midi_base64": base64.b64encode(buf.getvalue()).decode("ascii"),
                    "n_words": len(tokens),
                    "n_notes": sum(len(inst.notes) for inst in midi.instruments),
                    "n_bars": int(got["bars"]),
                }
            )
        return pd.DataFrame(rows, columns=list(OUTPUTS))


def _refuse(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _parse(data: bytes, row: int) -> Any:  # -> miditoolkit.MidiFile
    """MIDI bytes (header already checked) parsed; any failure is one line, no bytes quoted."""
    import miditoolkit

    try:
        return miditoolkit.MidiFile(file=io.BytesIO(data))
    except Exception:  # mido raises OSError, ValueError, KeyError, EOFError on bad bodies
        raise _refuse(
            f"row {row}: prompt is not a readable MIDI file (corrupt or cut short)"
        ) from None


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema(
        [
            ColSpec("long", "seed"),
            ColSpec("long", "bars"),
            ColSpec("string", "prompt", required=False),
            # double: pandas holds an int column with gaps (rows without a prompt) as float64
            ColSpec("double", "prompt_bars", required=False),
            ColSpec("double", "min_bars", required=False),
        ]
    )
    outputs = Schema([ColSpec(kind, name) for name, kind in OUTPUTS.items()])
    return ModelSignature(inputs, outputs)


def _requirements() -> list[str]:
    """Pinned to the installed versions (local tags such as +cpu dropped, so GPU builds fit)."""
    from importlib.metadata import version

    names = {"pyyaml": "PyYAML"}
    return [f"{n}=={version(names.get(n, n)).split('+')[0]}" for n in REQUIREMENTS]


def register(
    params: RegisterParams,
    checkpoint: Path,
    sample: SampleParams,
    *,
    limits: dict[str, float],
    evaluation: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    experiment: str = "musegen",
) -> Any:
    """Register one bundle as a new version of `params.name`; move the alias to it.

    Args:
        params: the `register` section.
        checkpoint: the selected STEP's checkpoint.
        sample: the sampling settings tuned for it (stored with the version; the pyfunc and
            `musegen generate --model` compose with them unless overridden).
        evaluation: evaluate's headline metrics for this STEP and sampling (`check_bundle`).
        selection: select's report (what decided, ratings per STEP).
        limits: what one served request may ask for (`limits_for`; stored with the version).
        experiment: MLflow experiment used when the checkpoint's training run is not in the
            store (the run is then top level, with a warning).

    Returns:
        The new mlflow.entities.model_registry.ModelVersion.
    """
    import torch

    from musegen.core.checkpoint import load

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; run `musegen select` first")
    ckpt = load(path, ("step",))  # checked like every checkpoint read
    step = int(ckpt["step"])
    parent = ckpt.get("mlflow_run_id")
    plain = _plain(sample)
    tuned = {f"{k}.{f}": v for k in ("temperature", "top_p") for f, v in plain[k].items()}
    numbers = {f"evaluate_{k}": float(v) for k, v in (evaluation or {}).items() if _number(v)}
    selection = selection or {}
    rated = selection.get("steps", {}).get(str(step), {}).get("ratings", {})
    numbers |= {"ratings_total": float(selection.get("num_ratings", 0))}
    numbers |= {"ratings_step": float(rated.get("n", 0))}
    if rated.get("mean") is not None:
        numbers["rating_mean"] = float(rated["mean"])
    pairs = selection.get("steps", {}).get(str(step), {}).get("pairs", {})
    numbers |= {"pairs_total": float(selection.get("num_pairs", 0))}
    numbers |= {"pairs_step": float(pairs.get("n", 0))}
    if pairs.get("strength") is not None:
        numbers["bt_strength"] = float(pairs["strength"])
    about = {
        "step": str(step),
        "checkpoint": str(path),
        "selected_by": str(selection.get("decided_by", "")),
        "sampling": json.dumps({k: plain[k] for k in ("temperature", "top_p")}, sort_keys=True),
    }
    tags = {"musegen.stage": "register"} | about
    exp_id, nesting = tracking.child_of(parent, experiment, f"{path}: the registering run")
    tags |= nesting
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / "checkpoint.pt"
        torch.save({k: ckpt[k] for k in SLIM_KEYS if k in ckpt}, slim)
        sampling = Path(tmp) / "sampling.yaml"
        sampling.write_text(yaml.safe_dump(plain, sort_keys=False))
        # models from code: MLflow stores this script, not a pickle of Composer
        script = Path(tmp) / "composer.py"
        script.write_text(
            "import mlflow\nfrom musegen.stages.register import Composer\n\n"
            "mlflow.models.set_model(Composer())\n"
        )
        run_name = f"register STEP {step}"
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags) as run:
            mlflow.log_params({"step": step, "selected_by": about["selected_by"]} | tuned)
            mlflow.log_metrics(numbers)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(script),
                artifacts={"checkpoint": str(slim), "sampling": str(sampling)},
                model_config=dict(limits),  # context.model_config: the request limits
                code_paths=[str(Path(__file__).parents[1])],  # musegen itself: self-contained
                pip_requirements=_requirements(),
                signature=_signature(),
                # documents the input in the UI; MLflow runs it once, a 1-bar check
                input_example=pd.DataFrame({"seed": [0], "bars": [1]}),
            )
    version = mlflow.register_model(
        info.model_uri,
        params.name,
        tags=about
        | {k: f"{v:.6g}" for k, v in numbers.items()}
        | {
            "params_hash": str(ckpt.get("params_hash")),
            "training_run_id": str(parent),
            "register_run_id": run.info.run_id,
        },
    )
    client.set_registered_model_alias(params.name, params.alias, version.version)
    return version


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _plain(sample: SampleParams) -> dict[str, Any]:
    out = dataclasses.asdict(sample)
    return {k: dict(v) if isinstance(v, dict) else v for k, v in out.items()}


def load_champion(uri: str | None = None) -> Any:
    """The registered model as an MLflow pyfunc, read from the repository's store.

    Works from any folder inside the repository with no environment variable
    ($MLFLOW_TRACKING_URI, when set, names another store); plain `mlflow.pyfunc.load_model`
    needs that variable, or it looks in MLflow's default store instead.

    Args:
        uri: a model URI; default ``models:/<register.name>@<register.alias>`` of params.yaml.

    Raises:
        TrackingError: outside the repository with no MLFLOW_TRACKING_URI, or no store yet.
    """
    tracking.open_store()
    if uri is None:
        root = repo_root()
        p = load_section(RegisterParams, "register", root / "params.yaml") if root else None
        uri = f"models:/{p.name}@{p.alias}" if p else "models:/musegen@champion"
    return mlflow.pyfunc.load_model(uri)
