"""The teacher of a distillation run: what it is (path, hash, width, input contract) and
how it embeds a training batch on the fly.

The teacher is a finished `dml train` run folder (or its ``model.pt``). It is identified by
the sha256 of ``model.pt``, which keys the embedding cache and is recorded in the student's
``model.pt``. It never joins the DDP / DeepSpeed engine: eval mode, no gradients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dml.config import DataConfig, ModelConfig
from dml.errors import DMLError
from dml.files import sha256_file
from dml.models.model_file import find_model_file, load_final_model, read_model_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherRecord:
    """A trained teacher: ``model.pt`` path and sha256, its model and data config sections."""

    run_dir: Path
    model_path: Path
    sha256: str
    model: ModelConfig
    data: DataConfig
    data_digest: str

    @property
    def embedding_dim(self) -> int:
        """The teacher model's embedding size D_teacher."""
        return self.model.embedding_dim

    def provenance(self) -> dict[str, Any]:
        """What the student's ``model.pt`` records about its teacher."""
        return {
            "path": str(self.model_path),
            "sha256": self.sha256,
            "backbone": self.model.backbone,
            "embedding_dim": self.embedding_dim,
            "data_digest": self.data_digest,
        }


def describe_teacher(teacher: str | Path) -> TeacherRecord:
    """Read a teacher run folder (or ``model.pt``) without building the model.

    Raises `DMLError` with a one-line reason when there is no dml model file there.
    """
    try:
        model_path = find_model_file(teacher)
        payload = read_model_file(model_path, mmap=True)
    except DMLError as exc:
        raise DMLError(f"distill.teacher: {exc}") from None
    return TeacherRecord(
        run_dir=model_path.parent,
        model_path=model_path.resolve(),
        sha256=sha256_file(model_path),
        model=ModelConfig.model_validate(payload["model"]),
        data=DataConfig.model_validate(payload["data"]),
        data_digest=str(payload.get("data_digest")),
    )


def _per_channel(values: tuple[float, ...], channels: int) -> torch.Tensor:
    values = tuple(values) * channels if len(values) == 1 else tuple(values)
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


class TeacherInput:
    """Turn a batch normalised for the student into what the teacher was trained on.

    ``x_teacher = x_student * std_s / std_t + (mean_s - mean_t) / std_t`` per channel, then a
    bilinear resize when the teacher's image size differs. Identity when both match.
    """

    def __init__(self, student: DataConfig, teacher: DataConfig):
        if student.channels != teacher.channels:
            raise ValueError(
                f"the teacher was trained on {teacher.channels}-channel images, data.channels is {student.channels}"
            )
        c = student.channels
        std_s, std_t = _per_channel(student.std, c), _per_channel(teacher.std, c)
        mean_s, mean_t = _per_channel(student.mean, c), _per_channel(teacher.mean, c)
        self.scale = std_s / std_t
        self.shift = (mean_s - mean_t) / std_t
        self.identity = bool(torch.all(self.scale == 1) and torch.all(self.shift == 0))
        self.size = None if teacher.image_size == student.image_size else teacher.image_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.identity:
            images = images * self.scale.to(images.device) + self.shift.to(images.device)
        if self.size is not None:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return images


class OnTheFlyTeacher:
    """Embeds each training batch (the same augmented images the student sees) with the
    teacher in eval mode under ``no_grad``. Costs one teacher forward per student step."""

    def __init__(self, record: TeacherRecord, student_data: DataConfig, device: torch.device):
        self.model, _ = load_final_model(record.model_path, device)
        self.model.requires_grad_(False)
        self.adapt = TeacherInput(student_data, record.data)
        self.embedding_dim = record.embedding_dim

    @torch.no_grad()
    def embed(self, images: torch.Tensor | None, keys: list[str] | None = None) -> torch.Tensor:
        """(B, C, H, W) student-normalised images -> (B, D_teacher) float32 unit embeddings.

        Raises ValueError when the batch has no images (the teacher runs on them).
        """
        if images is None:
            raise ValueError("the on-the-fly teacher needs the batch's images")
        self.model.eval()
        return self.model(self.adapt(images)).float()
