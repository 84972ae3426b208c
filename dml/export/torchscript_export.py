"""TorchScript export by tracing (``torch.jit.script`` cannot compile the timm backbones).

Tracing records the operations one example run executes: Python control flow that depends on
the data is frozen to the branch the example took. The parity check on real images is what
catches a model for which that matters.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from dml.export.pixel_input import chunks


def export_torchscript(model: nn.Module, path: str | os.PathLike, example: torch.Tensor) -> None:
    """Trace ``model`` (eval mode, CPU) on ``example`` and save the TorchScript module to ``path``.

    ``check_trace`` is off: the export is verified afterwards by the parity check on real
    images, loaded back from the saved file.
    """
    with torch.no_grad(), warnings.catch_warnings():
        # torch marks torch.jit deprecated (FutureWarning); it is still the portable C++/Python format.
        warnings.simplefilter("ignore", category=FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, os.fspath(path))


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a saved TorchScript module on CPU in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        module = torch.jit.load(os.fspath(path), map_location="cpu")
    return module.eval()


def torch_embeddings(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Run a PyTorch or TorchScript module over ``inputs`` in batches -> embeddings (N, D) float32."""
    with torch.no_grad():
        outputs = [model(chunk).float().numpy() for chunk in chunks(inputs, batch_size)]
    return np.concatenate(outputs)
