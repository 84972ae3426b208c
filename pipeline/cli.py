"""`dml pipeline run|serve|deploy|runs`: the chained flow now, on a schedule from this machine,
as a deployment on a work pool, and the recent scheduled runs.

`register` is the ``dml.commands`` entry point (pyproject.toml) that adds ``dml pipeline`` to
the `dml` command. Importing this module does not import Prefect (`dml` builds its parser from
it); each command imports it once its arguments and config are known to be good.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dml.errors import ConfigError, DMLError
from pipeline.errors import StageFailed
from pipeline.schedules import DEPLOYMENT, FLOW_NAME, NIGHTLY_CRON
from pipeline.stage_paths import load_pipeline_config
from pipeline.summary import headline_line


def ensure_prefect_home() -> None:
    """Create ``PREFECT_HOME`` (with its parents) when it is set: Prefect makes one level only,
    so ``runs/.prefect`` in a fresh clone (no ``runs/``) left its server unable to open its
    database, and the run timed out five minutes later."""
    home = os.environ.get("PREFECT_HOME")
    if home:
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)


def _quiet_prefect_defaults() -> None:
    # Prefect's temporary local server needs well over its default start-up time on a
    # loaded 2-core machine (seen: 35-65 s); a user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    # No telemetry: the machine may be offline, and its heartbeat contends for the SQLite lock.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    ensure_prefect_home()  # every command that starts Prefect comes through here


def run_pipeline_command(config_path: str | Path | None, overrides: list[str] | None = None) -> int:
    """Run `pipeline.flows.dml_pipeline`; prints the report / model card paths and the
    teacher's and student's MAP@R and P@1. Exit codes: 0 done, 1 a stage failed (stage,
    reason and log path printed), 2 bad config or a stage refused its input (not retried)."""
    overrides = list(overrides or [])
    if config_path is None:
        print("dml pipeline: error: --config FILE is required", file=sys.stderr)
        return 2
    try:
        load_pipeline_config(config_path, overrides)  # fail in a second, before Prefect starts
    except DMLError as exc:
        print(f"dml pipeline: error: {exc}", file=sys.stderr)
        return 2
    _quiet_prefect_defaults()
    from pipeline.flows import (
        dml_pipeline,  # imports prefect: only once the config is good
    )

    try:
        summary = dml_pipeline(config_path=str(config_path), overrides=overrides)
    except StageFailed as exc:
        print(f"dml pipeline: {exc}", file=sys.stderr)
        return 2 if exc.input_error else 1  # bad input exits 2, as every dml command does
    ran = ", ".join(f"{name}: {info['status']}" for name, info in summary["stages"].items())
    print(f"pipeline: {ran}")
    print(f"pipeline: report: {summary['student']['report_path']}; model card: {summary['model_card']}")
    if summary["published"]:
        print(f"pipeline: published to {Path(next(iter(summary['published'].values()))).parent}")
    print(f"pipeline: {headline_line(summary)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    return run_pipeline_command(args.config, args.overrides)


def _cmd_tune(args: argparse.Namespace) -> int:
    """`dml tune` as a Prefect flow (`pipeline.tune_flow`); exit codes as `dml pipeline run`."""
    from pipeline.tune_launch import load_tune_inputs

    try:
        load_tune_inputs(args.config, args.space, list(args.overrides))  # fail in a second, before Prefect starts
    except DMLError as exc:
        print(f"dml pipeline: error: {exc}", file=sys.stderr)
        return 2
    _quiet_prefect_defaults()
    from pipeline.tune_flow import run_tune_flow

    try:
        result = run_tune_flow(str(args.config), str(args.space), list(args.overrides), args.resume)
    except ConfigError as exc:
        print(f"dml pipeline: error: {exc}", file=sys.stderr)
        return 2
    except DMLError as exc:
        print(f"dml pipeline: tune failed: {exc}", file=sys.stderr)
        return 1
    for line in result["lines"]:
        print(f"pipeline tune: {line}")
    print(f"pipeline tune: best config: {result['best_config']}; report: {result['report']}")
    return 0


def _server_url() -> str:
    """The configured Prefect API URL; a `ConfigError` when there is none (a schedule needs a
    server that keeps running: Prefect's temporary one has no scheduler)."""
    _quiet_prefect_defaults()
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "no Prefect server: start one (`prefect server start`) and set PREFECT_API_URL "
            "(e.g. `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`)"
        )
    return url


def _schedule_text(cron: str | None, interval: float | None) -> str:
    """The schedule in words; a `ConfigError` for a cron expression Prefect rejects."""
    if interval:
        return f"every {interval:g} s"
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError as exc:
        raise ConfigError(f"--cron '{cron}': {exc.errors()[0]['msg']}") from None
    return f"cron '{cron}' (UTC)"


def _cmd_serve(args: argparse.Namespace) -> int:
    load_pipeline_config(args.config, args.overrides)
    when = _schedule_text(args.cron, args.interval)
    url = _server_url()
    from prefect import serve

    from pipeline.deployments import serve_deployment

    name = args.name or DEPLOYMENT
    deployment = serve_deployment(args.config, args.cron, args.overrides, name, args.interval)
    print(
        f"pipeline: serving {FLOW_NAME}/{name} from this process, {when}, one run at a time, "
        f"on {url}; each run retrains only when the data or the config changed. "
        f"Recent runs: dml pipeline runs. Stop with Ctrl-C.",
        flush=True,
    )
    serve(deployment, print_starting_message=False)
    return 0


def _worker_hint(pool: str, pool_type: str, url: str, config: str) -> list[str]:
    if pool_type == "process":
        return [
            f"start the worker (here, or on a machine with the same paths): "
            f"PREFECT_API_URL={url} prefect worker start --pool {pool}"
        ]
    from pipeline.deployments import POD_CONFIG, RUN_CONFIG_MAP

    return [
        f"the worker runs in the cluster: kubectl apply -k k8s/overlays/gpu-prod (or cpu-dev), with "
        f"WORK_POOL={pool} and PREFECT_API_URL pointing at this server ({url}) in ConfigMap prefect-worker",
        f"flow runs read their config from ConfigMap {RUN_CONFIG_MAP} ({POD_CONFIG}); to put this file there: "
        f"dml config --config {config} > config.yaml && kubectl -n dml create configmap {RUN_CONFIG_MAP} "
        f"--from-file=config.yaml --dry-run=client -o yaml | kubectl apply -f -",
    ]


def _cmd_deploy(args: argparse.Namespace) -> int:
    load_pipeline_config(args.config, args.overrides)
    when = _schedule_text(args.cron, args.interval)
    url = _server_url()
    from pipeline.deployments import (
        ensure_work_pool,
        kubernetes_deployment,
        process_deployment,
    )

    pool_type = ensure_work_pool(args.work_pool, kubernetes=args.image is not None)
    schedule = {"cron": args.cron, "interval": args.interval, "overrides": args.overrides, "work_pool": args.work_pool}
    if pool_type == "process":
        if args.image:
            raise ConfigError(f"work pool {args.work_pool} is a process pool: --image is for a kubernetes pool")
        name = args.name or DEPLOYMENT
        deployment = process_deployment(args.config, name=name, **schedule)
    elif pool_type == "kubernetes":
        if not args.image:
            raise ConfigError(f"work pool {args.work_pool} is a kubernetes pool: --image IMAGE is required")
        name = args.name or f"{DEPLOYMENT}-k8s"
        deployment = kubernetes_deployment(args.image, name=name, **schedule)
    else:
        raise ConfigError(
            f"work pool {args.work_pool} is of type {pool_type}: dml deploys to process or kubernetes pools"
        )
    deployment_id = deployment.apply()
    print(
        f"pipeline: deployment {FLOW_NAME}/{name} ({deployment_id}) on work pool {args.work_pool} "
        f"({pool_type}), {when}, one run at a time, on {url}"
    )
    for line in _worker_hint(args.work_pool, pool_type, url, args.config):
        print(f"pipeline: {line}")
    print("pipeline: recent runs: dml pipeline runs")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    url = _server_url()
    from pipeline.runs import format_run, recent_runs

    records = recent_runs(args.limit, args.deployment)
    if not records:
        print(f"pipeline: no runs of {FLOW_NAME} on {url} yet (dml pipeline serve / deploy schedules them)")
    for record in records:
        print("\n".join(format_run(record)))
    return 0


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", default=NIGHTLY_CRON, help=f"cron schedule (default '{NIGHTLY_CRON}': 02:00 daily)")
    when.add_argument("--interval", type=_positive, metavar="SECONDS", help="run every SECONDS instead of cron")
    parser.add_argument("--name", help=f"deployment name (default {DEPLOYMENT}; {DEPLOYMENT}-k8s on a kubernetes pool)")


def add_pipeline_commands(
    parser: argparse.ArgumentParser, add_config_args: Callable[[argparse.ArgumentParser, bool], None]
) -> None:
    """The ``run``, ``serve``, ``deploy`` and ``runs`` subcommands of ``dml pipeline``;
    ``add_config_args(parser, required)`` adds ``--config`` and the dotted overrides."""
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="prepare -> train -> evaluate -> distill -> export, now")
    add_config_args(run, True)
    run.set_defaults(handler=_cmd_run)

    tune = sub.add_parser("tune", help="the dml tune study as a flow: trials as mapped tasks, then seeds on test")
    add_config_args(tune, True)
    tune.add_argument("--space", required=True, help="search-space YAML (see dml tune)")
    tune.add_argument("--resume", action="store_true", help="continue the study; killed trials are retried")
    tune.set_defaults(handler=_cmd_tune)

    serve = sub.add_parser(
        "serve",
        help="run the chain on a schedule from this machine (blocks); retrains "
        "only when the data or the config changed",
    )
    add_config_args(serve, True)
    _add_schedule_args(serve)
    serve.set_defaults(handler=_cmd_serve)

    deploy = sub.add_parser("deploy", help="register the scheduled chain on a work pool (process or kubernetes)")
    add_config_args(deploy, True)
    deploy.add_argument(
        "--work-pool",
        required=True,
        metavar="NAME",
        help="work pool; created when missing: kubernetes with --image, else process",
    )
    deploy.add_argument("--image", help="image with dml installed (kubernetes pools)")
    _add_schedule_args(deploy)
    deploy.set_defaults(handler=_cmd_deploy)

    runs = sub.add_parser("runs", help="recent scheduled runs: state, duration, teacher/student metrics, report")
    runs.add_argument("--limit", type=int, default=10, help="how many runs (default 10)")
    runs.add_argument("--deployment", metavar="NAME", help="only this deployment's runs")
    runs.set_defaults(handler=_cmd_runs)


def register(subparsers: Any, add_config_args: Callable[[argparse.ArgumentParser, bool], None]) -> None:
    """Entry point of group ``dml.commands``: add ``dml pipeline`` and its subcommands to the
    `dml` parser's ``subparsers``."""
    pipeline = subparsers.add_parser(
        "pipeline", help="the chained Prefect flow: run now, serve or deploy on a schedule"
    )
    add_pipeline_commands(pipeline, add_config_args)
