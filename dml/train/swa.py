"""Stochastic weight averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima and
Better Generalization", 2018): an equal-weight running average of the model over the last
part of training, with BatchNorm statistics recomputed for the averaged weights at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from dml.config import SWAConfig

log = logging.getLogger(__name__)


class WeightAverager:
    """Averages ``model`` after every optimizer step from ``start_step`` on."""

    def __init__(self, model: nn.Module, config: SWAConfig, total_steps: int):
        self.config = config
        self.start_step = int(config.start_fraction * total_steps)
        self.averaged = AveragedModel(model, use_buffers=False)

    def update(self, model: nn.Module, step: int) -> None:
        """Fold ``model``'s weights into the average once ``step`` reaches ``start_step``."""
        if step >= self.start_step:
            self.averaged.update_parameters(model)

    @torch.no_grad()
    def finalize(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> nn.Module:
        """Recompute BN running statistics of the averaged model on a few training batches."""
        model = self.averaged.module
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bns and self.config.bn_update_batches:
            momenta = {bn: bn.momentum for bn in bns}
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the update batches
            model.train()
            for i, (images, _) in enumerate(batches):
                if i >= self.config.bn_update_batches:
                    break
                model(images.to(device))
            for bn, momentum in momenta.items():
                bn.momentum = momentum
        model.eval()
        log.info(
            "swa: averaged %d checkpoints of the weights from step %d", int(self.averaged.n_averaged), self.start_step
        )
        return model

    def state_dict(self) -> dict:
        """The averaged model's state (weights and the number averaged), for checkpoints."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the average from `state_dict`."""
        self.averaged.load_state_dict(state)
