"""The `distill` stage: one function for `dml distill`, `torchrun -m dml.cli distill` and Prefect.

It trains ``distill.student`` on the `dml train` trainer (same loop, engine, checkpoints,
resume, evaluation), with `DistillObjective` in place of the label objective. Outputs in
``distill.run_dir``: as for `dml train`, and ``model.pt`` loads with
`dml.models.model_file.load_final_model`; it also records the teacher (path, sha256).

The student's width. The student is trained at the teacher's embedding dim: its embedding
neck (pooling + linear projection) is the projection to the teacher's space, so the absolute
loss compares like with like, the teacher's class centres can initialise the label head,
and student and teacher embeddings can even be mixed in one index. When
``distill.student.embedding_dim`` is not set it is taken from the teacher; set to another
value it is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dml.config import DMLConfig
from dml.data.manifest import manifest_digest
from dml.distill.objective import DistillObjective
from dml.distill.teacher import OnTheFlyTeacher, TeacherRecord, describe_teacher
from dml.distill.teacher_cache import CachedTeacher, ensure_teacher_cache
from dml.distributed import launched_rank
from dml.errors import ConfigError
from dml.models.model_file import build_model, read_model_file
from dml.train.run import TrainingSpec, TrainResult, run_training

log = logging.getLogger(__name__)
STUDENT_SECTION = "distill.student"


def student_config(config: DMLConfig, teacher: TeacherRecord) -> DMLConfig:
    """``config`` with ``distill.student.embedding_dim`` set to the teacher's (see module doc).

    Raises ConfigError when the student's embedding_dim or the data channels differ from the teacher's.
    """
    student = config.distill.student
    if student.embedding_dim is not None and student.embedding_dim != teacher.embedding_dim:
        raise ConfigError(
            f"distill.student.embedding_dim is {student.embedding_dim} but the teacher embeds in "
            f"{teacher.embedding_dim} dims: the student is trained in the teacher's space; "
            "remove the key or set it to the teacher's"
        )
    if teacher.data.channels != config.data.channels:
        raise ConfigError(
            f"data.channels is {config.data.channels} but the teacher was trained on "
            f"{teacher.data.channels}-channel images"
        )
    data = config.model_dump(mode="json")
    data["distill"]["student"]["embedding_dim"] = teacher.embedding_dim
    return DMLConfig.model_validate(data)


def build_student(config: DMLConfig) -> torch.nn.Module:
    """The student embedding model: ``distill.student`` on ``data``'s input contract."""
    return build_model(model=config.distill.student, data=config.data)


def distill_spec(config: DMLConfig, teacher: TeacherRecord) -> TrainingSpec:
    """What `run_training` needs for a distillation run."""
    cached = config.distill.teacher_embeddings == "cached"

    def build_objective(cfg: DMLConfig, num_classes: int, device: torch.device) -> DistillObjective:
        # Inside the process group: building the cache is collective.
        source: CachedTeacher | OnTheFlyTeacher
        if cached:
            source = CachedTeacher(ensure_teacher_cache(teacher, cfg.data, device), device)
        else:
            source = OnTheFlyTeacher(teacher, cfg.data, device)
        return DistillObjective(cfg, num_classes, device, source)

    return TrainingSpec(
        run_dir=config.distill.run_dir,
        build_model=build_student,
        build_objective=build_objective,
        with_keys=cached,
        model_section=STUDENT_SECTION,
    )


def record_teacher(model_path: Path, provenance: dict[str, Any]) -> None:
    """Add ``teacher`` (path, sha256, ...) to a saved ``model.pt`` payload (atomic rewrite)."""
    payload = read_model_file(model_path)
    payload["teacher"] = provenance
    tmp = model_path.with_name(model_path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(model_path)


def run_distill(config: DMLConfig, resume: bool = False) -> TrainResult:
    """Distil ``distill.teacher`` into ``distill.student`` on this process's share of the job.

    Returns the `TrainResult` of the student run (``model_path`` = the student's model.pt).
    """
    teacher = describe_teacher(config.distill.teacher)
    config = student_config(config, teacher)
    if config.distill.init_head_from_teacher and teacher.data_digest != manifest_digest(config.data.shard_dir):
        log.warning(
            "distill: the teacher was trained on other shards (manifest %s..., these %s...): its class "
            "centres initialise the head only if both list the classes in the same order",
            teacher.data_digest[:12],
            manifest_digest(config.data.shard_dir)[:12],
        )
    if config.distill.rkd_angle_weight > 0:
        log.info("distill: the RKD angle loss costs O(B^3) memory in the global batch B; it is chunked over anchors")
    result = run_training(config, resume, distill_spec(config, teacher))
    if launched_rank() == 0:  # run_training has left the process group
        record_teacher(Path(result.model_path), teacher.provenance())
        log.info(
            "distill: student %s (teacher %s, sha256 %s)", result.model_path, teacher.model_path, teacher.sha256[:16]
        )
    return result
