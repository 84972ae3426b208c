"""Softmax cross-entropy over logits whose columns (classes) are split across ranks.

Each rank holds ``logits (N, k_r)`` for the same N rows and its own k_r columns; the full
``(N, sum k_r)`` matrix never exists anywhere. Per row, three all-reduces give the global
maximum, the global sum of exponentials and the target logit, which is enough for the exact
loss ``log sum_j exp(z_j) - z_target`` and for its gradient ``softmax - onehot`` restricted to
the local columns (torch.distributed collectives are not autograd-aware, so the backward is
written out by hand here).
"""

from __future__ import annotations

import torch

from dml.distributed import ProcessGroup, all_reduce_


class _DistributedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.input_dtype = logits.dtype
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the exponent sums need more range than half precision
        rows = logits.shape[0]
        # The max is only a shift for stability: the loss and its gradient do not depend on it.
        row_max = all_reduce_(logits.detach().amax(dim=1), "max", group)
        probs = (logits - row_max.unsqueeze(1)).exp_()
        sum_exp = all_reduce_(probs.sum(dim=1), "sum", group)
        owned = (targets >= 0).nonzero().squeeze(1)
        target_logit = logits.new_zeros(rows)
        target_logit[owned] = logits[owned, targets[owned]] - row_max[owned]
        all_reduce_(target_logit, "sum", group)  # exactly one rank contributes per row
        loss = (sum_exp.log() - target_logit).mean()
        probs.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(probs, owned, targets)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError(
                "distributed softmax cross-entropy reuses its buffers: "
                "backward through it twice (retain_graph) is not supported"
            )
        ctx.consumed = True
        probs, owned, targets = ctx.saved_tensors
        grad = probs  # reused in place: saves one (N, k) buffer
        grad[owned, targets[owned]] -= 1.0
        grad.mul_(grad_loss / probs.shape[0])
        return grad.to(ctx.input_dtype), None, None


def distributed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Mean softmax cross-entropy over rows whose classes are split over the ranks of ``group``.

    ``logits`` (N, k_local): this rank's columns for the N rows every rank shares.
    ``targets`` (N,): the local column of each row's class, or -1 if another rank holds it;
    each row's class must be held by exactly one rank. Returns the same scalar on every rank.
    Gradient flows to ``logits`` only. Memory: one extra (N, k_local) buffer (the softmax),
    reused for the gradient. In a world of 1 this is ordinary cross-entropy.

    Raises ValueError for logits not (N, k) with k >= 1 or targets not (N,).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, k) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.shape[1] == 0:
        raise ValueError("every rank needs at least one class column")
    return _DistributedSoftmaxCE.apply(logits, targets, group)
