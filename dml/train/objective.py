"""The training objective, built from parts shared by `dml train` and `dml distill`.

`LabelLoss` is the label term of both: a partial-FC margin head (with its row-sparse
optimizer) or a pair loss on the global batch. `Objective` (`dml train`) adds centre loss to
it; `dml.distill.objective.DistillObjective` adds the teacher terms. Everything here lives
OUTSIDE the DDP / DeepSpeed engine; each objective names its optimizers in ``optimizers``
and the `dml.train.optimizers.OptimizersContainer` steps them.

Gradient scale. The engine averages backbone gradients over ranks. A pair loss is computed
identically on every rank over the all-gathered batch; the gather's backward sums the ranks'
identical gradients (x world), and the engine's average divides that back, giving exactly
the gradient of the global loss. The partial-FC head instead splits the work: each rank's
shard contributes part of the gradient and the gather's backward already sums those into the
exact gradient, so the engine's average would leave 1/world of it. `undo_rank_average`
multiplies the gradient of the head's input (and of nothing else) by the world size; the
head's own gradients never pass through the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dml.config import DMLConfig
from dml.data.manifest import load_manifest
from dml.distributed import all_gather_rows, all_gather_with_grad, get_world_size
from dml.errors import ConfigError
from dml.losses import CenterLoss, dynamic_margins
from dml.losses.partial_fc import PartialFC, RowReader
from dml.losses.shard_state import RowShardedState
from dml.losses.sparse_optim import SparseRowOptimizer
from dml.registries import MARGINS, MINERS, PAIR_LOSSES

HEAD, CENTER = "head", "center"


def build_margin(config: DMLConfig) -> nn.Module:
    """The margin registered as ``loss.kind`` (`dml.registries.MARGINS`); ValueError if none is."""
    return MARGINS.build(config.loss.kind, settings=config)


def train_class_margins(config: DMLConfig, num_classes: int) -> torch.Tensor | None:
    """(num_classes,) per-class margins from the training split's class counts in the shard
    manifest (``loss.dynamic_margin``), or None when that is not set. Classes absent from
    the training split (never a target) get ``m_max`` and do not stretch the range.
    Raises ConfigError when the manifest has no such split."""
    settings = config.loss.dynamic_margin
    if settings is None:
        return None
    splits = load_manifest(config.data.shard_dir).get("splits", {})
    split = config.data.train_split
    if split not in splits or not splits[split].get("class_counts"):
        raise ConfigError(
            f"loss.dynamic_margin: the manifest in {config.data.shard_dir} has no class counts "
            f"for the training split '{split}'"
        )
    present = {int(label): int(count) for label, count in splits[split]["class_counts"].items()}
    labels = torch.tensor(sorted(present))
    if int(labels.max()) >= num_classes:
        raise ConfigError(f"loss.dynamic_margin: the manifest counts class {int(labels.max())} of {num_classes}")
    margins = torch.full((num_classes,), settings.m_max, dtype=torch.float32)
    margins[labels] = dynamic_margins([present[int(c)] for c in labels], settings.m_min, settings.m_max, settings.power)
    return margins


def build_margin_head(config: DMLConfig, embedding_dim: int, num_classes: int, device: torch.device) -> PartialFC:
    """The partial-FC head of ``config.loss`` (margin, sampling, sub-centres, dynamic margins)."""
    return PartialFC(
        embedding_dim,
        num_classes,
        build_margin(config),
        config.loss.sample_rate,
        seed=config.seed,
        sub_centers=config.loss.sub_centers,
        class_margins=train_class_margins(config, num_classes),
    ).to(device)


def build_pair_loss(config: DMLConfig) -> nn.Module:
    """The pair loss registered as ``loss.kind`` with the miner ``loss.miner`` (if not "none")."""
    miner = None if config.loss.miner == "none" else MINERS.build(config.loss.miner, settings=config)
    return PAIR_LOSSES.build(config.loss.kind, settings=config, miner=miner)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def undo_rank_average(embeddings: torch.Tensor) -> torch.Tensor:
    """``embeddings`` (N_local, D) unchanged, with their gradient multiplied by the world size
    (see the module docstring); the tensor itself when there is one process or no gradient."""
    world = get_world_size()
    if world == 1 or not embeddings.requires_grad:
        return embeddings
    return _ScaleGradient.apply(embeddings, float(world))


class LabelLoss(nn.Module):
    """``forward(embeddings (N_local, D), labels (N_local,)) -> scalar`` loss of the labels.

    A partial-FC margin head (`build_margin_head`: sharded over ranks, ``loss.sample_rate`` of
    it scored per step, with sub-centres and dynamic margins when configured) unless
    ``loss.kind`` is a pair loss, which is computed on the all-gathered global batch.

    Args:
        config: the run's config (``loss``, ``optimizer`` and ``seed`` are read).
        embedding_dim: D.
        num_classes: classes of the training data.
        device: where the head's shard lives.
        start_head: called with the new head before its optimizer is made, to set its
            centres (e.g. the teacher's).
        trainable: False freezes the head (no gradient, no optimizer).

    ``optimizers`` is ``{"head": row-sparse optimizer}`` for a trainable head, else empty.
    """

    def __init__(
        self,
        config: DMLConfig,
        embedding_dim: int,
        num_classes: int,
        device: torch.device,
        start_head: Callable[[PartialFC], None] | None = None,
        trainable: bool = True,
    ):
        super().__init__()
        self.head: PartialFC | None = None
        self.pair_loss: nn.Module | None = None
        self.head_optimizer: SparseRowOptimizer | None = None
        if config.loss.is_pair_loss:
            self.pair_loss = build_pair_loss(config)
            return
        self.head = build_margin_head(config, embedding_dim, num_classes, device)
        if start_head is not None:
            start_head(self.head)
        if not trainable:
            self.head.weight.requires_grad_(False)
            return
        self.head_optimizer = self.head.configure_optimizer(
            config.loss.head_optimizer,
            lr=config.loss.head_lr or config.optimizer.lr,
            momentum=config.optimizer.momentum,
            weight_decay=config.optimizer.weight_decay,
        )

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """``{"head": row-sparse optimizer}`` for a trainable head, else empty."""
        return {HEAD: self.head_optimizer} if self.head_optimizer is not None else {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the global batch, the same value on every rank."""
        if self.head is not None:
            return self.head(undo_rank_average(embeddings), labels)
        assert self.pair_loss is not None  # __init__ builds a head or a pair loss
        return self.pair_loss(all_gather_with_grad(embeddings), all_gather_rows(labels))

    def full_state(self) -> dict[str, Any] | None:
        """The head with its optimizer state, whole on rank 0 (None elsewhere, and for a pair
        loss); collective."""
        return self.head.full_state_dict(self.head_optimizer) if self.head is not None else None

    def load_full_state(self, state: dict[str, Any] | None) -> None:
        """Restore a `full_state` saved on any world size (None: keep the head as it is)."""
        if self.head is not None and state is not None:
            self.head.load_full_state_dict(state, self.head_optimizer)

    def head_shard_state(self) -> RowShardedState | None:
        """This rank's rows of the head and its optimizer state (None for a pair loss)."""
        return self.head.sharded_state_dict(self.head_optimizer) if self.head is not None else None

    def load_head_shard_state(self, meta: dict[str, Any], read_rows: RowReader) -> None:
        """Read this rank's rows of a `head_shard_state` saved on any world size."""
        if self.head is not None:
            self.head.load_sharded_state_dict(meta, read_rows, self.head_optimizer)


class Objective(nn.Module):
    """``forward(embeddings (N_local, D), labels) -> (loss, parts)``: `LabelLoss` plus centre
    loss (``loss.center_weight``); ``optimizers`` names the head's and the centres' optimizers."""

    def __init__(self, config: DMLConfig, num_classes: int, device: torch.device):
        super().__init__()
        dim = config.model.embedding_dim
        self.label = LabelLoss(config, dim, num_classes, device)
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(self.label.optimizers)
        self.center_weight = config.loss.center_weight
        self.center: CenterLoss | None = None
        if self.center_weight > 0:
            self.center = CenterLoss(num_classes, dim).to(device)
            self.optimizers[CENTER] = torch.optim.SGD(
                self.center.parameters(), lr=config.loss.head_lr or config.optimizer.lr
            )

    @property
    def head(self) -> PartialFC | None:
        """The partial-FC head of the label loss (None for a pair loss)."""
        return self.label.head

    @property
    def pair_loss(self) -> nn.Module | None:
        """The pair loss of the label loss (None for a partial-FC head)."""
        return self.label.pair_loss

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, **batch: Any
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch; ``batch`` (images, keys) is for objectives that need more."""
        parts: dict[str, float] = {}
        loss = self.label(embeddings.float(), labels)
        parts["main"] = float(loss.detach())
        if self.center is not None:
            center = self.center(embeddings.float(), labels)
            parts["center"] = float(center.detach())
            loss = loss + self.center_weight * center
        return loss, parts

    def full_state(self, include_head: bool = True) -> dict[str, Any]:
        """Head (full matrix and its optimizer, any world size; None without ``include_head``,
        for checkpoints that write its rows per rank) and centre-loss state; collective when
        the head is included."""
        return {
            "head": self.label.full_state() if include_head else None,
            "center": self.center.state_dict() if self.center is not None else None,
            "center_optimizer": self.optimizers[CENTER].state_dict() if self.center is not None else None,
        }

    def head_shard_state(self) -> RowShardedState | None:
        """This rank's rows of the head and its optimizer state (None for a pair loss)."""
        return self.label.head_shard_state()

    def load_head_shard_state(self, meta: dict[str, Any], read_rows: RowReader) -> None:
        """Read this rank's rows of a `head_shard_state` saved on any world size."""
        self.label.load_head_shard_state(meta, read_rows)

    def load_full_state(self, state: dict[str, Any]) -> None:
        """Restore a `full_state` saved on any world size."""
        self.label.load_full_state(state.get("head"))
        if self.center is not None and state.get("center") is not None:
            self.center.load_state_dict(state["center"])
            self.optimizers[CENTER].load_state_dict(state["center_optimizer"])
