"""The MLflow connection every stage shares: one tracking-URI rule, one experiment rule.

The tracking URI is $MLFLOW_TRACKING_URI, else the repository's local store
`sqlite:///<root>/mlflow/mlflow.db`, where <root> is the folder holding params.yaml at or above
the working directory (`config.repo_root`): the same store from any folder inside the repository,
and never MLflow's own default (a `./mlflow.db` wherever the command ran). Experiments created
on a local sqlite store keep their artifacts beside the database (`mlflow/artifacts/`), never
in a `./mlruns` of whatever folder the command ran from. Any other store (an MLflow server,
Postgres) keeps its own default.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

from musegen.config import repo_root

#: the local store, relative to the repository root
DEFAULT_STORE = Path("mlflow/mlflow.db")


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or written."""


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the repository's local sqlite store (an absolute URI).

    Raises:
        TrackingError: neither is set: the working directory is outside any repository.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = repo_root()
    if root is None:
        raise TrackingError(
            f"{Path.cwd()}: not inside a musegen repository (no params.yaml here or above), so "
            f"there is no {DEFAULT_STORE}; cd into the repository or set MLFLOW_TRACKING_URI"
        )
    return f"sqlite:///{root / DEFAULT_STORE}"


def open_store() -> str:
    """Point MLflow (tracking and registry) at the store to read models and runs; return its URI.

    Unlike `connect` it creates nothing: reading from a store that does not exist yet would
    leave an empty database behind.

    Raises:
        TrackingError: the local sqlite store does not exist yet.
    """
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(
            f"MLflow store {uri} does not exist yet: run `make demo` (or `dvc repro`) to train "
            "and register a model, or set MLFLOW_TRACKING_URI to the store that holds it"
        )
    mlflow.set_tracking_uri(uri)
    return uri


def connect(experiment: str, attempts: int = 3) -> str:
    """Point MLflow at the tracking store and return `experiment`'s id, creating it if needed.

    Fails fast (before any work is done) when the store is unreachable. Concurrent workers may
    race to create the database or the experiment, so a failure is retried `attempts` times.

    Raises:
        TrackingError: naming the URI, the cause and the fix.
    """
    import mlflow

    uri = tracking_uri()  # outside a repository this raises, before any work is done
    for attempt in range(attempts):
        try:
            db = None
            if uri.startswith(("http://", "https://")):
                # MLflow's client retries for minutes; one short probe fails fast instead
                urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
            elif uri.startswith("sqlite:///"):
                db = Path(uri.removeprefix("sqlite:///"))
                db.parent.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(uri)
            client = mlflow.MlflowClient()
            found = client.get_experiment_by_name(experiment)
            if found:
                return found.experiment_id
            where = (db.parent / "artifacts").resolve().as_uri() if db else None
            return client.create_experiment(experiment, artifact_location=where)
        except Exception as exc:  # any failure here means no run can be recorded
            if attempt + 1 < attempts and not uri.startswith(("http://", "https://")):
                time.sleep(1.0 + attempt)
                continue
            raise TrackingError(
                f"MLflow tracking store {uri!r} is unreachable ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Start the server (`mlflow server ...`), or unset "
                f"MLFLOW_TRACKING_URI to use the repository's {DEFAULT_STORE}"
            ) from exc
    raise AssertionError("unreachable")


def child_of(run_id: str | None, experiment: str, what: str) -> tuple[str, dict[str, str]]:
    """Where `what` (a run belonging to training run `run_id`) goes: (experiment id, tags).

    The child shares the training run's experiment and carries MLflow's nesting tag, so the
    compare view groups them. When the training run is not in this store (another store, a
    deleted run) the child goes to the top level of `experiment` instead, with a warning.
    """
    import warnings

    import mlflow

    exp_id = connect(experiment)
    if run_id:
        try:
            parent = mlflow.MlflowClient().get_run(run_id)
            return parent.info.experiment_id, {"mlflow.parentRunId": run_id}
        except mlflow.exceptions.MlflowException:
            pass
    warnings.warn(
        f"{what}: training run {run_id!r} is not in {tracking_uri()}; logging it at the top "
        f"level of experiment {experiment!r}",
        stacklevel=3,
    )
    return exp_id, {}
