"""The training engine: DDP or DeepSpeed behind one small interface.

The loop calls, per micro-batch::

    with engine.accumulation_context():
        embeddings = engine.forward(images)
        loss = ...
        engine.backward(loss)
    if engine.step():        # True on an optimizer step (gradient-accumulation boundary)
        ...

and never branches on the backend. Only the backbone + neck live in the engine; heads
with per-rank shards stay outside (their gradients must not be averaged over ranks).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dml.config import DMLConfig, OptimizerConfig
from dml.distributed import describe_lone_process_as_group_of_one, get_rank, get_world_size
from dml.errors import ConfigError
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
    """SGD (momentum) or AdamW for the backbone + neck (param groups: `backbone_param_groups`)."""
    params = backbone_param_groups(model, config)
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class DDPEngine:
    """torch DDP (or the bare model when world size is 1) with accumulation, clipping, AMP."""

    name = "ddp"

    def __init__(self, model: nn.Module, config: DMLConfig, device: torch.device):
        self.model = model
        self.device = device
        self.wrapped: nn.Module = model
        if get_world_size() > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = build_optimizer(model, config.optimizer)
        self.accum = config.train.grad_accum
        self.clip = config.optimizer.grad_clip
        self.autocast_dtype = resolve_precision(config.train.precision, device)
        fp16 = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.micro_step = 0

    def accumulation_context(self):
        """Skip DDP's gradient all-reduce on micro-batches that do not end an accumulation."""
        boundary = (self.micro_step + 1) % self.accum == 0
        if boundary or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.wrapped(images)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.wrapped(images)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum  # accumulated gradients average over micro-batches
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> bool:
        self.micro_step += 1
        if self.micro_step % self.accum:
            return False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def train(self, mode: bool = True) -> None:
        self.wrapped.train(mode)

    def optimizer_state(self) -> dict[str, Any]:
        """Replicated on every rank under DDP, so rank 0's copy resumes any world size."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "micro_step": self.micro_step,
        }

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.micro_step = int(state.get("micro_step", 0))

    @property
    def per_rank_optimizer_state(self) -> bool:
        return False


class DeepSpeedEngine:
    """A DeepSpeed ZeRO-1/2 engine. Accumulation, clipping and loss scaling are DeepSpeed's,
    driven from our config (batch size, accumulation, clip and precision override the JSON)."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, config: DMLConfig, device: torch.device):
        import deepspeed

        path = Path(config.train.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config: file not found: {path}")
        ds_config = json.loads(path.read_text())
        dtype = resolve_precision(config.train.precision, device)
        batch = (config.data.pk_classes * config.data.pk_samples) if config.data.pk_classes else config.data.batch_size
        ds_config.update(
            {
                "train_micro_batch_size_per_gpu": batch,
                "gradient_accumulation_steps": config.train.grad_accum,
                "gradient_clipping": config.optimizer.grad_clip or 0.0,
                "bf16": {"enabled": dtype == torch.bfloat16},
                "fp16": {"enabled": dtype == torch.float16},
                "zero_allow_untested_optimizer": True,
            }
        )
        ds_config.pop("train_batch_size", None)
        optimizer = build_optimizer(model, config.optimizer)
        describe_lone_process_as_group_of_one()  # plain `dml train`: no MPI discovery
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine.module
        self.device = device

    def accumulation_context(self):
        return contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's ZeRO partition: resumable on the same world size only."""
        return {"optimizer": self.optimizer.state_dict(), "rank": get_rank(), "world_size": get_world_size()}

    def load_optimizer_state(self, states: list[dict[str, Any]]) -> None:
        """Every rank's partition (ZeRO's loader picks its own from the list)."""
        saved_world = states[0].get("world_size") if states else None
        if saved_world != get_world_size():
            log.warning(
                "DeepSpeed optimizer state was saved on %s ranks, now %d: ZeRO partitions "
                "are not re-sliced here; the backbone optimizer restarts from zero state",
                saved_world,
                get_world_size(),
            )
            return
        self.optimizer.load_state_dict([s["optimizer"] for s in states])

    @property
    def per_rank_optimizer_state(self) -> bool:
        return True


def build_engine(model: nn.Module, config: DMLConfig, device: torch.device) -> DDPEngine | DeepSpeedEngine:
    """The configured backend for ``model`` (already on ``device``)."""
    if config.train.backend == "deepspeed":
        return DeepSpeedEngine(model, config, device)
    return DDPEngine(model, config, device)
