"""The training objective: partial-FC margin head or a pair loss on the global batch,
plus centre loss as an add-on. Everything here lives OUTSIDE the DDP / DeepSpeed engine.

Gradient scale. The engine averages backbone gradients over ranks. A pair loss is computed
identically on every rank over the all-gathered batch; the gather's backward sums the ranks'
identical gradients (x world), and the engine's average divides that back, giving exactly
the gradient of the global loss. The partial-FC head instead splits the work: each rank's
shard contributes part of the gradient and the gather's backward already sums those into the
exact gradient, so the engine's average would leave 1/world of it; a hook multiplies the
embedding gradient by the world size to undo that (the head's own gradients never pass
through the engine).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dml.config import DMLConfig
from dml.data.manifest import load_manifest
from dml.distributed import all_gather_rows, all_gather_with_grad, get_world_size
from dml.errors import ConfigError
from dml.losses import CenterLoss, dynamic_margins
from dml.losses.partial_fc import PartialFC
from dml.registries import MARGINS, MINERS, PAIR_LOSSES


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


class ExtraOptimizers:
    """Steps the optimizers an objective owns beside the engine's (head rows, centres)."""

    optimizers: list[torch.optim.Optimizer]

    def zero_grad_extras(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step_extras(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


class Objective(ExtraOptimizers, nn.Module):
    """``forward(embeddings (N_local, D), labels) -> (loss, parts)``; owns the head and the
    extra optimizers (partial-FC rows, centre-loss centres) that step with the backbone's."""

    def __init__(self, config: DMLConfig, num_classes: int, device: torch.device):
        super().__init__()
        self.world_size = get_world_size()
        dim = config.model.embedding_dim
        head_lr = config.loss.head_lr or config.optimizer.lr
        self.optimizers: list[torch.optim.Optimizer] = []
        self.head: PartialFC | None = None
        self.pair_loss: nn.Module | None = None
        if config.loss.is_pair_loss:
            self.pair_loss = build_pair_loss(config)
        else:
            self.head = build_margin_head(config, dim, num_classes, device)
            self.optimizers.append(
                self.head.configure_optimizer(
                    config.loss.head_optimizer,
                    lr=head_lr,
                    momentum=config.optimizer.momentum,
                    weight_decay=config.optimizer.weight_decay,
                )
            )
        self.center_weight = config.loss.center_weight
        self.center: CenterLoss | None = None
        if self.center_weight > 0:
            self.center = CenterLoss(num_classes, dim).to(device)
            self.optimizers.append(torch.optim.SGD(self.center.parameters(), lr=head_lr))

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, **batch: Any
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch; ``batch`` (images, keys) is for objectives that need more."""
        parts: dict[str, float] = {}
        if self.head is not None:
            if self.world_size > 1 and embeddings.requires_grad:
                embeddings.register_hook(lambda grad: grad * self.world_size)
            loss = self.head(embeddings.float(), labels)
        else:
            global_embeddings = all_gather_with_grad(embeddings.float())
            global_labels = all_gather_rows(labels)
            assert self.pair_loss is not None  # __init__ builds a head or a pair loss
            loss = self.pair_loss(global_embeddings, global_labels)
        parts["main"] = float(loss.detach())
        if self.center is not None:
            center = self.center(embeddings.float(), labels)
            parts["center"] = float(center.detach())
            loss = loss + self.center_weight * center
        return loss, parts

    def full_state(self, include_head: bool = True) -> dict[str, Any]:
        """Head (full matrix, any world size; None without ``include_head``, for checkpoints that
        write its rows per rank) and centre-loss state; collective when the head is included."""
        return {
            "head": self.head.full_state_dict() if include_head and self.head is not None else None,
            "center": self.center.state_dict() if self.center is not None else None,
            "center_optimizer": self.optimizers[-1].state_dict() if self.center is not None else None,
        }

    def load_full_state(self, state: dict[str, Any]) -> None:
        if self.head is not None and state.get("head") is not None:
            self.head.load_full_state_dict(state["head"])
        if self.center is not None and state.get("center") is not None:
            self.center.load_state_dict(state["center"])
            self.optimizers[-1].load_state_dict(state["center_optimizer"])
