"""Scheduled deployments, served from this process: nightly retrain and hourly proxy tuning.

Schedules come from params.yaml's `serve:` section: `pipeline_cron` runs the whole DAG (DVC
runs only the stages whose inputs changed; the rest show as Cached), `tune_cron` runs just the
tune stage with force (another tune.num_trials trials on the shared study, then the best
settings are rewritten and recorded in dvc.lock). Both appear under Deployments in the
Prefect UI, with their next runs; "Quick run" starts one now.

Run: `make prefect` (a local server on 127.0.0.1:4200 plus these deployments), or
`python -m flows.serve` against the server PREFECT_API_URL names; `--start-server` starts
that server too (PREFECT_HOME under .prefect/). Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.pipeline import ROOT, configured, pipeline, tune_flow
from musegen.apps.ui import ServeParams, prefect_server, running, stop_on_signals
from musegen.config import DEFAULT_PARAMS, load_section


def deployments(params: Path = DEFAULT_PARAMS, root: Path = ROOT) -> list[RunnerDeployment]:
    """The nightly pipeline and hourly tune deployments, with their crons from `serve:`."""
    p = load_section(ServeParams, "serve", root / params)
    args = {"params": str(params), "root": str(root)}
    return [
        configured(pipeline, params, root).to_deployment(
            name="nightly",
            schedules=[Cron(p.pipeline_cron, timezone=p.timezone)],
            parameters=args,
            description="The whole DAG; DVC runs only the stages whose inputs changed.",
            tags=["musegen"],
        ),
        tune_flow.to_deployment(
            name="hourly-tune",
            schedules=[Cron(p.tune_cron, timezone=p.timezone)],
            parameters=args | {"force": True},
            description="More proxy-scored Optuna trials; rewrites best_sampling.yaml.",
            tags=["musegen"],
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    """Serve the deployments until Ctrl-C (optionally with a local Prefect server)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--root", type=Path, default=ROOT, help="the git+DVC repo to run in")
    parser.add_argument(
        "--start-server", action="store_true", help="also run a Prefect server on serve.host"
    )
    args = parser.parse_args(argv)
    stop_on_signals()  # `make prefect &` leaves SIGINT ignored; Ctrl-C and kill must stop us
    if not args.start_server:
        serve(*deployments(args.params, args.root))
        return
    p = load_section(ServeParams, "serve", args.root / args.params)
    server = prefect_server(p, args.root)
    api = f"{server.url}/api"
    os.environ["PREFECT_API_URL"] = api  # the flow-run subprocesses read it from the env
    try:
        with running([server], args.root), temporary_settings({PREFECT_API_URL: api}):
            print(f"Prefect UI: {server.url}  (deployments: {server.url}/deployments)")
            serve(*deployments(args.params, args.root))
    except KeyboardInterrupt:
        print("stopped")


if __name__ == "__main__":
    main()
