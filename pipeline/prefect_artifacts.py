"""Prefect artifacts of a pipeline run: the metrics table with links, or the failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from pipeline.errors import StageFailed
from pipeline.stage_specs import StageOutcome
from pipeline.summary import metrics_markdown

METRICS_KEY = "dml-pipeline-metrics"
HEADLINE_KEY = "dml-pipeline-headline"
FAILURE_KEY = "dml-pipeline-failure"
DECISION_KEY = "dml-retrain-decision"
HEADLINE_METRICS = ("map_at_r", "precision_at_1")


def headline_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model: ``model`` (teacher / student), MAP@R, P@1 and its report
    (the published copy when the run published one: it stays while later runs replace theirs)."""
    rows = []
    for role in ("teacher", "student"):
        evaluation = summary[role]
        if evaluation["report_path"]:
            metrics = evaluation["metrics"] or {}
            report = summary["published"].get(f"{role}_report.json") or evaluation["report_path"]
            rows.append({"model": role, **{key: metrics.get(key) for key in HEADLINE_METRICS}, "report": report})
    return rows


def _uri(path: str) -> str:
    return Path(path).resolve().as_uri()


def publish_summary_artifacts(summary: dict[str, Any]) -> None:
    """The metrics table (markdown) and links to the student report and the model card
    (published copies when there are, else the run's own files)."""
    create_markdown_artifact(
        metrics_markdown(summary), key=METRICS_KEY, description="Headline retrieval metrics of teacher and student"
    )
    # The same numbers as data, read back by `dml pipeline runs`.
    create_table_artifact(headline_rows(summary), key=HEADLINE_KEY, description="MAP@R and P@1 per model")
    published = summary["published"]
    report = published.get("student_report.md") or summary["student"]["markdown_path"]
    card = published.get("model_card.json") or summary["model_card"]
    if report:
        create_link_artifact(_uri(report), link_text="student evaluation report", key="dml-student-report")
    if card:
        create_link_artifact(_uri(card), link_text="model card", key="dml-model-card")


def failure_markdown(error: StageFailed, done: dict[str, StageOutcome]) -> str:
    """Markdown naming the failed stage, its reason and log, and the outputs of the stages before it."""
    lines = [
        f"## Stage `{error.stage}` failed",
        "",
        f"- reason: {error.reason}",
        f"- log: `{error.log_path or 'no log (the stage did not start)'}`",
        "",
        "Outputs of the stages before it are kept:",
        "",
    ]
    lines += [f"- {name} ({outcome.status}): `{outcome.output_dir}`" for name, outcome in done.items()]
    return "\n".join(lines) + "\n"


def publish_failure_artifact(error: StageFailed, done: dict[str, StageOutcome]) -> None:
    """Publish `failure_markdown` as the flow run's failure artifact."""
    create_markdown_artifact(failure_markdown(error, done), key=FAILURE_KEY, description=f"stage {error.stage} failed")


def publish_decision_artifact(retrained: bool, reason: str) -> None:
    """Why a scheduled run retrained, or why it skipped."""
    title = "Retrained" if retrained else "Skipped: nothing to retrain"
    create_markdown_artifact(
        f"## {title}\n\n{reason}\n", key=DECISION_KEY, description="retrain decision of a scheduled run"
    )
