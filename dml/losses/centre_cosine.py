"""Cosine of unit embeddings with raw class centres, with a hand-written backward.

Used by `dml.losses.partial_fc.PartialFC`, where the centre matrix is large enough that the
temporaries of autograd through a row normalisation matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _CentreCosine(torch.autograd.Function):
    """Cosine of unit embeddings (N, D) with raw centres (k, D), without normalised centres.

    cos = (x @ W^T) * r with r_j = 1 / ||w_j||. Written out by hand because autograd through
    the norm costs several (k, D) temporaries; here backward needs one:
    dL/dx = (G * r) @ W and dL/dw_j = ((G * r)^T x)_j - (sum_i G_ij cos_ij) r_j^2 w_j.
    Saved for backward: x, W (no copies), r and the (N, k) output.
    """

    @staticmethod
    def forward(ctx, unit: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        inv_norm = torch.linalg.vector_norm(centres, dim=1).clamp_min_(1e-12).reciprocal_()
        cosine = (unit @ centres.t()).mul_(inv_norm)
        ctx.save_for_backward(unit, centres, inv_norm, cosine)
        return cosine

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        unit, centres, inv_norm, cosine = ctx.saved_tensors
        scaled = grad * inv_norm
        grad_unit = scaled @ centres if ctx.needs_input_grad[0] else None
        grad_centres = None
        if ctx.needs_input_grad[1]:
            grad_centres = scaled.t() @ unit
            coef = (grad * cosine).sum(dim=0).mul_(inv_norm.square()).neg_()
            grad_centres.addcmul_(centres, coef.unsqueeze(1))
        return grad_unit, grad_centres


def centre_cosine(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (N, k) of embeddings (N, D) with centres (k, D), rows L2-normalised."""
    return _CentreCosine.apply(F.normalize(embeddings, dim=1), centres)
