"""The pipeline's summary: headline metrics of teacher and student, where the report and the
model card are, and each stage's status. Plain data; `pipeline.prefect_artifacts` renders it."""

from __future__ import annotations

from typing import Any

from pipeline.stage_specs import StageOutcome

HEADLINE = (
    ("map_at_r", "MAP@R"),
    ("precision_at_1", "P@1"),
    ("r_precision", "R-precision"),
    ("recall_at_5", "Recall@5"),
    ("roc_auc", "ROC AUC"),
    ("eer", "EER"),
)


def _evaluation(outcomes: dict[str, StageOutcome], stage: str) -> dict[str, Any]:
    outcome = outcomes.get(stage)
    if outcome is None:
        return {"metrics": {}, "report_path": None, "markdown_path": None}
    return {key: outcome.result.get(key) for key in ("metrics", "report_path", "markdown_path", "model_path")}


def summarize(outcomes: dict[str, StageOutcome], published: dict[str, str] | None = None) -> dict[str, Any]:
    """JSON-able summary of a (finished) chained run."""
    export = outcomes["export"].result if "export" in outcomes else {}
    return {
        "stages": {
            name: {"status": o.status, "output_dir": o.output_dir, "log_path": o.log_path}
            for name, o in outcomes.items()
        },
        "teacher": _evaluation(outcomes, "evaluate_teacher"),
        "student": _evaluation(outcomes, "evaluate_student"),
        "model_card": export.get("card_path"),
        "files": export.get("files", {}),
        "published": dict(published or {}),
    }


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "—"


def metrics_markdown(summary: dict[str, Any]) -> str:
    """A Markdown table of teacher vs student headline metrics, the stages, and the links."""
    teacher, student = summary["teacher"]["metrics"] or {}, summary["student"]["metrics"] or {}
    lines = ["## Teacher and student", "", "| metric | teacher | student |", "|---|---|---|"]
    for key, label in HEADLINE:
        if key in teacher or key in student:
            lines.append(f"| {label} | {_number(teacher.get(key))} | {_number(student.get(key))} |")
    lines += ["", "## Stages", "", "| stage | status | output |", "|---|---|---|"]
    lines += [f"| {name} | {info['status']} | `{info['output_dir']}` |" for name, info in summary["stages"].items()]
    lines += ["", "## Files", ""]
    for label, path in (
        ("teacher report", summary["teacher"]["report_path"]),
        ("student report", summary["student"]["report_path"]),
        ("model card", summary["model_card"]),
    ):
        if path:
            lines.append(f"- {label}: `{path}`")
    lines += [f"- published {name}: `{path}`" for name, path in summary["published"].items()]
    return "\n".join(lines) + "\n"


def headline_line(summary: dict[str, Any]) -> str:
    """``teacher map_at_r=… precision_at_1=…; student …`` for the CLI's last line."""
    parts = []
    for role in ("teacher", "student"):
        metrics = summary[role]["metrics"] or {}
        shown = " ".join(
            f"{key}={metrics[key]:.4f}"
            for key in ("map_at_r", "precision_at_1")
            if isinstance(metrics.get(key), (int, float))
        )
        parts.append(f"{role} {shown or 'not evaluated'}")
    return "; ".join(parts)
