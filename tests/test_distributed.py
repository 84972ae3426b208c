"""dml.distributed: single-process fallbacks, env validation, and a real 3-process gloo group."""

from __future__ import annotations

import pytest
import torch

from dml import distributed as D
from local_group import spawn_local_group

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_env_has_no_group(clean_env):
    info = D.init_distributed()
    assert info == D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    assert not D.is_initialized()
    assert (D.get_rank(), D.get_world_size(), D.is_main_process()) == (0, 1, True)
    D.barrier()
    D.cleanup()
    x = torch.randn(4, 3, requires_grad=True)
    gathered = D.all_gather_with_grad(x)
    (gathered * 2).sum().backward()
    assert torch.equal(gathered, x)
    assert torch.equal(x.grad, torch.full((4, 3), 2.0))


def test_world_size_one_from_torchrun_env_has_no_group(clean_env):
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("RANK", "0")
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert not D.is_initialized()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR is required"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, "MASTER_PORT='x'"),
    ],
)
def test_bad_env_is_a_one_line_value_error(clean_env, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        D.init_distributed()


def rank_rows(rank: int) -> torch.Tensor:
    """Rank r contributes r + 1 rows of width 3, rank 1 none at all (uneven on purpose)."""
    rows = 0 if rank == 1 else rank + 1
    return torch.arange(rows * 3, dtype=torch.float64).reshape(rows, 3) + 100 * rank


def gather_worker(info: D.DistInfo) -> dict:
    return {path: check_gather(info, path) for path in (True, False)}


def check_gather(info: D.DistInfo, use_reduce_scatter: bool) -> dict:
    world = info.world_size
    assert (info.backend, info.device, D.get_rank(), D.get_world_size()) == (
        "gloo",
        torch.device("cpu"),
        info.rank,
        world,
    )
    assert D.is_main_process() == (info.rank == 0)
    D.barrier()
    expected = torch.cat([rank_rows(r) for r in range(world)])
    mine = rank_rows(info.rank).requires_grad_(True)
    gathered = D.all_gather_with_grad(mine, use_reduce_scatter=use_reduce_scatter)
    assert torch.equal(gathered.detach(), expected)
    # Each rank's loss weighs the gathered rows by (rank + 1) * coeff: the gradient each rank
    # must receive for its own rows is the sum over ranks, sum_r (r + 1) = world (world + 1) / 2.
    coeff = torch.arange(expected.numel(), dtype=torch.float64).reshape(expected.shape) % 7 - 3
    ((info.rank + 1) * coeff * gathered).sum().backward()
    start = sum(rank_rows(r).shape[0] for r in range(info.rank))
    want = world * (world + 1) / 2 * coeff[start : start + mine.shape[0]]
    assert mine.grad is not None and torch.equal(mine.grad, want)
    labels = D.all_gather_rows(torch.full((mine.shape[0],), info.rank, dtype=torch.long))
    assert labels.tolist() == [r for r in range(world) for _ in range(rank_rows(r).shape[0])]
    return {"rank": info.rank, "rows": int(mine.shape[0]), "grad_sum": float(mine.grad.sum())}


@pytest.mark.dist
def test_all_gather_with_grad_unequal_sizes_three_ranks():
    """Both backward paths: padded reduce-scatter, and the all-reduce + slice fallback."""
    results = spawn_local_group(gather_worker, 3)
    for use_reduce_scatter in (True, False):
        by_rank = [r[use_reduce_scatter] for r in results]
        assert [r["rank"] for r in by_rank] == [0, 1, 2]
        assert [r["rows"] for r in by_rank] == [1, 0, 3]
        assert by_rank[1]["grad_sum"] == 0.0 and by_rank[2]["grad_sum"] != 0.0


def failing_worker(info: D.DistInfo) -> None:
    if info.rank == 1:
        raise ValueError("rank 1 fails on purpose")
    D.barrier()


@pytest.mark.dist
def test_spawn_local_group_reraises_a_worker_error():
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed:(.|\n)*rank 1 fails on purpose"):
        spawn_local_group(failing_worker, 2)
