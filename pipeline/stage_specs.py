"""The pipeline's stages as data: what each runs, where it writes, what its cache key covers,
and how its result is read back from the files it wrote (the same for every launcher).

Cache inputs per stage (see `pipeline.fingerprint`):

- prepare: the ``prepare`` section + a stat fingerprint of the raw source path;
- train: seed, data, model, loss, optimizer, schedule, swa, train + the manifest sha256;
- evaluate (teacher / student): seed, data, evaluate + manifest + that model.pt's sha256;
- distill: the train sections + distill + manifest + the teacher's model.pt sha256;
- export: data, export + manifest + the student's model.pt and evaluation report sha256.
The ``pipeline`` section (launcher, image, ...) is in none of them: how a stage is launched
does not change what it computes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dml.config import DMLConfig
from dml.data.manifest import MANIFEST, load_manifest
from pipeline import stage_paths
from pipeline.config import PipelineRunConfig
from pipeline.fingerprint import canonical_digest, file_digest, sections_digest, source_fingerprint

TRAIN_SECTIONS = ["seed", "data", "model", "loss", "optimizer", "schedule", "swa", "train"]
EVALUATE_SECTIONS = ["seed", "data", "evaluate"]
STAGE_ORDER = ("prepare", "train", "evaluate_teacher", "distill", "evaluate_student", "export")


@dataclass
class StageSpec:
    """One stage ready to launch: ``command`` is the `dml` subcommand, ``config`` the stage's
    rewritten config, ``done_file`` (inside ``output_dir``) proves the stage finished."""

    name: str
    command: str
    config: DMLConfig
    output_dir: Path
    done_file: str
    inputs: dict[str, str]
    distributed: bool
    resumable: bool

    @property
    def key(self) -> str:
        """sha256 of the stage name and its inputs: equal keys mean the outputs are current."""
        return canonical_digest({"stage": self.name, "inputs": self.inputs})

    @property
    def log_path(self) -> Path:
        """The stage's log file, ``<output_dir>/logs/<name>.log``."""
        return self.output_dir / "logs" / f"{self.name}.log"


@dataclass
class StageOutcome:
    """What a stage produced. ``status``: "ran" or "cached". ``result`` holds the stage's
    facts read from its files (paths, hashes, steps, headline metrics)."""

    stage: str
    status: str
    key: str
    output_dir: str
    log_path: str
    result: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The outcome as a JSON-ready dict."""
        return asdict(self)


def _manifest_digest(config: DMLConfig) -> str:
    return file_digest(Path(config.data.shard_dir) / MANIFEST)


def prepare_spec(config: DMLConfig) -> StageSpec:
    """The prepare stage: keyed by the prepare section and the source's fingerprint."""
    inputs = {"config": sections_digest(config, ["prepare"]), "source": source_fingerprint(config.prepare.source.path)}
    return StageSpec(
        "prepare",
        "prepare",
        config,
        Path(config.prepare.output_dir),
        MANIFEST,
        inputs,
        distributed=False,
        resumable=True,
    )


def train_spec(config: DMLConfig) -> StageSpec:
    """The teacher's training: keyed by the training sections and the data manifest."""
    inputs = {"config": sections_digest(config, TRAIN_SECTIONS), "manifest": _manifest_digest(config)}
    return StageSpec(
        "train",
        "train",
        config,
        Path(config.train.run_dir),
        stage_paths.MODEL_FILE,
        inputs,
        distributed=True,
        resumable=True,
    )


def _evaluate_spec(name: str, config: DMLConfig) -> StageSpec:
    inputs = {
        "config": sections_digest(config, EVALUATE_SECTIONS),
        "manifest": _manifest_digest(config),
        "model": file_digest(config.evaluate.model_path),
    }
    return StageSpec(
        name,
        "evaluate",
        config,
        Path(config.evaluate.output_dir),
        "report.json",
        inputs,
        distributed=True,
        resumable=False,
    )


def evaluate_teacher_spec(config: DMLConfig) -> StageSpec:
    """The teacher's evaluation into ``<train.run_dir>/eval``."""
    return _evaluate_spec("evaluate_teacher", stage_paths.evaluate_teacher_config(config))


def evaluate_student_spec(config: DMLConfig) -> StageSpec:
    """The student's evaluation into ``<distill.run_dir>/eval``."""
    return _evaluate_spec("evaluate_student", stage_paths.evaluate_student_config(config))


def distill_spec(config: DMLConfig) -> StageSpec:
    """The student's distillation from this pipeline's teacher, keyed by the teacher's model file too."""
    config = stage_paths.distill_config(config)
    inputs = {
        "config": sections_digest(config, [*TRAIN_SECTIONS, "distill"]),
        "manifest": _manifest_digest(config),
        "teacher": file_digest(stage_paths.teacher_model_file(config)),
    }
    return StageSpec(
        "distill",
        "distill",
        config,
        Path(config.distill.run_dir),
        stage_paths.MODEL_FILE,
        inputs,
        distributed=True,
        resumable=True,
    )


def export_spec(config: DMLConfig) -> StageSpec:
    """The student's export, keyed by its model file and evaluation report (when there is one)."""
    config = stage_paths.export_config(config)
    student = stage_paths.student_model_file(config)
    assert config.export.report_path is not None  # export_config sets it
    report = Path(config.export.report_path)  # run_export copies its headline metrics into the card
    inputs = {
        "config": sections_digest(config, ["data", "export"]),
        "manifest": _manifest_digest(config),
        "model": file_digest(student),
        "report": file_digest(report) if report.is_file() else "none",
    }
    return StageSpec(
        "export",
        "export",
        config,
        Path(config.export.output_dir),
        "model_card.json",
        inputs,
        distributed=False,
        resumable=False,
    )


SPEC_BUILDERS: dict[str, Callable[[DMLConfig], StageSpec]] = {
    "prepare": prepare_spec,
    "train": train_spec,
    "evaluate_teacher": evaluate_teacher_spec,
    "distill": distill_spec,
    "evaluate_student": evaluate_student_spec,
    "export": export_spec,
}


def chained_stages(config: PipelineRunConfig) -> list[str]:
    """The stages `dml pipeline run` chains, in order (the teacher's evaluation is optional)."""
    return [stage for stage in STAGE_ORDER if stage != "evaluate_teacher" or config.pipeline.evaluate_teacher]


def build_spec(stage: str, config: DMLConfig) -> StageSpec:
    """The spec of ``stage`` (one of `STAGE_ORDER`) for the pipeline config ``config``.

    Raises ValueError for an unknown stage.
    """
    if stage not in SPEC_BUILDERS:
        raise ValueError(f"unknown pipeline stage '{stage}' (known: {', '.join(STAGE_ORDER)})")
    return SPEC_BUILDERS[stage](config)


# ---------------------------------------------------------------------------------------------
# Reading a finished stage's result from its files


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def prepare_result(spec: StageSpec) -> dict[str, Any]:
    """The manifest's path, sha256 and counts."""
    manifest, path = load_manifest(spec.output_dir), spec.output_dir / MANIFEST
    return {"manifest_path": str(path), "manifest_sha256": file_digest(path), "counts": manifest.get("counts", {})}


def training_result(spec: StageSpec) -> dict[str, Any]:
    """The model's path and sha256, and the steps, checkpoint and metrics the run saved."""
    model = spec.output_dir / stage_paths.MODEL_FILE
    result_file = spec.output_dir / "train_result.json"
    saved = _read_json(result_file) if result_file.is_file() else {}
    return {
        "model_path": str(model),
        "model_sha256": file_digest(model),
        "steps": saved.get("steps"),
        "checkpoint": saved.get("checkpoint"),
        "metrics": saved.get("metrics", {}),
    }


def evaluate_result(spec: StageSpec) -> dict[str, Any]:
    """The report paths, the evaluated model and the headline metrics."""
    report = _read_json(spec.output_dir / "report.json")
    return {
        "report_path": str(spec.output_dir / "report.json"),
        "markdown_path": str(spec.output_dir / "report.md"),
        "model_path": spec.config.evaluate.model_path,
        "metrics": report.get("headline", {}),
    }


def export_result(spec: StageSpec) -> dict[str, Any]:
    """The model card's path and each exported file by format."""
    card = _read_json(spec.output_dir / "model_card.json")
    files = {entry["format"]: str(spec.output_dir / entry["path"]) for entry in card.get("files", [])}
    return {"card_path": str(spec.output_dir / "model_card.json"), "files": files}


RESULT_READERS: dict[str, Callable[[StageSpec], dict[str, Any]]] = {
    "prepare": prepare_result,
    "train": training_result,
    "distill": training_result,
    "evaluate": evaluate_result,
    "export": export_result,
}


def read_result(spec: StageSpec) -> dict[str, Any]:
    """The facts of a finished stage, read from its output files (by `dml` command)."""
    return RESULT_READERS[spec.command](spec)
