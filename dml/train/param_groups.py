"""Fine-tuning settings of the backbone optimizer: layer-wise LR decay and a frozen warm-up.

Layer-wise learning-rate decay (LLRD; Clark et al., ELECTRA, 2020; Bao et al., BEiT, 2021):
the backbone's layers, numbered from the input by timm's ``group_matcher``, get
``lr * layer_decay ** (L + 1 - layer)``; the neck (and the head, outside this optimizer) get
the full ``lr``. The groups come from timm's ``param_groups_layer_decay``, which, as in those
recipes, also exempts 1-D parameters (biases, norms) and the model's ``no_weight_decay()``
names (position embeddings, class token) from weight decay.

Frozen-backbone warm-up: for the first ``freeze_backbone_steps`` optimizer steps the
backbone's gradients are dropped just before the optimizer steps, so its weights and its
optimizer state (momentum, Adam moments, weight decay) stay exactly as they were, while
the neck and the head train. The backbone's backward still runs (DDP needs every
parameter's gradient); gradient clipping measures the norm before the drop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from dml.config import OptimizerConfig
from dml.errors import ConfigError

log = logging.getLogger(__name__)


def _backbone(model: nn.Module) -> nn.Module | None:
    inner = getattr(model, "module", model)  # DDP
    return getattr(inner, "backbone", None)


def backbone_param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict[str, Any]]:
    """Param groups for the backbone + neck optimizer, each with its ``lr`` (and with LLRD
    its ``weight_decay``); trainable parameters only.

    Without ``config.layer_decay`` (None or 1) one group holds every parameter. Raises
    ConfigError when LLRD is asked of a model without a timm backbone that numbers its layers.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.layer_decay is None or config.layer_decay == 1.0:
        return [{"params": params, "lr": config.lr}]
    backbone = _backbone(model)
    if backbone is None or not hasattr(backbone, "group_matcher"):
        raise ConfigError("optimizer.layer_decay needs a timm backbone with layer groups (group_matcher)")
    no_decay: set[str] = getattr(backbone, "no_weight_decay", lambda: set())()
    groups = param_groups_layer_decay(
        backbone, weight_decay=config.weight_decay, layer_decay=config.layer_decay, no_weight_decay_list=no_decay
    )
    trainable = {id(p) for p in params}
    out = []
    for group in groups:
        kept = [p for p in group["params"] if id(p) in trainable]
        if kept:
            out.append({"params": kept, "lr": config.lr * group["lr_scale"], "weight_decay": group["weight_decay"]})
    in_backbone = {id(p) for p in backbone.parameters()}
    rest = [p for p in params if id(p) not in in_backbone]
    if rest:
        out.append({"params": rest, "lr": config.lr})
    return out


class BackboneFreeze:
    """Drops the backbone's gradients before each of the first ``steps`` optimizer steps.

    Hooks ``optimizer`` (a torch optimizer over the backbone among others); ``steps_done``
    counts its steps and is what a resumed run sets to the restored step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, backbone: nn.Module, steps: int):
        self.steps, self.steps_done = steps, 0
        self.params = [p for p in backbone.parameters() if p.requires_grad]
        self._handles = [
            optimizer.register_step_pre_hook(self._drop_gradients),
            optimizer.register_step_post_hook(self._count),
        ]

    @property
    def frozen(self) -> bool:
        """True while fewer than ``steps`` optimizer steps have run (the backbone's gradients are dropped)."""
        return self.steps_done < self.steps

    def _drop_gradients(self, optimizer, args, kwargs) -> None:
        if self.frozen:
            for param in self.params:
                param.grad = None  # torch optimizers skip parameters without a gradient

    def _count(self, optimizer, args, kwargs) -> None:
        self.steps_done += 1
        if self.steps_done == self.steps:
            log.info("backbone unfrozen after %d optimizer steps", self.steps)


def freeze_backbone(engine: Any, config: OptimizerConfig) -> BackboneFreeze | None:
    """A `BackboneFreeze` for ``engine``'s optimizer when ``config.freeze_backbone_steps`` > 0.

    Raises ConfigError on the DeepSpeed backend (ZeRO keeps gradients in its own buffers)
    or for a model without a ``backbone``.
    """
    if not config.freeze_backbone_steps:
        return None
    if getattr(engine, "name", "") == "deepspeed":
        raise ConfigError("optimizer.freeze_backbone_steps is not supported with train.backend deepspeed")
    backbone = _backbone(engine.model)
    if backbone is None:
        raise ConfigError("optimizer.freeze_backbone_steps needs a model with a backbone")
    return BackboneFreeze(engine.optimizer, backbone, config.freeze_backbone_steps)
