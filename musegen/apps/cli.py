"""The `musegen` command line: one command per pipeline stage, each a thin call into the library.

dvc.yaml runs these commands; flows/ calls the same library functions. Every command reads
params.yaml (or --params FILE) and prints progress on anything that takes over a second.

Any folder inside the repository works: a command runs at the repository root (the folder
holding params.yaml, as DVC runs it), so params.yaml's paths and stores are the repository's;
paths typed on the command line stay relative to the folder they were typed in.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from musegen.config import (
    DEFAULT_PARAMS,
    ParamsError,
    StageConfig,
    comments,
    read_params,
    repo_root,
)
from musegen.tracking import TrackingError

C = TypeVar("C", bound=StageConfig)

#: plain click help: a flag shows no `<bool>` placeholder, options list every name they take
TYPER: dict[str, Any] = {"no_args_is_help": True, "add_completion": False, "rich_markup_mode": None}
app = typer.Typer(help=__doc__, pretty_exceptions_enable=False, **TYPER)
corpus_app = typer.Typer(help="Build or fetch a raw MIDI corpus.", **TYPER)
app.add_typer(corpus_app, name="corpus")
ratings_app = typer.Typer(help="People's ratings of the sweep's clips.", **TYPER)
app.add_typer(ratings_app, name="ratings")

#: every command takes --params FILE (default params.yaml, or $MUSEGEN_PARAMS)
ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
#: ... and --override FILE (repeatable): a profile on top of it, e.g. params-cpu-long.yaml
OverrideOpt = Annotated[
    list[Path] | None,
    typer.Option("--override", help="params file on top, e.g. params-gpu.yaml (repeatable)"),
]

#: flags that set a params.yaml knob: {section.key: the short flags people type}. Each knob
#: also answers to --<key>, params.yaml's own name; an error names its first flag.
SHORT: dict[str, tuple[str, ...]] = {
    "prepare.use_strict": ("--strict",),
    "sweep.use_blind": ("--blind",),
    "tune.num_trials": ("--trials",),
    "generate.num_samples": ("--n", "--num-samples"),
    "generate.max_bars": ("--bars",),
    "generate.min_bars": ("--min-bars",),
    "generate.max_minutes": ("--minutes",),
    "generate.max_words": ("--words",),
    "generate.prompt_bars": ("--prompt-bars",),
    "generate.out_dir": ("--out",),
    "serve.prefect_port": ("--prefect-port",),
    "serve.mlflow_port": ("--mlflow-port",),
    "serve.optuna_port": ("--optuna-port",),
}
#: each knob's help is its comment in params.yaml (one text), from the repository's file
DOCS = comments((repo_root() or Path()) / DEFAULT_PARAMS)


def _flags(name: str) -> tuple[str, ...]:
    return (*SHORT.get(name, ()), f"--{name.split('.')[1]}")


def knob(name: str, *, switch: bool = False, note: str = "", flags: tuple[str, ...] = ()) -> Any:
    """The option for params key `name` ("generate.max_bars"): its flags (`flags`, else SHORT's
    and --<key>), help "name: <its params.yaml comment>" (or `note`); `switch`: on/off."""
    names = flags or _flags(name)
    if switch:
        names = tuple(f"{n}/--no-{n[2:]}" for n in names)
    text = note or DOCS.get(name, "")
    return typer.Option(*names, help=f"{name}: {text}" if text else name, show_default=False)


def given(section: str, **values: Any) -> dict[str, tuple[str, Any]]:
    """`with_flags`'s {key: (flag, value)} for knobs of `section` (the flag an error names)."""
    return {key: (_flags(f"{section}.{key}")[0], value) for key, value in values.items()}


def profiles(override: list[Path] | None) -> tuple[Path, ...]:
    """The --override files, in order."""
    return tuple(override or ())


def flagged(params: C, section: str, **values: Any) -> C:
    """`params` with the knobs of `section` given on the command line (None = not given)."""
    return params.with_flags(section, given(section, **values))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code=1)


@corpus_app.command("build")
def corpus_build(override: OverrideOpt = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Write the embedded corpus (music21 keyboard works, chorales) to raw_root/m21-keyboard."""
    from musegen.stages import corpus as stage

    result = stage.run(stage.CorpusConfig.load(params, profiles(override)))
    typer.echo(f"corpus: {result} in {result.folder}")


@corpus_app.command("pop1k7")
def corpus_pop1k7(
    source: Annotated[
        Path | None, typer.Option("--from", help="archive (.zip/.tar.gz) or folder on disk")
    ] = None,
    use_dvc: Annotated[bool, typer.Option("--dvc/--no-dvc", help="`dvc add` the result")] = True,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Download (or take --from PATH), verify, extract Pop1K7 to raw_root/pop1k7; `dvc add` it."""
    from musegen.stages import corpus as stage

    p = stage.CorpusConfig.load(params, profiles(override))
    try:  # not a DVC stage: a corpus a person installs, then names in data.corpus
        out = stage.fetch_pop1k7(Path(p.data.raw_root) / "pop1k7", p.corpus, source)
    except stage.CorpusError as exc:
        _fail(str(exc))
    if use_dvc:
        subprocess.run([sys.executable, "-m", "dvc", "add", str(out)], check=True)
    typer.echo(f"pop1k7: {out} (set data.corpus: pop1k7 in params.yaml to use it)")


@corpus_app.command("transcribe")
def corpus_transcribe(  # keyword-only: one option per flag
    *,
    audio: Annotated[Path, typer.Option("--audio", help="folder of wav/flac/mp3/ogg recordings")],
    out: Annotated[
        Path | None, typer.Option("--out", help="corpus folder (default raw_root/<audio name>)")
    ] = None,
    use_dvc: Annotated[bool, typer.Option("--dvc/--no-dvc", help="`dvc add` the result")] = False,
    report: Annotated[
        Path | None, typer.Option(help="the report (default <audio>/transcribe.csv)")
    ] = None,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Transcribe recordings to beat-synchronous piano MIDI (basic-pitch): a corpus folder.

    One row per file in <audio>/transcribe.csv (ok, or rejected with a reason); a re-run
    skips files already done. Then: musegen prepare --raw <out>, or dvc exp run -S
    data.corpus=<out name> when <out> is under raw_root.
    """
    from musegen.stages import transcribe as stage

    try:
        result = stage.run(
            stage.TranscribeConfig.load(params, profiles(override)), audio, out, report
        )
    except ImportError as exc:
        _fail(str(exc))
    typer.echo(result.summary)
    if not result.ok:
        _fail(f"{audio}: no file became MIDI; see the reasons above and {result.report}")
    if use_dvc:
        subprocess.run([sys.executable, "-m", "dvc", "add", str(result.folder)], check=True)


@app.command()
def prepare(
    raw: Annotated[
        Path | None, typer.Option(help="MIDI folder (default: data.raw_root/data.corpus)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default: data.prepared_dir)")
    ] = None,
    use_strict: Annotated[bool | None, knob("prepare.use_strict", switch=True)] = None,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Validate every MIDI file under --raw and write manifest.csv (ok/rejected, reason, split)."""
    from musegen.stages import prepare as stage

    p = flagged(
        stage.PrepareConfig.load(params, profiles(override)), "prepare", use_strict=use_strict
    )
    result = stage.run(p, raw, out)
    typer.echo(result.summary)
    if p.prepare.use_strict and result.rejected:
        _fail(f"--strict: {result.rejected} file(s) rejected; see the manifest")


@app.command()
def tokenize(override: OverrideOpt = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Tokenize the manifest's ok files to CP and REMI arrays per split, plus vocab.json."""
    from musegen.stages import tokenize as stage

    result = stage.run(stage.TokenizeConfig.load(params, profiles(override)))
    typer.echo(f"tokens: {result.tokens_dir}")


@app.command()
def train(
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint in train.out_dir")
    ] = False,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Train the CP (or REMI) Transformer: checkpoints, reports/train/*, one MLflow run.

    Multi-GPU: torchrun --standalone --nproc_per_node=N -m musegen train [same options].
    """
    from musegen.stages import train as stage

    overrides = profiles(override)
    try:
        result = stage.run(
            stage.TrainConfig.load(params, overrides),
            resume=resume,
            all_params=read_params(params, overrides),  # the whole file, for MLflow's params
        )
    except stage.TrainError as exc:
        _fail(str(exc))
    typer.echo(f"checkpoint: {result.checkpoint}")


@app.command()
def sweep(
    use_blind: Annotated[bool | None, knob("sweep.use_blind", switch=True)] = None,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Continue the same valid prompts with every kept STEP (base sampling): page + metrics."""
    from musegen.stages import sweep as stage

    p = flagged(stage.SweepConfig.load(params, profiles(override)), "sweep", use_blind=use_blind)
    try:
        result = stage.run(p)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(
        f"sweep: {result.page} (best STEP {result.best_step}, score "
        f"{result.best_sweep_score:.3f}; {result.seconds:.0f} s)"
    )


@app.command()
def select(
    step: Annotated[
        int | None,
        typer.Option(
            help="a person's choice (ratings/decision.json): beats select.by until retrain"
        ),
    ] = None,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Pick the STEP tune, evaluate and register use (select.by: ratings|proxy|valid_loss|step)."""
    from musegen.stages import select as stage

    p = stage.SelectConfig.load(params, profiles(override))
    try:
        result = stage.run(p, step=step)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(
        f"select: STEP {result.step} ({result.decided_by}: {result.reason}) -> {result.report}"
    )


@ratings_app.command("add")
def ratings_add(
    files: Annotated[list[Path], typer.Argument(help="ratings JSON exported by the blind page")],
    use_dvc: Annotated[
        bool, typer.Option("--dvc/--no-dvc", help="`dvc add` the table (in a DVC repo)")
    ] = True,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Merge blind-page scores and pairwise choices into the ratings table; log counts, means
    and Bradley-Terry strengths to the sweep runs."""
    from musegen.core import ratings as stage
    from musegen.stages.select import SelectConfig

    config = SelectConfig.load(params, profiles(override))
    p, sweep_metrics = config.select, Path(config.sweep.metrics_file)
    try:
        counts = stage.add(files, Path(p.ratings_dir), sweep_metrics)
    except stage.RatingsError as exc:
        _fail(str(exc))
    table = Path(p.ratings_dir) / stage.TABLE
    if use_dvc and Path(".dvc").is_dir():
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "add", "-q", str(table)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            _fail(f"{table}: `dvc add` failed: {proc.stderr.strip()[-300:]}")
    sweep = json.loads(sweep_metrics.read_text())
    rows = stage.read_table(Path(p.ratings_dir))
    stats, pairs = stage.summary(rows, sweep), stage.pair_summary(rows, sweep)
    logged = stage.log_to_sweep_runs(stats, pairs, sweep)
    typer.echo(
        f"ratings: {counts['added']} added, {counts['duplicates']} duplicates ignored, "
        f"{counts['total']} in {table}; counts, means and strengths logged to {logged} sweep runs"
    )
    for key, s in stats.items():
        line = f"  {key}: {s['n']} ratings" + (
            "" if s["mean"] is None else f", mean {s['mean']:.2f}"
        )
        c = pairs[key]
        if c["n"]:
            line += f"; won {c['wins']} of {c['n']} choices, Bradley-Terry {c['strength']:+.2f}"
        if s["n"] or c["n"]:
            typer.echo(line)


@app.command()
def register(override: OverrideOpt = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Register the bundle (selected STEP + its tuned sampling + its evaluation) as one version."""
    from musegen.stages import register as stage

    p = stage.RegisterConfig.load(params, profiles(override))
    try:
        result = stage.run(p)
    except stage.BundleError as exc:
        _fail(str(exc))
    name, alias = p.register.name, p.register.alias
    typer.echo(
        f"registered: models:/{name}/{result.version} (STEP {result.step}, its tuned sampling "
        f"and test-split evaluation), alias {alias} -> version {result.version}"
    )


@app.command()
def tune(
    num_trials: Annotated[int | None, knob("tune.num_trials")] = None,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Tune per-field temperature / top-p against the listening proxy (or the learned listener).

    Several workers may run at once on one tune.storage. Writes reports/tune/best_sampling.yaml.
    """
    from musegen.stages import tune as stage

    r = stage.run(
        flagged(stage.TuneConfig.load(params, profiles(override)), "tune", num_trials=num_trials)
    )
    best = float("nan") if r.best_value is None else r.best_value
    typer.echo(
        f"tune: {r.n_trials_run} trials ({r.seconds_per_trial:.1f} s each), "
        f"objective {r.objective}, best {best:.4f} (trial {r.best_trial}); spearman vs ratings "
        f"{r.spearman_proxy_vs_rating} over {r.n_ratings} ratings"
    )


@app.command()
def listen(  # keyword-only: one option per flag
    *,
    num_trials: Annotated[
        int | None, knob("tune.num_trials", note="ratings to collect in this call")
    ] = None,
    serve: Annotated[
        bool, typer.Option("--serve", help="also serve optuna-dashboard on serve.host")
    ] = False,
    optuna_port: Annotated[
        int | None, knob("serve.optuna_port", flags=("--port", "--optuna_port"))
    ] = None,
    pairwise: Annotated[
        bool, typer.Option("--pairwise", help="A/B preference against the incumbent")
    ] = False,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Generate clips per trial for people to rate in optuna-dashboard; tell Optuna the ratings.

    Without --serve, start the dashboard yourself:
    optuna-dashboard <tune.storage> --artifact-dir <tune.artifact_dir> --host <serve.host>
    """
    from musegen.apps import listen as stage
    from musegen.apps.ui import ServerError

    p = stage.ListenConfig.load(params, profiles(override)).with_flags(
        "serve", {"optuna_port": ("--port", optuna_port)}
    )
    try:
        summary = stage.listen(p, n_trials=num_trials, pairwise=pairwise, serve=serve)
    except ServerError as exc:
        _fail(str(exc))
    typer.echo(f"listen: {summary['told']} rated, {summary['skipped']} skipped; {summary}")


@app.command()
def generate(  # keyword-only: one option per flag, as Typer reads them
    *,
    checkpoint: Annotated[Path | None, knob("generate.checkpoint")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="MLflow URI, e.g. models:/musegen@champion")
    ] = None,
    prompt: Annotated[Path | None, typer.Option("--prompt", help="MIDI file to continue")] = None,
    prompt_bars: Annotated[int | None, knob("generate.prompt_bars")] = None,
    temperature: Annotated[
        list[str] | None, typer.Option("--temperature", help="FIELD=T, repeatable (0 = greedy)")
    ] = None,
    top_p: Annotated[list[str] | None, typer.Option("--top-p", help="FIELD=P, repeatable")] = None,
    seed: Annotated[int | None, knob("sample.seed", note="piece i uses seed + i")] = None,
    num_samples: Annotated[int | None, knob("generate.num_samples")] = None,
    max_bars: Annotated[int | None, knob("generate.max_bars")] = None,
    min_bars: Annotated[int | None, knob("generate.min_bars")] = None,
    max_minutes: Annotated[float | None, knob("generate.max_minutes")] = None,
    max_words: Annotated[int | None, knob("generate.max_words")] = None,
    out_dir: Annotated[Path | None, knob("generate.out_dir")] = None,
    mp3: Annotated[bool, typer.Option("--mp3", help="render an MP3 beside each MIDI")] = False,
    roll: Annotated[bool, typer.Option("--roll", help="draw a piano-roll PNG beside each")] = False,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Compose MIDI from a checkpoint or a registered model, from scratch or continuing --prompt.

    Sampling: a registered model's own (--model), else params.yaml's sample section overlaid by
    <tune.out_dir>/best_sampling.yaml if present; then --temperature / --top-p.
    Writes <out>/<name>_seed<S>.mid (+ .mp3, .png), generate.json.
    """
    from musegen.core import generate as stage
    from musegen.core.midi import MidiError, read_checked
    from musegen.stages import choice

    config = flagged(
        choice.GenerateConfig.load(params, profiles(override)), "generate",
        num_samples=num_samples,
        max_bars=max_bars, min_bars=min_bars, max_minutes=max_minutes, max_words=max_words,
        prompt_bars=prompt_bars, out_dir=out_dir and str(out_dir),
    )  # fmt: skip
    p = config.generate
    if checkpoint and model:
        _fail("give --checkpoint or --model, not both")
    if prompt is not None:  # before the model loads: a folder, FIFO or typo fails at once
        try:
            read_checked(prompt)
        except MidiError as exc:
            _fail(f"--prompt {exc}")
    try:
        path = stage.resolve_checkpoint(model or checkpoint or p.checkpoint)
        # a registered bundle composes with the sampling it was tuned and evaluated with
        sample = stage.bundled_sampling(path) or choice.sampling(config)
        sample = sample.with_overrides(temperature or (), top_p or ())
        loaded = stage.load_model(path, p.device)
        typer.echo(f"model: {path} (step {loaded.step}, {loaded.config.max_len}-word window)")
        written = stage.write_samples(
            loaded, sample, p, Path(p.out_dir), prompt=prompt,
            seed=sample.seed if seed is None else seed, mp3=mp3, roll=roll,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, MidiError) as exc:
        _fail(str(exc))
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
def evaluate(
    samples: Annotated[Path | None, typer.Option(help="folder of generated MIDI")] = None,
    reference: Annotated[Path | None, typer.Option(help="folder of real MIDI")] = None,
    out: Annotated[Path | None, typer.Option(help="result JSON (with --samples)")] = None,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Objective metrics and MGEval overlap of generated music against real music.

    With --samples and --reference: any two folders (bad files are rejected with reasons).
    Without them (the DVC stage): the selected STEP with its tuned sampling against the test
    split.
    """
    from musegen.stages import evaluate as stage

    p = stage.EvaluateConfig.load(params, profiles(override))
    if samples is not None or reference is not None:
        if samples is None or reference is None:
            _fail("give both --samples and --reference (or neither, for the pipeline stage)")
        result = stage.compare(p, samples, reference, out)
        typer.echo(
            f"evaluate: proxy {result['proxy_score']:.3f}, mean OA {result['mean_oa']:.3f}, "
            f"order {result['order_score']:.3f}"
        )
        for kind, rung in result["ladder"].items():  # the samples against their perturbations
            typer.echo(
                f"  ladder {kind:16s} proxy {rung['proxy_score']:.3f}  per piece "
                f"{rung['mean']:.3f} +/- {rung['sd']:.3f}"
            )
        return
    r = stage.run(p)
    typer.echo(
        f"evaluate: {r.n_samples} samples vs {r.n_reference} held-out:"
        f" proxy {r.proxy_score:.3f}, mean OA {r.mean_oa:.3f}"
    )


@app.command()
def ui(  # keyword-only: one option per flag
    *,
    host: Annotated[str | None, knob("serve.host")] = None,
    prefect_port: Annotated[int | None, knob("serve.prefect_port")] = None,
    mlflow_port: Annotated[int | None, knob("serve.mlflow_port")] = None,
    optuna_port: Annotated[int | None, knob("serve.optuna_port")] = None,
    override: OverrideOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Start the MLflow UI, the Prefect server and optuna-dashboard on the project's stores.

    Waits until each answers, prints the URLs, and stops them all on Ctrl-C.
    """
    from musegen.apps import ui as stage

    p = flagged(
        stage.UiConfig.load(params, profiles(override)), "serve", host=host,
        prefect_port=prefect_port, mlflow_port=mlflow_port, optuna_port=optuna_port,
    )  # fmt: skip
    try:
        stage.ui(p, Path.cwd())
    except stage.ServerError as exc:
        _fail(str(exc))


def _typed_here(value: Any, here: Path) -> Any:
    """A path typed on the command line (or a list of them), made absolute against `here`."""
    if isinstance(value, list | tuple):
        return type(value)(_typed_here(v, here) for v in value)
    return here / value if isinstance(value, Path) and not value.is_absolute() else value


def _at_root(command: Any, root: Path, here: Path) -> None:
    """Make `command` (and its subcommands) run at `root`, typed paths kept relative to `here`.

    A value equal to its default (params.yaml, most often) is the repository's, at `root`.
    """
    for sub in getattr(command, "commands", {}).values():
        _at_root(sub, root, here)
    callback = command.callback
    if callback is None:
        return
    defaults = {p.name: p.default for p in command.params}

    @functools.wraps(callback)
    def at_root(**kwargs: Any) -> Any:
        for name, value in kwargs.items():
            if value != defaults.get(name):
                kwargs[name] = _typed_here(value, here)
        os.chdir(root)
        return callback(**kwargs)

    command.callback = at_root


def main() -> None:
    """Entry point: runs at the repository root, turns configuration, store and checkpoint
    errors into one readable line."""
    command = typer.main.get_command(app)
    root, here = repo_root(), Path.cwd()
    if root is not None and root != here.resolve():
        _at_root(command, root, here)
    try:
        command()
    except Exception as exc:
        # musegen.core.checkpoint imports torch (~200 MB, seconds): only the commands that load a
        # checkpoint import it, so `corpus` and `prepare` start light
        checkpoint = sys.modules.get("musegen.core.checkpoint")
        known = (
            ParamsError,
            FileNotFoundError,
            TrackingError,
            *([checkpoint.CheckpointError] if checkpoint else []),
        )
        if not isinstance(exc, known):
            raise
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
