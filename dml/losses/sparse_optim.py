"""Row-sparse optimizers for the partial-FC class-centre shard.

Design. `PartialFC` (with ``sample_rate < 1``) scores only the rows it sampled, and its
backward leaves the shard's gradient as a sparse COO tensor of those ``k`` rows (never a
``(shard, D)`` one). These optimizers are `torch.optim.Optimizer` subclasses over one 2-D
parameter (so LR schedulers, ``state_dict`` and ``param_groups`` work as usual) that know
nothing of the head: `step` reads the rows from the sparse gradient, gathers those rows of
the parameter and of every per-row state tensor, applies the update to the gathered copies
and scatters them back. Rows absent from the gradient, and their state (momentum buffer,
Adam moments, step count) are never touched, weight decay included; the work per step is
proportional to ``k x D``, and the gathered copies are made `STEP_CHUNK_BYTES` of rows at a
time, so their memory does not grow with ``k``. A dense gradient (``sample_rate = 1``, or
eval mode) updates every row in place; it then matches `torch.optim.SGD` /
`torch.optim.AdamW` up to rounding. Sparse gradients of several backwards before one `step`
add up (their rows are merged).

AdamW keeps a step count per row (``row_step``) because each row's bias correction
(Loshchilov & Hutter, "Decoupled Weight Decay Regularization"; Kingma & Ba, "Adam") must
count only the steps in which that row was updated.

Not supported: ``closure``-based re-evaluation that changes the sample, and amsgrad.
"""

from __future__ import annotations

from typing import Any

import torch

STEP_CHUNK_BYTES = 32 * 1024 * 1024  # sampled rows are updated this many bytes of centres at a time


class SparseRowOptimizer(torch.optim.Optimizer):
    """Base class: one 2-D parameter (e.g. a head's shard), updated only on the rows its
    gradient holds (all rows for a dense gradient)."""

    name = "base"

    def __init__(self, param: torch.nn.Parameter, defaults: dict[str, Any]):
        if defaults["lr"] < 0:
            raise ValueError(f"learning rate must be >= 0, got {defaults['lr']}")
        if defaults["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {defaults['weight_decay']}")
        if param.dim() != 2:
            raise ValueError(f"a row-sparse optimizer takes one 2-D parameter, got shape {tuple(param.shape)}")
        super().__init__([param], defaults)

    # --- per-row state -------------------------------------------------------------------
    def row_state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of each per-row state tensor (first dim = shard rows)."""
        raise NotImplementedError

    @property
    def param(self) -> torch.nn.Parameter:
        """The (rows, D) parameter this optimizer updates (e.g. a head's shard of centres)."""
        return self.param_groups[0]["params"][0]

    def row_state(self) -> dict[str, torch.Tensor]:
        """The per-row state tensors (created as zeros on first use), each ``(shard_rows, ...)``."""
        state = self.state[self.param]
        for key, (shape, dtype) in self.row_state_shapes().items():
            if key not in state:
                state[key] = torch.zeros(shape, dtype=dtype, device=self.param.device)
        return state

    def reset_state(self) -> None:
        """Forget all per-row state (as for a freshly created optimizer)."""
        self.state.clear()

    def hyperparameters(self) -> dict[str, Any]:
        """The param group's settings other than the parameters themselves."""
        return {k: v for k, v in self.param_groups[0].items() if k != "params"}

    def load_row_state(self, saved: dict[str, Any]) -> None:
        """Install ``{"name", "hyperparameters", "state": {key: rows}}`` for this shard's rows.

        Raises ValueError for another optimizer's state or state tensors of the wrong keys or shape.
        """
        if saved.get("name") != self.name:
            raise ValueError(f"saved head optimizer is {saved.get('name')!r}, this one is {self.name!r}")
        self.param_groups[0].update(saved["hyperparameters"])
        self.reset_state()
        state = self.row_state()
        expected = self.row_state_shapes()
        if set(saved["state"]) != set(expected):
            raise ValueError(f"saved optimizer state has {sorted(saved['state'])}, expected {sorted(expected)}")
        for key, rows in saved["state"].items():
            if tuple(rows.shape) != tuple(state[key].shape):
                raise ValueError(
                    f"optimizer state {key!r} has shape {tuple(rows.shape)}, expected {tuple(state[key].shape)}"
                )
            state[key].copy_(rows)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As `torch.optim.Optimizer.load_state_dict`, keeping each state tensor's own dtype."""
        super().load_state_dict(state_dict)
        state = self.state[self.param]
        for key, (_, dtype) in self.row_state_shapes().items():
            if key in state:
                state[key] = state[key].to(dtype)

    # --- stepping ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Update the rows the parameter's gradient holds: a sparse gradient's rows, or all
        rows for a dense one; nothing without a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group, param = self.param_groups[0], self.param
        grad = param.grad
        if grad is None:
            return loss
        index = None
        if grad.is_sparse:
            grad = grad.coalesce()  # sorted, unique rows; duplicates (accumulated backwards) summed
            index, grad = grad.indices()[0], grad.values()
        state = self.row_state()
        keys = list(self.row_state_shapes())
        if index is None:  # every row: update in place, no copies
            self._update_rows(param.data, grad, {k: state[k] for k in keys}, group)
            return loss
        step_rows = max(1, STEP_CHUNK_BYTES // max(1, param[0].numel() * param.element_size()))
        for first in range(0, index.numel(), step_rows):  # row-wise updates: chunks change no bit
            part = index[first : first + step_rows]
            rows = param.data.index_select(0, part)
            state_rows = {k: state[k].index_select(0, part) for k in keys}
            self._update_rows(rows, grad[first : first + step_rows].to(rows.dtype), state_rows, group)
            param.data.index_copy_(0, part, rows)
            for key in keys:
                state[key].index_copy_(0, part, state_rows[key])
        return loss

    def _update_rows(
        self, rows: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]
    ) -> None:
        """Update ``rows`` and the matching ``state`` rows in place from ``grad``."""
        raise NotImplementedError


class SparseRowSGD(SparseRowOptimizer):
    """SGD with momentum and L2 weight decay, as `torch.optim.SGD` (dampening 0), on sampled rows."""

    name = "sgd"

    def __init__(
        self,
        param: torch.nn.Parameter,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        super().__init__(param, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))

    def row_state_shapes(self):
        """Per-row state: ``momentum_buffer`` (shard_size, D), none without momentum."""
        if self.param_groups[0]["momentum"] == 0:
            return {}
        return {"momentum_buffer": (tuple(self.param.shape), self.param.dtype)}

    def _update_rows(self, rows, grad, state, group):
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        if momentum and not group["nesterov"]:
            # buf = momentum * buf + grad + wd * w, accumulated in place: no (k, D) temporary.
            # A never-updated row has buf = 0, which reproduces torch's first-step buf = d.
            buf = state["momentum_buffer"].mul_(momentum).add_(grad)
            if weight_decay:
                buf.add_(rows, alpha=weight_decay)
            rows.add_(buf, alpha=-group["lr"])
            return
        direction = grad.add(rows, alpha=weight_decay) if weight_decay else grad
        if momentum:  # nesterov
            buf = state["momentum_buffer"].mul_(momentum).add_(direction)
            direction = direction.add(buf, alpha=momentum)
        rows.add_(direction, alpha=-group["lr"])


class SparseRowAdamW(SparseRowOptimizer):
    """AdamW (decoupled weight decay) with a step count per row, on sampled rows."""

    name = "adamw"

    def __init__(
        self,
        param: torch.nn.Parameter,
        lr: float,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(param, dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps))

    def row_state_shapes(self):
        """Per-row state: ``exp_avg`` and ``exp_avg_sq`` (shard_size, D), ``row_step`` (shard_size,)."""
        shape, dtype = tuple(self.param.shape), self.param.dtype
        # float32 counts are exact up to 2**24 updates of one row.
        return {"exp_avg": (shape, dtype), "exp_avg_sq": (shape, dtype), "row_step": (shape[:1], torch.float32)}

    def _update_rows(self, rows, grad, state, group):
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        exp_avg, exp_avg_sq, row_step = state["exp_avg"], state["exp_avg_sq"], state["row_step"]
        row_step.add_(1)
        rows.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps = row_step.to(torch.float64)
        step_size = (lr / (1 - torch.pow(beta1, steps))).to(rows.dtype).unsqueeze(1)
        bias_correction2_sqrt = (1 - torch.pow(beta2, steps)).sqrt().to(rows.dtype).unsqueeze(1)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        rows.sub_(exp_avg * step_size / denom)


def build_sparse_optimizer(
    param: torch.nn.Parameter, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4, **kwargs: Any
) -> SparseRowOptimizer:
    """``name`` "sgd" (uses ``momentum``) or "adamw" (``momentum`` is beta1 unless ``betas`` given).

    Raises ValueError for any other ``name``.
    """
    key = name.lower()
    if key == "sgd":
        return SparseRowSGD(param, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)
    if key == "adamw":
        kwargs.setdefault("betas", (momentum, 0.999))
        return SparseRowAdamW(param, lr=lr, weight_decay=weight_decay, **kwargs)
    raise ValueError(f"unknown head optimizer {name!r}: expected 'sgd' or 'adamw'")
