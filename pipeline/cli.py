"""`dml pipeline run`: run the chained flow and print where the results are."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dml.errors import DMLError
from pipeline.errors import StageFailed
from pipeline.summary import headline_line
from pipeline.wiring import load_pipeline_config


def run_pipeline_command(config_path: str | Path | None, overrides: list[str] | None = None) -> int:
    """Run `pipeline.flows.dml_pipeline`; prints the report / model card paths and the
    teacher's and student's MAP@R and P@1. Exit codes: 0 done, 1 a stage failed (stage,
    reason and log path printed), 2 bad config."""
    overrides = list(overrides or [])
    if config_path is None:
        print("dml pipeline: error: --config FILE is required", file=sys.stderr)
        return 2
    try:
        load_pipeline_config(config_path, overrides)  # fail in a second, before Prefect starts
    except DMLError as exc:
        print(f"dml pipeline: error: {exc}", file=sys.stderr)
        return 2
    # Prefect's temporary local server needs well over its default start-up time on a
    # loaded 2-core machine (seen: 35-65 s); a user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    # No telemetry: the machine may be offline, and its heartbeat contends for the SQLite lock.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from pipeline.flows import dml_pipeline  # imports prefect: only once the config is good

    try:
        summary = dml_pipeline(config_path=str(config_path), overrides=overrides)
    except StageFailed as exc:
        print(f"dml pipeline: {exc}", file=sys.stderr)
        return 1
    ran = ", ".join(f"{name}: {info['status']}" for name, info in summary["stages"].items())
    print(f"pipeline: {ran}")
    print(f"pipeline: report: {summary['student']['report_path']}; model card: {summary['model_card']}")
    if summary["published"]:
        print(f"pipeline: published to {Path(next(iter(summary['published'].values()))).parent}")
    print(f"pipeline: {headline_line(summary)}")
    return 0
