"""Where each stage of the chained pipeline reads and writes: per-stage config rewrites.

This is wiring only: it moves paths between config sections, it never changes what a stage
computes. The chained flow uses one layout:

- shards in ``prepare.output_dir`` (training and evaluation read them: ``data.shard_dir``);
- the teacher in ``train.run_dir``, its evaluation in ``<train.run_dir>/eval``;
- the student in ``distill.run_dir`` (teacher: ``train.run_dir``), its evaluation in
  ``<distill.run_dir>/eval`` and its export in ``<distill.run_dir>/export``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

from dml.config import DMLConfig, load_config, validate_config
from dml.errors import ConfigError
from pipeline.config import PipelineRunConfig

ConfigT = TypeVar("ConfigT", bound=DMLConfig)

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"  # = dml.models.model_file.MODEL_FILE (a test checks; importing it loads torch)
REPORT_FILE = "report.json"  # = dml.eval.report.REPORT_JSON


def with_values(config: ConfigT, values: dict[str, Any]) -> ConfigT:
    """A validated copy of ``config`` with dotted keys set (``{"evaluate.output_dir": ...}``)."""
    data = config.model_dump(mode="json")
    for dotted, value in values.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return validate_config(data, type(config))


def _nested(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def check_layout(config: DMLConfig) -> None:
    """The shard folder and the two run folders must be distinct and not inside each other,
    since a stage whose inputs changed renames its whole output folder aside.

    Raises ConfigError naming the two folders that overlap.
    """
    folders = {
        "prepare.output_dir": Path(config.prepare.output_dir),
        "train.run_dir": Path(config.train.run_dir),
        "distill.run_dir": Path(config.distill.run_dir),
    }
    names = list(folders)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = folders[first], folders[second]
            if _nested(a, b) or _nested(b, a):
                raise ConfigError(f"pipeline: {first} ({a}) and {second} ({b}) must be separate folders")


def load_pipeline_config(config_path: str | Path | None, overrides: list[str] | None = None) -> PipelineRunConfig:
    """Load the config and point training/evaluation at the shards the pipeline prepares."""
    config = load_config(config_path, list(overrides or []), model=PipelineRunConfig)
    if config.data.shard_dir != config.prepare.output_dir:
        log.info(
            "pipeline: data.shard_dir %s replaced by prepare.output_dir %s",
            config.data.shard_dir,
            config.prepare.output_dir,
        )
    teacher_eval, student = Path(config.train.run_dir) / "eval", Path(config.distill.run_dir)
    for key, placed, used in (
        ("evaluate.output_dir", f"{teacher_eval} and {student / 'eval'}", (teacher_eval, student / "eval")),
        ("export.output_dir", str(student / "export"), (student / "export",)),
    ):
        section, field = key.split(".")
        given = getattr(getattr(config, section), field)
        if given != type(getattr(config, section)).model_fields[field].default and Path(given) not in used:
            # the pipeline derives these from the run folders; say so rather than drop the value unseen
            log.warning("pipeline: %s %s is not used: the pipeline writes to %s", key, given, placed)
    teacher = config.distill.teacher
    default_teacher = type(config.distill).model_fields["teacher"].default
    if teacher and teacher != default_teacher and Path(teacher) != Path(config.train.run_dir):
        log.warning(
            "pipeline: distill.teacher %s is not used: the student learns from this run's teacher %s",
            teacher,
            config.train.run_dir,
        )
    values: dict[str, Any] = {"data.shard_dir": config.prepare.output_dir, "distill.teacher": config.train.run_dir}
    if config.distill.student.embedding_dim is None:
        # The student is trained in the teacher's embedding space (dml.distill.run); the
        # teacher here is this pipeline's own train stage: say it explicitly in the config.
        values["distill.student.embedding_dim"] = config.model.embedding_dim
    config = with_values(config, values)
    check_layout(config)
    return config


def teacher_model_file(config: DMLConfig) -> Path:
    """The teacher's ``model.pt`` in ``train.run_dir``."""
    return Path(config.train.run_dir) / MODEL_FILE


def student_model_file(config: DMLConfig) -> Path:
    """The student's ``model.pt`` in ``distill.run_dir``."""
    return Path(config.distill.run_dir) / MODEL_FILE


def evaluate_teacher_config(config: DMLConfig) -> DMLConfig:
    """``config`` set to evaluate the teacher's model into ``<train.run_dir>/eval``."""
    run = Path(config.train.run_dir)
    return with_values(config, {"evaluate.model_path": str(run / MODEL_FILE), "evaluate.output_dir": str(run / "eval")})


def evaluate_student_config(config: DMLConfig) -> DMLConfig:
    """``config`` set to evaluate the student's model into ``<distill.run_dir>/eval``."""
    run = Path(config.distill.run_dir)
    return with_values(config, {"evaluate.model_path": str(run / MODEL_FILE), "evaluate.output_dir": str(run / "eval")})


def distill_config(config: DMLConfig) -> DMLConfig:
    """``config`` with the teacher set to this pipeline's training run."""
    return with_values(config, {"distill.teacher": config.train.run_dir})


def export_config(config: DMLConfig) -> DMLConfig:
    """``config`` set to export the student's model into ``<distill.run_dir>/export``."""
    run = Path(config.distill.run_dir)
    return with_values(
        config,
        {
            "export.model_path": str(run / MODEL_FILE),
            "export.output_dir": str(run / "export"),
            "export.report_path": str(run / "eval" / REPORT_FILE),
        },
    )
