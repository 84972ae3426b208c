"""Publish a finished run: copy the model card, the ONNX file(s) and the evaluation reports to
``<publish_dir>/<release>/`` (release = the export stage's key, so a re-run with the same
inputs publishes to the same folder) and point ``<publish_dir>/latest.txt`` at it."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.stage_specs import StageOutcome


def release_files(outcomes: dict[str, StageOutcome]) -> dict[str, Path]:
    """Published file name -> source path, for the files that exist."""
    export = outcomes["export"].result
    wanted = {"model_card.json": export.get("card_path")}
    for fmt, path in export.get("files", {}).items():
        if fmt.startswith("onnx"):
            wanted[Path(path).name] = path
    for role, stage in (("student", "evaluate_student"), ("teacher", "evaluate_teacher")):
        if stage in outcomes:
            result = outcomes[stage].result
            wanted[f"{role}_report.json"] = result.get("report_path")
            wanted[f"{role}_report.md"] = result.get("markdown_path")
    return {name: Path(path) for name, path in wanted.items() if path and Path(path).is_file()}


def publish_release(publish_dir: str | Path, outcomes: dict[str, StageOutcome]) -> dict[str, str]:
    """Copy the release files; returns published name -> published path."""
    release = outcomes["export"].key[:12]
    target = Path(publish_dir) / release
    target.mkdir(parents=True, exist_ok=True)
    published = {}
    for name, source in release_files(outcomes).items():
        destination = target / name
        tmp = destination.with_name(destination.name + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(destination)  # readers of the release never see a half-copied file
        published[name] = str(destination)
    (Path(publish_dir) / "latest.txt").write_text(release + "\n")
    return published
