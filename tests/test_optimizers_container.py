"""The training step has one owner: `OptimizersContainer` steps every optimizer once per
accumulation window, and `LRSchedulersContainer` drives them all.

Real pieces: the real DDP engine (real DDP on 2 and 3 gloo processes), the real objective
(partial-FC head with its row-sparse optimizer, centre loss) and torch's own step hooks to
count the steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dml.config import DMLConfig
from dml.distributed import DistInfo, get_rank, get_world_size
from dml.losses.partial_fc import PartialFC
from dml.train.engine import DDPEngine
from dml.train.objective import Objective
from dml.train.optimizers import OptimizersContainer
from dml.train.schedules import LRSchedulersContainer, lr_factor
from local_group import spawn_local_group

IN, DIM, CLASSES, GLOBAL_BATCH, MICRO_BATCHES = 5, 8, 7, 6, 7
ACCUMS = (1, 2, 3)


def config(accum: int, center_weight: float = 0.0, lr: float = 0.5, **schedule) -> DMLConfig:
    return DMLConfig.model_validate(
        {
            "model": {"embedding_dim": DIM},
            "train": {"grad_accum": accum},
            "loss": {"kind": "cosface", "scale": 16.0, "margin": 0.2, "center_weight": center_weight},
            "optimizer": {"lr": lr, "momentum": 0.0, "weight_decay": 0.0},
            "schedule": schedule,
        }
    )


def micro_batch(index: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``index`` of the global stream (``rows``: this rank's part of it)."""
    gen = torch.Generator().manual_seed(100 + index)
    x, y = torch.randn(GLOBAL_BATCH, IN, generator=gen), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=gen)
    return x[rows], y[rows]


def parts(cfg: DMLConfig) -> tuple[DDPEngine, Objective, OptimizersContainer]:
    torch.manual_seed(0)
    engine = DDPEngine(nn.Linear(IN, DIM), cfg, torch.device("cpu"))
    objective = Objective(cfg, CLASSES, torch.device("cpu"))
    return engine, objective, OptimizersContainer(engine, objective.optimizers, cfg.train.grad_accum)


def backbone_weight(engine: DDPEngine) -> torch.Tensor:
    model = engine.model
    assert isinstance(model, nn.Linear)  # the stand-in backbone of `parts`
    return model.weight.detach().clone()


def head_of(objective: Objective) -> PartialFC:
    assert objective.head is not None  # a margin loss: the objective has a partial-FC head
    return objective.head


def run_micro_batches(accum: int, center_weight: float, count: int) -> tuple[dict, dict, bool]:
    """Train ``count`` micro-batches of this rank's rows; returns ({optimizer: micro-batches
    after which it stepped}, final parameters, whether every gradient was dropped after each step)."""
    world, rank = get_world_size(), get_rank()
    share = GLOBAL_BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    engine, objective, optimizers = parts(config(accum, center_weight))
    stepped: dict[str, list[int]] = {name: [] for name in optimizers.optimizers}
    done = [0]
    for name, optimizer in optimizers.optimizers.items():
        optimizer.register_step_post_hook(lambda *_, name=name: stepped[name].append(done[0]))
    params = [*engine.model.parameters(), *objective.parameters()]
    zeroed = True
    for index in range(count):
        x, y = micro_batch(index, rows)
        with optimizers.accumulation_context():
            loss, _ = objective(engine.forward(x), y)
            optimizers.backward(loss)
        done[0] = index + 1
        if optimizers.step():
            zeroed = zeroed and all(p.grad is None for p in params)
    head = head_of(objective)
    final = {
        "backbone": backbone_weight(engine),
        "head": (head.class_start, head.class_end, head.weight.detach().clone()),
    }
    return stepped, final, zeroed


def one_big_batch_per_window(accum: int, windows: int) -> dict:
    """The reference: one process, no accumulation, each window's micro-batches as one batch."""
    engine, objective, optimizers = parts(config(1))
    for window in range(windows):
        batches = [micro_batch(window * accum + i) for i in range(accum)]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        loss, _ = objective(engine.forward(x), y)
        optimizers.backward(loss)
        assert optimizers.step()
    return {"backbone": backbone_weight(engine), "head": head_of(objective).weight.detach().clone()}


def window_worker(info: DistInfo) -> dict:
    return {
        accum: (run_micro_batches(accum, 0.01, MICRO_BATCHES)[::2], run_micro_batches(accum, 0.0, 2 * accum)[1])
        for accum in ACCUMS
    }


def check_world(results: dict) -> None:
    for accum, ((stepped, zeroed), final) in results.items():
        ends = list(range(accum, MICRO_BATCHES + 1, accum))
        assert stepped == {"backbone": ends, "head": ends, "center": ends}, accum
        assert zeroed
        reference = one_big_batch_per_window(accum, 2)
        assert torch.allclose(final["backbone"], reference["backbone"], atol=1e-5, rtol=1e-4), accum
        start, end, shard = final["head"]
        assert torch.allclose(shard, reference["head"][start:end], atol=1e-5, rtol=1e-4), accum
        assert not torch.allclose(shard, head_of(parts(config(1))[1]).weight.detach()[start:end])  # it moved


def test_one_process_steps_every_optimizer_once_per_window_with_the_big_batch_gradient():
    check_world(window_worker(DistInfo(0, 1, 0, torch.device("cpu"), None)))


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_step_every_optimizer_once_per_window_with_the_big_batch_gradient(world):
    results = spawn_local_group(window_worker, world)
    for result in results:
        check_world(result)


def test_a_window_that_never_ends_steps_nothing():
    stepped, _, _ = run_micro_batches(4, 0.01, 3)
    assert stepped == {"backbone": [], "head": [], "center": []}


def test_bad_arguments_are_refused():
    engine, objective, _ = parts(config(1, 0.01))
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        OptimizersContainer(engine, objective.optimizers, 0)
    with pytest.raises(ValueError, match="'backbone' names the engine's optimizer"):
        OptimizersContainer(engine, {"backbone": objective.optimizers["head"]}, 1)


@pytest.mark.parametrize("kind", ["cosine", "poly", "cyclic", "constant"])
def test_one_schedule_drives_every_optimizer_and_resumes_at_the_saved_step(kind):
    cfg = config(1, 0.01, kind=kind, warmup_steps=2, cycle_steps=4)
    engine, objective, optimizers = parts(cfg)
    schedule = LRSchedulersContainer(optimizers.optimizers, 9, cfg.schedule)
    for step in range(5):
        for optimizer in optimizers.optimizers.values():
            assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr_factor(step, 9, cfg.schedule))
        x, y = micro_batch(step)
        loss, _ = objective(engine.forward(x), y)
        optimizers.backward(loss)
        optimizers.step()
        schedule.step()
    saved = schedule.state_dict()
    assert saved == {"step_count": 5, "total_steps": 9}
    # A resumed run with another base LR: the optimizers' saved states carry the old one.
    resumed_cfg = config(1, 0.01, lr=0.2, kind=kind, warmup_steps=2, cycle_steps=4)
    _, _, optimizers2 = parts(resumed_cfg)
    resumed = LRSchedulersContainer(optimizers2.optimizers, 9, resumed_cfg.schedule)
    for name, optimizer in optimizers2.optimizers.items():
        optimizer.load_state_dict(optimizers.optimizers[name].state_dict())
    resumed.load_state_dict(saved)
    for optimizer in optimizers2.optimizers.values():
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * lr_factor(5, 9, resumed_cfg.schedule))
        assert optimizer.param_groups[0]["initial_lr"] == 0.2
    assert resumed.current_lr() == pytest.approx(0.2 * lr_factor(5, 9, resumed_cfg.schedule))
