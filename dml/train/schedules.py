"""Learning-rate schedules stepped once per optimizer step (never per micro-batch).

`lr_factor` is the multiplier of every param group's initial LR at a step (warm-up, then
constant, cyclic, cosine or poly decay). `LRSchedulersContainer` drives every optimizer of a
run with one `torch.optim.lr_scheduler.LambdaLR` each over that factor, so warm-up and decay
stay in lockstep across the backbone, the head and the centres.

On resume the restored optimizer states carry the hyperparameters they were saved with
(initial LR, momentum, weight decay); `LRSchedulersContainer.load_state_dict` puts back the
ones of the current config, so that an LR or schedule changed at resume is the one used.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

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


class ScheduleFactor:
    """`lr_factor` as LambdaLR's ``lr_lambda``, with a run length that a resume may change."""

    def __init__(self, total_steps: int, config: ScheduleConfig):
        self.total_steps, self.config = total_steps, config

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.config)


class LRSchedulersContainer:
    """One LambdaLR per optimizer, all on the same `ScheduleFactor`, stepped together.

    Args:
        optimizers: name -> torch optimizer (e.g. `OptimizersContainer.optimizers`); the
            first one's first param group is the LR that `current_lr` reports.
        total_steps: optimizer steps in the run (decay reaches ``min_lr_ratio`` there).
        config: the schedule section.

    Each param group's LR at construction is its initial LR (``initial_lr``); the LR at step
    ``n`` is ``initial_lr * lr_factor(n)``.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], total_steps: int, config: ScheduleConfig):
        self.optimizers = dict(optimizers)
        self.factor = ScheduleFactor(total_steps, config)
        # The config's settings per group (all but the parameters and the scheduled lr).
        self._configured = {
            name: [
                {**{k: v for k, v in group.items() if k not in ("params", "lr")}, "initial_lr": group["lr"]}
                for group in optimizer.param_groups
            ]
            for name, optimizer in self.optimizers.items()
        }
        self.schedulers = {name: LambdaLR(optimizer, self.factor) for name, optimizer in self.optimizers.items()}

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the run: decay reaches ``min_lr_ratio`` there."""
        return self.factor.total_steps

    @total_steps.setter
    def total_steps(self, steps: int) -> None:
        """A new run length (resume on another world size); takes effect at the next step."""
        self.factor.total_steps = steps

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far."""
        return next(iter(self.schedulers.values())).last_epoch

    def step(self) -> None:
        """After every optimizer stepped: move every LR to the next step's."""
        for scheduler in self.schedulers.values():
            scheduler.step()

    def current_lr(self) -> float:
        """LR of the first optimizer's first param group (the backbone's)."""
        return float(next(iter(self.schedulers.values())).get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        """``{"step_count", "total_steps"}``: optimizer steps taken and the run's length."""
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved step with the current config's initial LRs and hyperparameters
        (call it after the optimizers' states were restored: they carry the saved ones). The
        saved ``total_steps`` is not taken: the run's length is the current config's."""
        step = int(state["step_count"])
        for name, optimizer in self.optimizers.items():
            for group, settings in zip(optimizer.param_groups, self._configured[name], strict=False):
                group.pop("base_lr", None)  # written by checkpoints before LambdaLR
                group.update(settings)
            # last_epoch = step - 1: LambdaLR's first step moves it to ``step`` and sets the lr.
            self.schedulers[name] = LambdaLR(optimizer, self.factor, last_epoch=step - 1)
