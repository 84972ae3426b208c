"""The distillation objective: teacher-matching losses plus an optional label loss.

``loss = absolute_weight * absolute + relative_weight * relative
        + rkd_distance_weight * rkd_distance + rkd_angle_weight * rkd_angle + label_weight * label``

Built like `dml.train.objective.Objective` (same forward, named ``optimizers`` and
world-size independent state) and sharing its label term (`LabelLoss`: the head, its
optimizer and its gradient scale), so `dml distill` runs on the `dml train` loop.

Gradient scale under DDP (the engine averages backbone gradients over ranks):
- absolute: computed on each rank's own rows; the engine's average of the per-rank means is
  the gradient of the global mean.
- relative / RKD: computed identically on every rank over the all-gathered global batch
  (more pairs than one rank has); the gather's backward sums the ranks' identical gradients
  and the engine's average divides that back, i.e. the exact gradient of the global loss.
- label: as in `dml train` (`dml.train.objective.undo_rank_average` scales the gradient of
  the head's input only, not the other losses' gradients).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from dml.config import DMLConfig
from dml.distill.losses import absolute_teacher_loss, relative_teacher_loss, rkd_angle_loss, rkd_distance_loss
from dml.distributed import all_gather_rows, all_gather_with_grad
from dml.errors import DMLError
from dml.losses.partial_fc import PartialFC, RowReader
from dml.losses.shard_state import RowShardedState
from dml.train.checkpoint import HEAD_DIR, STATE, latest_checkpoint, sharded_head
from dml.train.objective import LabelLoss
from dml.train.row_shards import RowShardReader

log = logging.getLogger(__name__)
# Anchors per chunk of the RKD angle loss: bounds its O(B^3) memory to ~chunk x B^2 floats.
ANGLE_ANCHOR_CHUNK = 64


class TeacherEmbedder(Protocol):
    embedding_dim: int

    def embed(self, images: torch.Tensor | None, keys: list[str] | None) -> torch.Tensor:
        """(B, D_teacher) float32 teacher embeddings of a batch: its images (B, C, H, W) or its sample keys."""


def load_teacher_head(head: PartialFC, teacher_run: str, seed: int) -> None:
    """Start ``head`` from the class centres (C, D) of the teacher run's last checkpoint (its
    optimizer state and sampler position dropped; ``seed`` restarts the sampler). Each rank
    reads only its rows of a row-sharded checkpoint. ``teacher_run`` may also name the
    run's ``model.pt``. Raises `DMLError` for no checkpoint, no head, or another shape."""
    run_dir = Path(teacher_run)
    checkpoint = latest_checkpoint(run_dir.parent if run_dir.is_file() else run_dir)
    if checkpoint is None:
        raise DMLError(f"distill.init_head_from_teacher: no checkpoint in {teacher_run}")
    state = torch.load(checkpoint / STATE, map_location="cpu", weights_only=True, mmap=True)
    saved = state["objective"].get("head")
    if saved is None:
        raise DMLError(f"distill.init_head_from_teacher: {checkpoint} has no partial-FC head (pair-loss teacher?)")
    if (saved["num_classes"], saved["embedding_dim"]) != (head.num_classes, head.embedding_dim):
        raise DMLError(
            f"distill.init_head_from_teacher: the teacher head is {saved['num_classes']} classes x "
            f"{saved['embedding_dim']} dims, the student needs {head.num_classes} x {head.embedding_dim}"
        )
    fresh = {"optimizer": None, "sampler": {"seed": seed, "step": 0}}
    if sharded_head(state) is not None:
        head.load_sharded_state_dict({**saved, **fresh}, RowShardReader(checkpoint / HEAD_DIR, saved["index"]).read)
    else:
        head.load_full_state_dict({**saved, **fresh})


class DistillObjective(nn.Module):
    """``forward(embeddings (N_local, D_t), labels, images=..., keys=...) -> (loss, parts)``.

    ``teacher`` gives the teacher embeddings of a batch (on the fly or from the cache). The
    label loss is `LabelLoss` (a partial-FC margin head or the configured pair loss) on the
    student's embeddings; with ``init_head_from_teacher`` its centres start as the teacher's
    and with ``freeze_head`` they get no optimizer. Raises `DMLError` when the teacher's head
    cannot initialise this one, and ValueError while ``distill.student.embedding_dim`` is unset.
    """

    def __init__(self, config: DMLConfig, num_classes: int, device: torch.device, teacher: TeacherEmbedder):
        super().__init__()
        self.cfg = config.distill
        self.teacher = teacher
        if config.distill.student.embedding_dim is None:
            raise ValueError("set distill.student.embedding_dim (to the teacher's) before building the objective")
        self.embedding_dim: int = config.distill.student.embedding_dim
        self.label: LabelLoss | None = None
        if self.cfg.label_weight > 0:
            self.label = self._build_label_loss(config, num_classes, device)
        elif self.cfg.init_head_from_teacher or self.cfg.freeze_head:
            log.info("distill: label_weight is 0, so init_head_from_teacher / freeze_head have no effect")
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(self.label.optimizers) if self.label else {}

    def _build_label_loss(self, config: DMLConfig, num_classes: int, device: torch.device) -> LabelLoss:
        start_head: Callable[[PartialFC], None] | None = None
        if self.cfg.init_head_from_teacher:
            if config.loss.is_pair_loss:
                raise DMLError(f"distill.init_head_from_teacher needs a margin head, loss.kind is '{config.loss.kind}'")
            start_head = functools.partial(load_teacher_head, teacher_run=self.cfg.teacher, seed=config.seed)
        return LabelLoss(
            config, self.embedding_dim, num_classes, device, start_head=start_head, trainable=not self.cfg.freeze_head
        )

    @property
    def head(self) -> PartialFC | None:
        """The partial-FC head of the label loss (None for a pair loss or without a label loss)."""
        return self.label.head if self.label is not None else None

    @property
    def pair_loss(self) -> nn.Module | None:
        """The pair loss of the label loss (None for a partial-FC head or without a label loss)."""
        return self.label.pair_loss if self.label is not None else None

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        images: torch.Tensor | None = None,
        keys: list[str] | None = None,
        **batch: Any,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of the enabled losses of one micro-batch; ``parts`` holds each term
        (unweighted) and ``main`` (the weighted total).

        Raises DMLError when every loss weight is 0.
        """
        cfg = self.cfg
        student = embeddings.float()
        teacher = self.teacher.embed(images, keys).to(student.device)
        terms: list[tuple[str, float, torch.Tensor]] = []
        if cfg.absolute_weight > 0:
            terms.append(("absolute", cfg.absolute_weight, absolute_teacher_loss(student, teacher, cfg.absolute_kind)))
        if cfg.relative_weight > 0 or cfg.rkd_distance_weight > 0 or cfg.rkd_angle_weight > 0:
            global_student, global_teacher = all_gather_with_grad(student), all_gather_rows(teacher)
            for name, weight, fn in (
                ("relative", cfg.relative_weight, relative_teacher_loss),
                ("rkd_distance", cfg.rkd_distance_weight, rkd_distance_loss),
                ("rkd_angle", cfg.rkd_angle_weight, self._angle),
            ):
                if weight > 0:
                    terms.append((name, weight, fn(global_student, global_teacher)))
        if self.label is not None:  # built when label_weight > 0
            terms.append(("label", cfg.label_weight, self.label(student, labels)))
        if not terms:
            raise DMLError(
                "distill: every loss weight is 0; set absolute_weight, relative_weight, "
                "rkd_distance_weight, rkd_angle_weight or label_weight"
            )
        loss = cast(torch.Tensor, sum(weight * value for _, weight, value in terms))  # terms is not empty
        parts = {name: float(value.detach()) for name, _, value in terms}
        parts["main"] = float(loss.detach())
        return loss, parts

    @staticmethod
    def _angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_angle_loss(student, teacher, anchor_chunk=ANGLE_ANCHOR_CHUNK)

    def full_state(self, include_head: bool = True) -> dict[str, Any]:
        """The label head's full matrix and optimizer (any world size) or None (also without
        ``include_head``, for checkpoints that write its rows per rank); collective when the
        head is included."""
        return {"head": self.label.full_state() if self.label is not None and include_head else None}

    def load_full_state(self, state: dict[str, Any]) -> None:
        """Restore a `full_state` saved on any world size."""
        if self.label is not None:
            self.label.load_full_state(state.get("head"))

    def head_shard_state(self) -> RowShardedState | None:
        """This rank's rows of the label head and its optimizer state (None without a head)."""
        return self.label.head_shard_state() if self.label is not None else None

    def load_head_shard_state(self, meta: dict[str, Any], read_rows: RowReader) -> None:
        """Read this rank's rows of a `head_shard_state` saved on any world size."""
        if self.label is not None:
            self.label.load_head_shard_state(meta, read_rows)
