"""The `train` stage: one function for `dml train`, `torchrun -m dml.cli train` and Prefect.

Outputs in ``train.run_dir``: ``config.yaml`` (resolved), ``metrics.jsonl``,
``checkpoints/step-*/`` (resumable) and ``model.pt`` (the final weights with what is needed to
rebuild the model), plus ``train_result.json``.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml.config import DMLConfig, save_config
from dml.data.loader import TrainLoader
from dml.data.manifest import load_manifest
from dml.data.workers import sigterm_as_interrupt
from dml.distributed import barrier, cleanup, get_rank, init_distributed
from dml.errors import DMLError
from dml.eval.embed import extract_embeddings
from dml.eval.metrics import retrieval_metrics
from dml.eval.verification_sets import make_verification_evaluator
from dml.files import write_json_atomic
from dml.models.model_file import build_model, model_file_in, save_final_model
from dml.train.best import BestModelKeeper
from dml.train.checkpoint import latest_checkpoint, list_checkpoints, restore_checkpoint
from dml.train.engine import build_engine
from dml.train.loop import Trainer, TrainState
from dml.train.objective import Objective
from dml.train.resume import check_config, check_data, data_identity, find_resume_point
from dml.train.run_lock import hold_run_dir

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished training run produced."""

    run_dir: str
    model_path: str
    checkpoint: str
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's (modulo 2**32) and torch's generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_evaluator(config: DMLConfig, device: torch.device):
    """Periodic retrieval evaluation: every rank embeds its part, every rank computes the
    metrics on the gathered embeddings (no rank idles at a barrier while another works)."""
    manifest = load_manifest(config.data.shard_dir)
    split = config.train.eval_split
    if split not in manifest["splits"]:
        log.info("periodic evaluation off: split '%s' not in the shards", split)
        return None
    gallery_split = config.train.eval_gallery_split

    listed = sum(int(manifest["splits"][s]["count"]) for s in (split, gallery_split) if s in manifest["splits"])

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        query = extract_embeddings(model, config.data, split, device)
        embedded = len(query.keys)
        if gallery_split:
            gallery = extract_embeddings(model, config.data, gallery_split, device)
            embedded += len(gallery.keys)
            metrics = retrieval_metrics(query.vectors, query.labels, gallery.vectors, gallery.labels)
        else:
            metrics = retrieval_metrics(query.vectors, query.labels)
        skipped = {"eval_skipped_samples": listed - embedded} if embedded < listed else {}  # bad samples skipped
        return {**{f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, **skipped}

    return evaluate


def combine_evaluators(*evaluators):
    """One evaluator calling each non-None one in turn and merging their metrics; None if none."""
    active = [e for e in evaluators if e is not None]
    if not active:
        return None

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        merged: dict[str, float] = {}
        for one in active:
            merged.update(one(model))
        return merged

    return evaluate


def make_best_keeper(config: DMLConfig, run_dir: Path, spec: TrainingSpec, digest: str) -> BestModelKeeper | None:
    """A keeper of ``<run_dir>/best/model.pt`` by ``train.best_metric`` (None when unset);
    ``digest`` is the training manifest's sha256, recorded in the saved model."""
    metric = config.train.resolved_best_metric
    if metric is None:
        return None

    def save(model: torch.nn.Module, path: Path, extra: dict) -> Path:
        return save_final_model(model, config, path, data_digest=digest, model_section=spec.model_section, extra=extra)

    return BestModelKeeper(run_dir, metric, config.train.best_mode, save)


def run_train(config: DMLConfig, resume: bool = False, allow_new_data: bool = False) -> TrainResult:
    """Train as configured on this process's share of the (possibly distributed) job.

    ``resume`` continues from the newest resumable checkpoint of ``train.run_dir`` (see
    `dml.train.resume` for what may change); ``allow_new_data`` lets it continue on other
    shards (a fine-tune). Raises `DMLError` (one line) for anything the user can fix.
    """
    return run_training(config, resume, TrainingSpec(config.train.run_dir, build_model, Objective), allow_new_data)


@dataclass
class TrainingSpec:
    """What differs between `dml train` and `dml distill`: the run folder, the model builder
    and the objective factory ``(config, num_classes, device) -> Objective-like``."""

    run_dir: str
    build_model: Callable[[DMLConfig], torch.nn.Module]
    build_objective: Callable[[DMLConfig, int, torch.device], Any]
    with_keys: bool = False
    model_section: str = "model"


def run_training(config: DMLConfig, resume: bool, spec: TrainingSpec, allow_new_data: bool = False) -> TrainResult:
    """The shared training stage: process group, model, engine, objective, loop, outputs.

    Raises DMLError for ``allow_new_data`` without ``resume``.
    """
    if allow_new_data and not resume:
        raise DMLError("--allow-new-data only applies with --resume")
    info = init_distributed()
    # SIGTERM (kill, a timeout, Kubernetes, torchrun stopping its workers) ended the run with
    # exit 143 and no word; now it stops like Ctrl-C, with one line saying how to go on
    stopped = f"the checkpoints written so far are in {spec.run_dir}/checkpoints: run again with --resume to continue"
    try:
        with sigterm_as_interrupt(stopped), contextlib.ExitStack() as run_lock:
            return _train(config, resume, info.device, spec, run_lock, allow_new_data)
    finally:
        cleanup()


def _train(
    config: DMLConfig,
    resume: bool,
    device: torch.device,
    spec: TrainingSpec,
    run_lock: contextlib.ExitStack,
    allow_new_data: bool = False,
) -> TrainResult:
    run_dir = Path(spec.run_dir)
    manifest = load_manifest(config.data.shard_dir)
    identity = data_identity(config.data.shard_dir, manifest)
    point = find_resume_point(run_dir, resume)
    if point is not None:
        check_config(point, config, spec.model_section)
        check_data(point, identity, config.data.shard_dir, allow_new_data)
    # after the checks, which refuse without creating the folder; held until run_training returns
    run_lock.enter_context(hold_run_dir(run_dir, "train" if spec.model_section == "model" else "distill"))
    rank = get_rank()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        log.info("train: start -> %s (backend %s, device %s)", run_dir, config.train.backend, device)
    barrier()
    seed_everything(config.seed + rank)
    num_classes = len(manifest["classes"])
    model = spec.build_model(config).to(device)
    engine = build_engine(model, config, device)
    objective = spec.build_objective(config, num_classes, device)
    loader = TrainLoader(config.data, seed=config.seed, with_keys=spec.with_keys)
    evaluate = combine_evaluators(
        make_evaluator(config, device),
        make_verification_evaluator(
            config.train.verification_sets, config.data, device, config.evaluate.fars, config.train.verification_flip
        ),
    )
    trainer = Trainer(
        config,
        run_dir,
        device,
        engine,
        objective,
        loader,
        evaluate,
        identity,
        best=make_best_keeper(config, run_dir, spec, identity["manifest_sha256"]),
    )
    state = TrainState()
    if point is not None:
        state = trainer.restore(restore_checkpoint(point.path, point.state, objective, engine, point.keep_head))
        log.info("train: resumed from %s (step %d)", point.path, state.step)
        point = None  # the loaded state (a full head matrix, maybe) is not kept while training
    state = trainer.fit(state)
    final_checkpoint = latest_checkpoint(run_dir)
    if final_checkpoint is None or not final_checkpoint.name.endswith(f"{state.step:08d}"):
        final_checkpoint = trainer.checkpoint(state)
    final_model = trainer.swa.finalize(loader, device) if trainer.swa else engine.model
    metrics = trainer.evaluate(final_model) if trainer.evaluate else {}
    trainer.metrics.write({"step": state.step, "final": True, **metrics})
    if trainer.best and metrics:
        trainer.best.update(metrics, state.step, final_model)
    trainer.metrics.close()
    model_path = model_file_in(run_dir)
    if rank == 0:
        save_final_model(
            final_model, config, model_path, data_digest=identity["manifest_sha256"], model_section=spec.model_section
        )
    result = TrainResult(str(run_dir), str(model_path), str(final_checkpoint), state.step, metrics)
    if rank == 0:
        write_json_atomic(run_dir / "train_result.json", asdict(result), sort_keys=False)
        trainer.metrics.finish([run_dir / name for name in ("config.yaml", "metrics.jsonl", "train_result.json")])
        log.info(
            "train: done -> %s (model %s, %d checkpoints kept)", run_dir, model_path, len(list_checkpoints(run_dir))
        )
    barrier()
    return result
