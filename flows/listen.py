"""Listening session as a Prefect flow: people rate clips in optuna-dashboard, Optuna learns.

Two tasks, each one call into `musegen.apps.listen`: the session (serves the dashboard on
127.0.0.1, generates trials and collects ratings until `n_trials` arrive or `timeout_s`
passes), then a markdown artifact with the best settings so far. Ratings persist in the study
storage, so a timed-out session loses nothing; the next run picks the open trials up.

Run: `python -m flows.listen` (a temporary Prefect server starts unless PREFECT_API_URL
points at one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from musegen.apps import listen as stage
from musegen.config import DEFAULT_PARAMS


@task(name="listen-session")
def session(
    params: Path, n_trials: int | None, pairwise: bool, port: int | None, timeout_s: float | None
) -> dict[str, Any]:
    """Serve the dashboard and collect ratings (people are slow: no retries, no cache)."""
    return stage.listen(
        stage.ListenConfig.load(params),
        n_trials=n_trials,
        pairwise=pairwise,
        serve=True,
        port=port,
        timeout_s=timeout_s,
    )


@task(name="listen-report")
def report(result: dict[str, Any]) -> str:
    """Publish the session's summary to the Prefect UI."""
    return create_markdown_artifact(key="listen", markdown=stage.markdown(result))


@flow(name="musegen-listen")
def listen_flow(
    params: Path = DEFAULT_PARAMS,
    n_trials: int | None = None,
    pairwise: bool = False,
    port: int | None = None,  # None = serve.optuna_port
    timeout_s: float | None = 3600.0,
) -> dict[str, Any]:
    """One listening session: rate, then report."""
    result = session(params, n_trials, pairwise, port, timeout_s)
    report(result)
    return result


if __name__ == "__main__":
    listen_flow()
