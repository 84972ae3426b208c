"""Learning-rate schedules stepped once per optimizer step (never per micro-batch).

One schedule drives every optimizer of a run (backbone and head) by scaling each param
group's base LR, so warm-up and decay stay in lockstep across them.

On resume the restored optimizer states carry the hyperparameters they were saved with
(base LR, momentum, weight decay); `LRSchedule.load_state_dict` puts back the ones of the
current config, so that an LR or schedule changed at resume is the one that is used.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dml.config import ScheduleConfig


def lr_factor(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based) of ``total_steps``."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr_ratio
    if config.kind == "constant":
        return 1.0
    if config.kind == "cyclic":
        # Triangular cyclical LR (Smith 2017): floor -> 1 -> floor every cycle_steps.
        position = ((step - config.warmup_steps) % config.cycle_steps) / config.cycle_steps
        return floor + (1.0 - floor) * (1.0 - abs(2.0 * position - 1.0))
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.kind == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress) ** config.power  # poly


class LRSchedule:
    """Sets ``lr = base_lr * lr_factor(step)`` on all param groups of all given optimizers."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], total_steps: int, config: ScheduleConfig):
        self.optimizers = optimizers
        self.total_steps = total_steps
        self.config = config
        self.step_count = 0
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group.setdefault("base_lr", group["lr"])
        # The config's settings per group (all but the parameters and the scheduled lr).
        self._configured = [
            [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]
            for optimizer in optimizers
        ]
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.step_count, self.total_steps, self.config)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def current_lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved step, with the current config's base LRs and hyperparameters
        (call it after the optimizers' states were restored)."""
        self.step_count = int(state["step_count"])
        for optimizer, configured in zip(self.optimizers, self._configured, strict=False):
            for group, settings in zip(optimizer.param_groups, configured, strict=False):
                group.update(settings)
        self._apply()
