"""Every optimizer of a run behind one object, and the one count of gradient accumulation.

A run has several optimizers: the backbone's (inside the `Engine`, DDP or DeepSpeed) and the
objective's own (the partial-FC head's row-sparse optimizer, the centre-loss centres). The
`OptimizersContainer` owns the accumulation window of ``grad_accum`` micro-batches: it tells
the engine whether a micro-batch ends the window (DDP skips its all-reduce otherwise), divides
each micro-batch's loss by the window length, and at the end of the window steps and then
zeroes every optimizer once. Schedules (`dml.train.schedules.LRSchedulersContainer`) drive
the same optimizers, named by `OptimizersContainer.optimizers`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch

from dml.train.engine import Engine

BACKBONE = "backbone"


class OptimizersContainer:
    """Steps and zeroes the engine's optimizer and ``extra`` ones together, once per window.

    Args:
        engine: the backbone's engine; its `Engine.step` is the backbone optimizer's step.
        extra: name -> optimizer of parameters outside the engine (e.g. ``head``, ``center``).
        grad_accum: micro-batches per optimizer step (>= 1).

    Per micro-batch the loop calls::

        with container.accumulation_context():
            loss = ...
            container.backward(loss)
        if container.step():   # True when the window ended and every optimizer stepped
            ...

    Raises ValueError for ``grad_accum < 1`` or an extra optimizer named ``backbone``.
    """

    def __init__(self, engine: Engine, extra: dict[str, torch.optim.Optimizer], grad_accum: int):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if BACKBONE in extra:
            raise ValueError(f"'{BACKBONE}' names the engine's optimizer; give the extra one another name")
        self.engine = engine
        self.extra = dict(extra)
        self.grad_accum = grad_accum
        self.micro_step = 0  # micro-batches since the run started (this process)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Name -> torch optimizer, the backbone's first (what a schedule drives)."""
        return {BACKBONE: self.engine.optimizer, **self.extra}

    def ends_window(self) -> bool:
        """Whether the next micro-batch is the last of its accumulation window."""
        return (self.micro_step + 1) % self.grad_accum == 0

    def accumulation_context(self) -> ContextManager:
        """The engine's context for the next micro-batch's forward and backward."""
        return self.engine.accumulation_context(self.ends_window())

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss / grad_accum``: the window's gradient is the mean over its micro-batches."""
        self.engine.backward(loss / self.grad_accum)

    def step(self) -> bool:
        """Count one micro-batch; at the end of a window step every optimizer once, then zero
        every gradient. Returns True when it stepped."""
        self.micro_step += 1
        if self.micro_step % self.grad_accum:
            return False
        self.engine.step()
        for optimizer in self.extra.values():
            optimizer.step()
        self.zero_grad()
        return True

    def zero_grad(self) -> None:
        """Drop the accumulated gradients of every optimizer's parameters."""
        self.engine.zero_grad()
        for optimizer in self.extra.values():
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """The position in the accumulation window (optimizer states are saved by their owners)."""
        return {"micro_step": self.micro_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a saved window position (`state_dict`; 0 when it has none)."""
        self.micro_step = int(state.get("micro_step", 0))
