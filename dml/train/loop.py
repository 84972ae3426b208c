"""The training loop: one code path for every backend, world size and objective."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dml.config import DMLConfig
from dml.data.loader import TrainLoader
from dml.distributed import all_reduce_, get_rank, get_world_size
from dml.errors import DMLError
from dml.progress import progress as progress_bar
from dml.train.checkpoint import save_checkpoint, set_aside_diverged
from dml.train.engine import Engine
from dml.train.metrics_log import MetricsLog, peak_memory_mb
from dml.train.objective import Objective
from dml.train.optimizers import OptimizersContainer
from dml.train.param_groups import freeze_backbone
from dml.train.schedules import LRSchedulersContainer
from dml.train.swa import WeightAverager

log = logging.getLogger(__name__)


class NonFiniteLoss(DMLError):
    """The loss became NaN or inf on some rank; the run stops on every rank together."""


@dataclass
class TrainState:
    """Where the run is: epoch, batches done in it, optimizer steps, images seen, and the
    samples consumed in this epoch on all ranks (the position that survives a change of
    world size; ``batch_in_epoch`` is in batches of the current world size)."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    images_seen: int = 0
    samples_in_epoch: int = 0


def moved_position(saved_state: dict[str, Any], saved_world: int, loader: TrainLoader) -> TrainState:
    """A saved `TrainState` (as a dict) continued by ``loader`` (this world size and batch).

    The in-epoch position is the samples consumed in the epoch (``samples_in_epoch``; for
    checkpoints without it, batches x ``saved_world`` x batch), rounded up to whole batches of
    this world size and capped at the epoch's end (`TrainLoader.batches_done`), so the
    epoch never yields more samples than it holds and a position past the new epoch's length
    ends that epoch. On the saved world size it is the saved position.
    """
    state = TrainState(**{k: v for k, v in saved_state.items() if k in TrainState.__dataclass_fields__})
    if "samples_in_epoch" not in saved_state:
        state.samples_in_epoch = state.batch_in_epoch * saved_world * loader.batch_size
    state.batch_in_epoch = loader.batches_done(state.samples_in_epoch)
    return state


def remaining_batches(state: TrainState, loader: TrainLoader, epochs: int) -> int:
    """Micro-batches from ``state`` to the end of epoch ``epochs - 1`` on ``loader``'s world size."""
    per_epoch = loader.batches_per_epoch
    return max(0, per_epoch - state.batch_in_epoch) + per_epoch * max(0, epochs - state.epoch - 1)


def _any_rank(flag: bool, device: torch.device) -> bool:
    if get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class Trainer:
    """Runs epochs of micro-batches, optimizer steps, logging, checkpoints and evaluation."""

    def __init__(
        self,
        config: DMLConfig,
        run_dir: Path,
        device: torch.device,
        engine: Engine,
        objective: Objective,
        loader: TrainLoader,
        evaluate=None,
        data_identity: dict[str, Any] | None = None,
        best=None,
    ):
        self.config, self.run_dir, self.device = config, run_dir, device
        self.data_identity = data_identity  # recorded in checkpoints; resume refuses other data
        self.engine, self.objective, self.loader = engine, objective, loader
        self.evaluate, self.best = evaluate, best  # best: a BestModelKeeper or None
        self.total_steps = self._total_steps()
        self.optimizers = OptimizersContainer(engine, objective.optimizers, config.train.grad_accum)
        self.schedule = LRSchedulersContainer(self.optimizers.optimizers, self.total_steps, config.schedule)
        self.freeze = freeze_backbone(engine, config.optimizer)
        self.swa = WeightAverager(engine.model, config.swa, self.total_steps) if config.swa.enabled else None
        self.metrics = MetricsLog(
            run_dir, get_rank() == 0, config, "train" if Path(config.train.run_dir) == Path(run_dir) else "distill"
        )
        self.global_batch = loader.batch_size * get_world_size()
        self.step_lr = 0.0  # set by each optimizer step before the schedule moves on

    def _total_steps(self) -> int:
        per_epoch = self.loader.batches_per_epoch // self.config.train.grad_accum
        total = max(1, per_epoch * self.config.train.epochs)
        return min(total, self.config.train.max_steps) if self.config.train.max_steps else total

    # --- checkpoints ---------------------------------------------------------------------
    def payload(self, state: TrainState) -> dict[str, Any]:
        """What rank 0 puts in ``state.pt`` beside the objective and RNG states: model weights,
        schedule and accumulation position, ``state``, SWA, the config and the data identity."""
        return {
            "model": self.engine.model.state_dict(),
            "schedule": self.schedule.state_dict(),
            "optimizers": self.optimizers.state_dict(),
            "train_state": asdict(state),
            "swa": self.swa.state_dict() if self.swa else None,
            "config": self.config.model_dump(mode="json"),
            "data_identity": self.data_identity,
        }

    def restore(self, saved: dict[str, Any]) -> TrainState:
        """Load a checkpoint's `payload` (engine and objective states are restored by
        `dml.train.checkpoint.restore_checkpoint`); returns the position to continue from,
        moved onto this world size (`resume_position`). Raises KeyError or RuntimeError (torch's)
        for a payload without, or with mismatched, model weights."""
        self.engine.model.load_state_dict(saved["model"])
        state = self.resume_position(saved)
        self.metrics.rewind(int(saved["train_state"]["step"]))
        self.schedule.load_state_dict(saved["schedule"])
        # Checkpoints before the optimizers container kept the window position in the DDP engine's state.
        self.optimizers.load_state_dict(saved.get("optimizers") or saved.get("engine") or {})
        if self.freeze:
            self.freeze.steps_done = state.step
        if self.swa and saved.get("swa"):
            self.swa.load_state_dict(saved["swa"])
        return state

    def resume_position(self, saved: dict[str, Any]) -> TrainState:
        """The saved position moved onto this run's world size (`moved_position`). When the
        global batch changed, the run's length is recounted from the samples still to come
        (`remaining_batches`), so it ends after the configured epochs whatever the number of
        processes; the schedule and SWA follow that length."""
        saved_world = int(saved.get("world_size", get_world_size()))
        state = moved_position(saved["train_state"], saved_world, self.loader)
        if saved_world == get_world_size() and state.batch_in_epoch == saved["train_state"]["batch_in_epoch"]:
            return state
        cfg = self.config.train
        total = state.step + remaining_batches(state, self.loader, cfg.epochs) // cfg.grad_accum
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.schedule.total_steps = self.total_steps
        if self.swa:
            self.swa.start_step = int(self.config.swa.start_fraction * self.total_steps)
        log.info(
            "resume: %d samples of epoch %d done on %d process(es) -> batch %d of %d on %d; run ends at step %d",
            state.samples_in_epoch,
            state.epoch,
            saved_world,
            state.batch_in_epoch,
            self.loader.batches_per_epoch,
            get_world_size(),
            self.total_steps,
        )
        return state

    def checkpoint(self, state: TrainState) -> Path:
        """Write the checkpoint of ``state.step`` (collective); returns its folder. Raises
        `dml.train.checkpoint.NonFiniteState` or `dml.train.checkpoint.CheckpointError` (see
        `dml.train.checkpoint.save_checkpoint`)."""
        return save_checkpoint(
            self.run_dir, state.step, self.payload(state), self.objective, self.engine, self.config.train.keep_last
        )

    def skipped_samples(self) -> dict[str, int]:
        """``{"skipped_samples": n}``: bad samples all ranks' loaders dropped so far (collective;
        only under ``data.bad_samples=skip``, else empty)."""
        if self.config.data.bad_samples != "skip":
            return {}
        count = torch.tensor([self.loader.skipped], dtype=torch.long, device=self.device)
        return {"skipped_samples": int(all_reduce_(count).item())}

    # --- one micro-batch -----------------------------------------------------------------
    def micro_step(self, batch: tuple, state: TrainState) -> dict[str, float] | None:
        """Forward and backward one micro-batch ``(images (N, C, H, W), labels (N,)[, keys])``
        and advance ``state``; at the end of an accumulation window every optimizer, the
        schedule and SWA step. Returns the loss parts when the window ended, else None.

        Raises NonFiniteLoss on every rank when the loss is NaN or inf on any rank (the last
        checkpoint is set aside first).
        """
        images, labels, *rest = batch
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
        with self.optimizers.accumulation_context():
            embeddings = self.engine.forward(images)
            loss, parts = self.objective(embeddings, labels, images=images, keys=rest[0] if rest else None)
            if _any_rank(not torch.isfinite(loss).all().item(), self.device):
                raise NonFiniteLoss(
                    f"non-finite loss at step {state.step + 1} (epoch {state.epoch}, batch "
                    f"{state.batch_in_epoch}); {set_aside_diverged(self.run_dir, state.step)}"
                )
            self.optimizers.backward(loss)
        state.batch_in_epoch += 1
        state.images_seen += self.global_batch
        state.samples_in_epoch += self.global_batch
        if not self.optimizers.step():
            return None
        self.step_lr = self.schedule.current_lr()  # the rate this step used; logged with its step
        self.schedule.step()
        state.step += 1
        if self.swa:
            self.swa.update(self.engine.model, state.step)
        return parts

    # --- the run ------------------------------------------------------------------------
    def fit(self, state: TrainState) -> TrainState:
        """Train from ``state`` until ``train.epochs`` or the run's step count, logging every
        ``train.log_every`` steps, checkpointing every ``train.checkpoint_every`` and evaluating
        every ``train.eval_every``; returns the final state. Raises NonFiniteLoss (`micro_step`)
        and the checkpoint errors of `checkpoint`."""
        cfg = self.config.train
        self.engine.train(True)
        progress = progress_bar(
            total=self.total_steps, initial=state.step, desc="train", unit="step", show=get_rank() == 0
        )
        window_start, window_images = time.perf_counter(), 0
        while state.epoch < cfg.epochs and state.step < self.total_steps:
            self.loader.set_epoch(state.epoch, state.batch_in_epoch)
            for batch in self.loader:
                parts = self.micro_step(batch, state)
                window_images += self.global_batch
                if parts is None:
                    continue
                progress.update(1)
                if state.step % cfg.log_every == 0 or state.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    self.metrics.write(
                        {
                            "step": state.step,
                            "epoch": state.epoch,
                            **{f"loss_{k}": v for k, v in parts.items()},
                            "lr": self.step_lr,
                            "images_per_s": window_images / elapsed,
                            **self.skipped_samples(),
                            **peak_memory_mb(),
                        }
                    )
                    progress.set_postfix(loss=f"{parts['main']:.3f}", refresh=False)
                    window_start, window_images = time.perf_counter(), 0
                if state.step % cfg.checkpoint_every == 0:
                    self.checkpoint(state)
                if cfg.eval_every and state.step % cfg.eval_every == 0 and self.evaluate:
                    evaluated = self.evaluate(self.engine.model)
                    self.metrics.write({"step": state.step, **evaluated})
                    if self.best:
                        self.best.update(evaluated, state.step, self.engine.model)
                    self.engine.train(True)
                if state.step >= self.total_steps:
                    break
            else:
                state.epoch, state.batch_in_epoch, state.samples_in_epoch = state.epoch + 1, 0, 0
                continue
            break
        progress.close()
        return state
