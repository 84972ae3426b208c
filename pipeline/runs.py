"""`dml pipeline runs`: the recent runs of the scheduled retrain, read from the Prefect API.

Each run's state (Completed, "Skipped", Failed, Cancelled, ...), its duration, the state's
message (why it skipped, why it retrained, or the failed stage with its reason and log), and,
for runs that retrained, teacher and student MAP@R / P@1 with the report paths (from the
run's ``dml-pipeline-headline`` table artifact).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import DeploymentSort, FlowRunSort

from pipeline.prefect_artifacts import HEADLINE_KEY, HEADLINE_METRICS
from pipeline.schedules import FLOW_NAME


@dataclass
class RunRecord:
    """One flow run of the scheduled retrain. ``duration_s``: seconds from start to end (to
    now while running; None before it starts). ``models``: rows of the headline table."""

    name: str
    deployment: str | None
    state: str
    state_type: str
    expected_start: datetime | None
    duration_s: float | None
    message: str
    models: list[dict[str, Any]] = field(default_factory=list)


def _duration(run: FlowRun) -> float | None:
    if run.start_time is None:
        return None
    return run.total_run_time.total_seconds() if run.end_time else run.estimated_run_time.total_seconds()


def _deployment_names(client: SyncPrefectClient, runs: list[FlowRun]) -> dict[UUID, str]:
    ids = list({run.deployment_id for run in runs if run.deployment_id})
    if not ids:
        return {}
    # sort and limit explicitly: this server rejects the client's nulls for them (422)
    found = client.read_deployments(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)),
        sort=DeploymentSort.NAME_ASC,
        limit=len(ids),
    )
    return {deployment.id: deployment.name for deployment in found}


def _headlines(client: SyncPrefectClient, runs: list[FlowRun]) -> dict[UUID, list[dict[str, Any]]]:
    if not runs:
        return {}
    artifacts = ArtifactFilter(
        key=ArtifactFilterKey(any_=[HEADLINE_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id for run in runs])
    )
    # Posted without flow_runs / task_runs filters: prefect 3.8.8's read_artifacts sends them
    # as null, which its server rejects (422), and empty ones drop flow-level artifacts.
    body = {
        "artifacts": artifacts.model_dump(mode="json", exclude_unset=True),
        "sort": "CREATED_DESC",
        "limit": len(runs) * 4,
        "offset": 0,
    }
    response = client.request("POST", "/artifacts/filter", json=body)
    response.raise_for_status()
    found: dict[UUID, list[dict[str, Any]]] = {}
    for artifact in response.json():
        data = artifact["data"]
        rows = json.loads(data) if isinstance(data, str) else data
        found.setdefault(UUID(artifact["flow_run_id"]), rows)  # newest first: a retried run's last table
    return found


def recent_runs(limit: int = 10, deployment: str | None = None) -> list[RunRecord]:
    """The ``limit`` most recent runs (newest first) of the scheduled retrain, of every
    deployment or of the one named ``deployment``; future scheduled runs are left out."""
    not_future = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])))
    deployments = DeploymentFilter(name=DeploymentFilterName(any_=[deployment])) if deployment else None
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=not_future,
            deployment_filter=deployments,
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=limit,
        )
        names = _deployment_names(client, runs)
        headlines = _headlines(client, runs)
    return [
        RunRecord(
            name=run.name,
            deployment=names.get(run.deployment_id) if run.deployment_id else None,
            state=run.state_name or "",
            state_type=run.state_type.value if run.state_type else "",
            expected_start=run.expected_start_time,
            duration_s=_duration(run),
            message=(run.state.message or "") if run.state else "",
            models=headlines.get(run.id, []),
        )
        for run in runs
    ]


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def format_run(record: RunRecord) -> list[str]:
    """Lines for one run: a header line, then one line per evaluated model."""
    when = record.expected_start.strftime("%Y-%m-%d %H:%M:%S") if record.expected_start else "-"
    took = f"{record.duration_s:.0f} s" if record.duration_s is not None else "-"
    lines = [f"{when}  {record.deployment or '-'}  {record.name}  {record.state}  {took}  {record.message}".rstrip()]
    for model in record.models:
        metrics = " ".join(f"{key}={_metric(model.get(key))}" for key in HEADLINE_METRICS)
        lines.append(f"    {model['model']}: {metrics}  report: {model.get('report')}")
    return lines
