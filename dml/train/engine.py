"""The training engine: DDP or DeepSpeed behind one `Engine` protocol.

An engine runs the backbone + neck (forward, backward with gradient averaging over ranks)
and applies one backbone optimizer step when told to. It does not count micro-batches: the
`dml.train.optimizers.OptimizersContainer` decides where an accumulation window ends and
steps every optimizer of the run (the engine's among them). Heads with per-rank shards stay
outside the engine (their gradients must not be averaged over ranks).

Checkpoints see one interface for both backends: `Engine.state_dict` is what this rank must
save (None when another rank's copy covers it) and `Engine.load_state_dict` takes the saved
parts in rank order.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager as ContextManager
from typing import Any, Protocol

import pydantic
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dml.config import DMLConfig, OptimizerConfig
from dml.distributed import describe_lone_process_as_group_of_one, get_rank, get_world_size
from dml.errors import ConfigError
from dml.train.deepspeed_json import DROPPED_SECTIONS, check_deepspeed_config, read_deepspeed_config
from dml.train.param_groups import backbone_param_groups

log = logging.getLogger(__name__)


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``requested`` on ``device``; None means plain fp32.

    ``auto`` picks bf16 on GPUs that support it, else fp16, and fp32 on CPU (bf16 matmul is
    hundreds of times slower than fp32 on these CPUs). Untested on GPU here.
    """
    if device.type != "cuda":
        if requested in ("bf16", "fp16"):
            log.info("precision %s requested on CPU: using fp32 (CPU half-precision matmul is slow)", requested)
        return None
    if requested == "fp32":
        return None
    if requested == "fp16" or (requested == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW for the backbone + neck (param groups: `backbone_param_groups`).

    Raises ConfigError when ``optimizer.layer_decay`` is asked of a model whose backbone does
    not number its layers.
    """
    params = backbone_param_groups(model, config)
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class Engine(Protocol):
    """What the loop, the optimizers container and checkpoints need of a backend."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer  # the torch optimizer of the backbone (schedules set its lr)
    state_holds_objects: bool  # state_dict() holds more than tensors and plain values (unpickled on load)

    def accumulation_context(self, boundary: bool) -> ContextManager:
        """Context for one micro-batch's forward + backward; ``boundary``: it ends a window."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) of ``images`` (N, C, H, W)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (already divided by the window length)."""

    def step(self) -> None:
        """One backbone optimizer step on the accumulated gradients (clipping, loss scaling)."""

    def zero_grad(self) -> None:
        """Drop the backbone's accumulated gradients."""

    def train(self, mode: bool = True) -> None:
        """Training (True) or evaluation (False) mode of the wrapped model."""

    def state_dict(self) -> dict[str, Any] | None:
        """This rank's part of the engine state to checkpoint; None when another rank's covers it."""

    def load_state_dict(self, parts: list[dict[str, Any]]) -> None:
        """Restore from the parts `state_dict` returned when saving, in rank order."""


class DDPEngine:
    """torch DDP (or the bare model when world size is 1) with clipping and AMP."""

    name = "ddp"
    state_holds_objects = False

    def __init__(self, model: nn.Module, config: DMLConfig, device: torch.device):
        self.model = model
        self.device = device
        self.wrapped: nn.Module = model
        if get_world_size() > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = build_optimizer(model, config.optimizer)
        self.clip = config.optimizer.grad_clip
        self.autocast_dtype = resolve_precision(config.train.precision, device)
        fp16 = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def accumulation_context(self, boundary: bool) -> ContextManager:
        """Skip DDP's gradient all-reduce on micro-batches that do not end a window."""
        if boundary or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) of ``images`` (N, C, H, W), under autocast when the precision asks."""
        if self.autocast_dtype is None:
            return self.wrapped(images)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.wrapped(images)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of the scalar ``loss`` (scaled first under fp16)."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        """One backbone optimizer step: unscale (fp16), clip to ``optimizer.grad_clip`` (L2 norm
        over the backbone + neck), step (skipped by the scaler on inf/NaN gradients)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def zero_grad(self) -> None:
        """Drop the backbone's gradients (set to None)."""
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        """Training (True) or evaluation (False) mode of the model."""
        self.wrapped.train(mode)

    def state_dict(self) -> dict[str, Any] | None:
        """Replicated on every rank under DDP: rank 0 saves it, and it resumes any world size."""
        if get_rank() != 0:
            return None
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, parts: list[dict[str, Any]]) -> None:
        """Rank 0's saved part (the only one) is every rank's state."""
        if not parts:
            return
        state = parts[0]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def deepspeed_refusal(exc: pydantic.ValidationError) -> str:
    """DeepSpeed's validation error as one clause per wrong key: its section model, the key,
    the problem and the value given (pydantic prints several lines and a help URL each)."""
    clauses = []
    for error in exc.errors():
        key = ".".join([exc.title, *map(str, error["loc"])])
        clauses.append(f"{key}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(clauses)


def dml_deepspeed_settings(config: DMLConfig, batch: int, dtype: torch.dtype | None) -> dict[str, tuple[Any, str]]:
    """The DeepSpeed keys dml sets itself: key -> (the value dml uses, the dml config key deciding it).
    ``batch`` is the per-rank micro-batch, ``dtype`` the autocast dtype (None: fp32)."""
    return {
        "train_micro_batch_size_per_gpu": (batch, "data.batch_size (data.pk_classes x data.pk_samples)"),
        "train_batch_size": (
            batch * config.train.grad_accum * get_world_size(),
            "data.batch_size x grad_accum x ranks",
        ),
        "gradient_accumulation_steps": (config.train.grad_accum, "train.grad_accum"),
        "gradient_clipping": (config.optimizer.grad_clip or 0.0, "optimizer.grad_clip"),
        "bf16": (dtype == torch.bfloat16, "train.precision"),
        "fp16": (dtype == torch.float16, "train.precision"),
    }


class DeepSpeedEngine:
    """A DeepSpeed ZeRO-1/2 engine. Clipping and loss scaling are DeepSpeed's, driven from our
    config (batch size, clip and precision override the JSON). The accumulation window is ours
    (``managed_gradient_accumulation: false``): DeepSpeed reduces and steps when `step` is called."""

    name = "deepspeed"
    state_holds_objects = True  # ZeRO's state dict holds DeepSpeed objects (loss scaler, enums)

    def __init__(self, model: nn.Module, config: DMLConfig, device: torch.device):
        import deepspeed

        ds_config = read_deepspeed_config(config.train.deepspeed_config)
        dtype = resolve_precision(config.train.precision, device)
        batch = (config.data.pk_classes * config.data.pk_samples) if config.data.pk_classes else config.data.batch_size
        overrides = dml_deepspeed_settings(config, batch, dtype)
        if get_rank() == 0:
            check_deepspeed_config(ds_config, config.train.deepspeed_config, overrides)
        for key in ("train_batch_size", *DROPPED_SECTIONS):
            ds_config.pop(key, None)
        ds_config.update(
            {
                "train_micro_batch_size_per_gpu": batch,
                "gradient_accumulation_steps": config.train.grad_accum,
                "managed_gradient_accumulation": False,
                "gradient_clipping": config.optimizer.grad_clip or 0.0,
                "bf16": {"enabled": dtype == torch.bfloat16},
                "fp16": {"enabled": dtype == torch.float16},
                "zero_allow_untested_optimizer": True,
            }
        )
        self.optimizer = build_optimizer(model, config.optimizer)
        describe_lone_process_as_group_of_one()  # plain `dml train`: no MPI discovery
        try:
            self.engine, self.zero_optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=self.optimizer, config=ds_config
            )
        except pydantic.ValidationError as exc:  # DeepSpeed checks its JSON with pydantic models
            raise ConfigError(
                f"train.deepspeed_config: DeepSpeed refuses {config.train.deepspeed_config}: {deepspeed_refusal(exc)}"
            ) from None
        self.model = self.engine.module
        self.device = device

    def accumulation_context(self, boundary: bool) -> ContextManager:
        """A no-op context: DeepSpeed reduces gradients in `step`, never in backward."""
        return contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) of ``images`` (N, C, H, W) through the DeepSpeed engine."""
        return self.engine(images)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` as given (the container already divided it by
        the window length, so DeepSpeed does not divide again)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        """Reduce the window's gradients, clip and step (DeepSpeed's), then zero them."""
        self.engine.step()

    def zero_grad(self) -> None:
        """Nothing to do: DeepSpeed's `step` zeroes the gradients it applied."""

    def train(self, mode: bool = True) -> None:
        """Training (True) or evaluation (False) mode of the model."""
        self.engine.train(mode)

    def state_dict(self) -> dict[str, Any] | None:
        """This rank's ZeRO partition: resumable on the same world size only."""
        return {"optimizer": self.zero_optimizer.state_dict(), "rank": get_rank(), "world_size": get_world_size()}

    def load_state_dict(self, parts: list[dict[str, Any]]) -> None:
        """Every rank's partition (ZeRO's loader picks its own from the list)."""
        saved_world = parts[0].get("world_size") if parts else None
        if saved_world != get_world_size():
            log.warning(
                "DeepSpeed optimizer state was saved on %s ranks, now %d: ZeRO partitions "
                "are not re-sliced here; the backbone optimizer restarts from zero state",
                saved_world,
                get_world_size(),
            )
            return
        self.zero_optimizer.load_state_dict([part["optimizer"] for part in parts])


def build_engine(model: nn.Module, config: DMLConfig, device: torch.device) -> Engine:
    """The configured backend for ``model`` (already on ``device``).

    Raises ConfigError when ``train.deepspeed_config`` is not a file (DeepSpeed backend) or
    ``optimizer.layer_decay`` cannot be applied (`build_optimizer`).
    """
    if config.train.backend == "deepspeed":
        return DeepSpeedEngine(model, config, device)
    return DDPEngine(model, config, device)
