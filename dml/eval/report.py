"""The evaluation report: ``report.json`` (everything), ``report.md`` (what a reader looks at
first) and ``per_class.csv`` (the per-class retrieval breakdown, one row per class, which at
face scale is too long for the JSON).

``report.json`` holds every metric, the resolved config, the model file's sha256, the data
manifest's sha256, query counts and timestamps; floats that are NaN are written as null so
the file is strict JSON.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dml.eval import verification_report
from dml.eval.class_names import class_name
from dml.eval.evaluation import EvaluationMetrics
from dml.files import write_json_atomic

FORMAT = "dml.eval_report/1"
REPORT_JSON, REPORT_MD, PER_CLASS_CSV = "report.json", "report.md", "per_class.csv"
WORST_CLASSES = 10

PLOT_TITLES = {
    "tar_at_far": "Verification: TAR against FAR",
    "recall_at_k": "Retrieval: recall@k and CMC",
    "retrieval_grid": "Retrieval examples",
    "embedding_map": "Embeddings, first two principal components",
    "verification_sets_roc": "Face verification sets: ROC and 10-fold accuracy",
    "embedding_map_umap": "Embeddings, UMAP",
    "embedding_map_tsne": "Embeddings, t-SNE",
}
HEADLINE_NAMES = {
    "precision_at_1": "P@1",
    "map_at_r": "MAP@R",
    "r_precision": "R-precision",
    "roc_auc": "ROC AUC",
    "eer": "EER",
    "cmc_rank_1": "CMC rank 1",
    "global_average_precision": "GAP",
}


def headline_label(name: str, verification_sets: Sequence[str] = ()) -> str:
    """Display name of a headline key: recall_at_5 -> R@5, tar_at_far_1e-03 -> TAR@FAR=1e-03,
    ver_lfw_accuracy -> lfw: 10-fold accuracy (for a name in ``verification_sets``)."""
    face = verification_report.headline_label(name, verification_sets)
    if face is not None:
        return face
    if name.startswith("recall_at_"):
        return f"R@{name.removeprefix('recall_at_')}"
    if name.startswith("tar_at_far_"):
        return f"TAR@FAR={name.removeprefix('tar_at_far_')}"
    for metric in ("map_at_r", "precision_at_1"):  # re-ranked variants: map_at_r_dba+alpha_qe
        if name.startswith(f"{metric}_") and not name.startswith("map_at_r_at"):
            return f"{HEADLINE_NAMES[metric]} after {name.removeprefix(metric + '_')}"
    return HEADLINE_NAMES.get(name, name)


def strict_json(value: Any) -> Any:
    """``value`` with NaN / inf floats replaced by None and numpy scalars by Python ones."""
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def class_rows(per_class: Mapping[Any, Mapping[str, float]], class_names: Sequence[str] | None) -> list[dict[str, Any]]:
    """Per-class table rows with the class name, sorted by label (ints stay ints)."""
    return [
        {
            "label": int(label) if isinstance(label, (int, np.integer)) else str(label),
            "class_name": class_name(label, class_names),
            **per_class[label],
        }
        for label in sorted(per_class)
    ]


def write_per_class_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the per-class rows as CSV (header only when there are none); returns ``path``."""
    columns = list(rows[0]) if rows else ["label", "class_name", "num_queries"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def build_report(
    metrics: EvaluationMetrics,
    headline: Mapping[str, Any],
    *,
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
    counts: Mapping[str, Any],
    plots: Mapping[str, str],
    class_names: Sequence[str] | None,
    timestamps: Mapping[str, str | None],
    verification_sets: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` payload (see module docstring); ``verification_sets`` maps a face
    verification set's name to its numbers (`dml.eval.verification_report`)."""
    rows = class_rows(metrics.per_class, class_names)
    worst = sorted(rows, key=lambda r: (r.get("map_at_r", 0.0), r["label"]))[:WORST_CLASSES]
    report = {
        "format": FORMAT,
        **timestamps,
        "headline": dict(headline),
        "num_queries": metrics.retrieval["num_queries"],
        "num_excluded_queries": metrics.retrieval["num_excluded_queries"],
        "counts": dict(counts),
        "retrieval": {**metrics.retrieval, "recall_curve": metrics.recall_curve},
        "per_class": {"file": PER_CLASS_CSV, "num_classes": len(rows), "worst_by_map_at_r": worst},
        "verification": metrics.verification,
        "identification": metrics.identification,
        "reranking": metrics.reranking,
        "verification_sets": dict(verification_sets or {}),
        "plots": dict(plots),
        "notes": list(metrics.notes),
        **provenance,
        "config": dict(config),
    }
    return strict_json(report)


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: provenance, the headline table, notes and links to the pictures."""
    model, data, counts = report["model"], report["data"], report["counts"]
    gallery = (
        f"gallery split `{data['gallery_split']}` ({counts['num_gallery']} samples)"
        if data["gallery_split"]
        else "leave-one-out (no gallery split)"
    )
    lines = [
        "# Evaluation report",
        "",
        f"- model: `{model['path']}` (sha256 `{str(model['sha256'])[:16]}…`)",
        f"- data: `{data['shard_dir']}` (manifest sha256 `{str(data['manifest_sha256'])[:16]}…`)",
        f"- queries: split `{data['query_split']}` ({counts['num_query']} samples, "
        f"{report['num_queries']} scored, {report['num_excluded_queries']} without a relevant item); {gallery}",
        f"- finished: {report['finished_at']}",
        "",
        "| metric | value |",
        "| --- | ---: |",
    ]
    face_sets = report.get("verification_sets") or {}
    lines += [
        f"| {headline_label(name)} | {_format(value)} |"
        for name, value in report["headline"].items()
        if verification_report.headline_label(name, list(face_sets)) is None
    ]  # sets: own table below
    lines += verification_report.markdown_section(face_sets, report["config"]["evaluate"]["fars"], data["query_split"])
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    lines += [
        "",
        f"Per-class retrieval metrics: [{PER_CLASS_CSV}]({PER_CLASS_CSV}); "
        f"all numbers: [{REPORT_JSON}]({REPORT_JSON}).",
    ]
    if report["plots"]:
        lines += ["", "## Pictures"]
        for name, file in report["plots"].items():
            lines += ["", f"[{PLOT_TITLES.get(name, name)}]({file})", "", f"![{name}]({file})"]
    return "\n".join(lines) + "\n"


def write_report(
    output_dir: Path, report: Mapping[str, Any], metrics: EvaluationMetrics, class_names: Sequence[str] | None
) -> tuple[Path, Path]:
    """Write ``report.json``, ``report.md`` and ``per_class.csv``; returns (json path, md path)."""
    write_per_class_csv(class_rows(metrics.per_class, class_names), output_dir / PER_CLASS_CSV)
    json_path = write_json_atomic(output_dir / REPORT_JSON, report, sort_keys=False, allow_nan=False)
    markdown_path = output_dir / REPORT_MD
    markdown_path.write_text(render_markdown(report))
    return json_path, markdown_path
