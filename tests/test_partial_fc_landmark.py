"""PartialFC with sub-centres and per-class (dynamic) margins: equal to a single-process float64
reference on 1, 2 and 3 gloo processes, sampled exactly, checkpoints free of the world size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dml.distributed import DistInfo, barrier
from dml.losses.margins import ArcFace, CosFace, SphereFace, dynamic_margins
from dml.losses.partial_fc import PartialFC
from dml.losses.shard_state import init_centre_shard
from dml.train.row_shards import RowShardReader, write_row_shard
from local_group import spawn_local_group
from test_partial_fc import DIM, assert_near, batch, local_slice, whole_head

CASES = [(1, True), (2, False), (3, True)]  # (sub-centres, per-class margins)
CASE_IDS = ["k1-dynamic", "k2", "k3-dynamic"]


def class_counts(num_classes: int) -> torch.Tensor:
    """A long tail: counts from 1 to ~60, every class different from its neighbour."""
    return torch.arange(num_classes) * 37 % 61 + 1


def margins_for(num_classes: int, dynamic: bool) -> torch.Tensor | None:
    return dynamic_margins(class_counts(num_classes), 0.1, 0.6, 0.5) if dynamic else None


def reference(weight, x, y, k: int, margins: torch.Tensor | None, make_margin=ArcFace):
    """Single-process float64 sub-centre margin CE over every class: (loss, d/dx, d/dW)."""
    w = weight.detach().clone().requires_grad_(True)
    e = x.detach().clone().requires_grad_(True)
    cosine = F.normalize(e, dim=1) @ F.normalize(w, dim=1).t()
    cosine = cosine.view(len(e), -1, k).amax(dim=2)
    margin = make_margin(m=margins) if margins is not None else make_margin()
    loss = F.cross_entropy(margin(cosine, y), y)
    loss.backward()
    return loss.detach(), e.grad, w.grad


def full_state(weight: torch.Tensor, k: int, margins: torch.Tensor | None) -> dict:
    return {
        "format": "dml.partial_fc/1",
        "num_classes": weight.shape[0] // k,
        "embedding_dim": DIM,
        "sub_centers": k,
        "weight": weight,
        "class_margins": margins,
        "sampler": {"seed": 0, "step": 0},
        "optimizer": None,
    }


def make_head(num_classes: int, k: int, margins, margin=None, **kwargs) -> PartialFC:
    return PartialFC(DIM, num_classes, margin or ArcFace(), sub_centers=k, class_margins=margins, **kwargs).double()


def check_rate_one_equivalence(world: int, rank: int, num_classes: int, global_n: int) -> None:
    """Every case on this group == the single-process reference (value and gradients)."""
    for k, dynamic in CASES:
        margins = margins_for(num_classes, dynamic)
        weight = torch.randn(
            num_classes * k, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(num_classes + k)
        )
        head = make_head(num_classes, k, margins)
        assert head.weight.shape == (head.shard_size * k, DIM)
        head.load_full_state_dict(full_state(weight, k, margins))
        x, y = batch(k, global_n, num_classes)
        part = local_slice(global_n, world, rank)
        emb = x[part].clone().requires_grad_(True)
        loss = head(emb, y[part])
        loss.backward()
        ref_loss, ref_dx, ref_dw = reference(weight, x, y, k, margins)
        assert loss.item() > 0.1
        assert_near(loss.detach(), ref_loss)
        assert emb.grad is not None and head.weight.grad is not None
        assert_near(emb.grad, ref_dx[part])
        assert_near(head.weight.grad, ref_dw[head.class_start * k : head.class_end * k])


# --- single process --------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 7, 23])
def test_world_one_equals_the_reference(num_classes):
    check_rate_one_equivalence(1, 0, num_classes, 9)


def test_cosface_per_class_margins_equal_the_reference():
    margins, weight = margins_for(13, True), torch.randn(26, DIM, dtype=torch.float64)
    head = make_head(13, 2, margins, CosFace(s=16.0))
    head.load_full_state_dict(full_state(weight, 2, margins))
    x, y = batch(0, 11, 13)
    assert_near(head(x, y).detach(), reference(weight, x, y, 2, margins, lambda m: CosFace(s=16.0, m=m))[0])


def test_a_margin_built_with_per_class_margins_is_sharded_by_the_head():
    margins, weight = margins_for(9, True), torch.randn(9, DIM, dtype=torch.float64)
    head = PartialFC(DIM, 9, ArcFace(m=margins), sample_rate=0.5).double()  # sampled: 5 of 9 columns
    head.load_full_state_dict(full_state(weight, 1, margins))
    x, y = batch(0, 3, 9)
    loss = head(x, y)
    index = head.sampled_index
    ref = reference(weight[index], x, torch.searchsorted(index, y), 1, margins[index])[0]
    assert_near(loss.detach(), ref)


@pytest.mark.parametrize("k, dynamic", CASES, ids=CASE_IDS)
def test_sampling_keeps_every_sub_centre_and_remaps_the_margins(k, dynamic):
    num_classes = 40
    margins, weight = margins_for(num_classes, dynamic), torch.randn(num_classes * k, DIM, dtype=torch.float64)
    head = make_head(num_classes, k, margins, sample_rate=0.3, seed=2)
    head.load_full_state_dict(full_state(weight, k, margins))
    optimizer = head.configure_optimizer("adamw", lr=0.1)
    for step in range(3):
        x, y = batch(step, 6, num_classes)
        weight = head.weight.detach().clone()
        loss = head(x, y)
        classes, rows = head.sampled_index, head.sampled_rows
        assert classes.numel() == 12 and set(y.tolist()) <= set(classes.tolist())
        assert rows.tolist() == [c * k + j for c in classes.tolist() for j in range(k)]
        kept = weight.view(num_classes, k, DIM)[classes].reshape(-1, DIM)
        ref = reference(kept, x, torch.searchsorted(classes, y), k, None if margins is None else margins[classes])[0]
        assert_near(loss.detach(), ref)
        head.sample_step -= 1  # replay the same draw through the optimizer
        before, steps_before = head.weight.detach().clone(), optimizer.row_state()["row_step"].clone()
        optimizer.zero_grad()
        head(x, y).backward()
        assert head.weight.grad.is_sparse  # the sampled rows reach the shard, and only they
        assert torch.equal(head.weight.grad.coalesce().indices()[0], rows)
        optimizer.step()
        untouched = torch.ones(len(before), dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(head.weight.detach()[untouched], before[untouched])
        assert (head.weight.detach()[rows] != before[rows]).any(dim=1).all()
        assert torch.equal(optimizer.row_state()["row_step"] - steps_before, (~untouched).float())


def test_full_state_round_trip_keeps_sub_centres_margins_and_optimizer_rows():
    margins = margins_for(10, True)
    head = make_head(10, 3, margins, sample_rate=0.5, seed=4)
    optimizer = head.configure_optimizer("sgd", lr=0.1)
    x, y = batch(0, 5, 10)
    head(x, y).backward()
    optimizer.step()
    state = head.full_state_dict(optimizer)
    assert state["weight"].shape == (30, DIM) and state["sub_centers"] == 3
    assert state["optimizer"]["state"]["momentum_buffer"].shape == (30, DIM)
    assert torch.equal(state["class_margins"], margins.double())
    fresh = make_head(10, 3, torch.zeros(10))  # the saved margins win over the new ones
    fresh_optimizer = fresh.configure_optimizer("sgd", lr=0.1)
    fresh.load_full_state_dict(state, fresh_optimizer)
    again = fresh.full_state_dict(fresh_optimizer)
    for key in ("weight", "class_margins"):
        assert torch.equal(again[key], state[key]), key
    assert torch.equal(again["optimizer"]["state"]["momentum_buffer"], state["optimizer"]["state"]["momentum_buffer"])


def test_sub_centre_init_is_the_flat_matrix_init():
    head = PartialFC(DIM, 5, ArcFace(), sub_centers=4, seed=3)
    assert torch.equal(head.weight.detach(), init_centre_shard(20, DIM, 0, 20, seed=3))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PartialFC(DIM, 4, ArcFace(), sub_centers=0), "sub_centers must be >= 1"),
        (lambda: PartialFC(DIM, 4, SphereFace(), class_margins=torch.full((4,), 0.2)), "need ArcFace or CosFace"),
        (lambda: PartialFC(DIM, 4, ArcFace(), class_margins=torch.full((5,), 0.2)), r"must have shape \(4,\)"),
        (lambda: PartialFC(DIM, 4, ArcFace(), class_margins=torch.tensor([0.1, -0.1, 0.2, 0.2])), "margin must be in"),
        (lambda: PartialFC(DIM, 4, ArcFace(), class_margins=torch.tensor([0.1, 4.0, 0.2, 0.2])), "margin must be in"),
        (lambda: PartialFC(DIM, 4, CosFace(), class_margins=torch.tensor([0.1, 2.5, 0.2, 0.2])), "margin must be in"),
        (
            lambda: PartialFC(DIM, 4, ArcFace(), sub_centers=2).load_full_state_dict(
                whole_head(PartialFC(DIM, 4, ArcFace()))
            ),
            "1 sub-centres per class, this one has 2",
        ),
        (
            lambda: PartialFC(DIM, 4, ArcFace()).load_full_state_dict(
                whole_head(PartialFC(DIM, 4, ArcFace(), class_margins=torch.full((4,), 0.2)))
            ),
            "has per-class margins, this one has no",
        ),
    ],
)
def test_bad_input_is_a_clear_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- real process groups ---------------------------------------------------------------------


def landmark_worker(info: DistInfo, tmp: str) -> None:
    """Rate-1 equivalence on 11 and 4 classes (4 < 2 x k on 3 ranks), then a sampled run whose
    full state is saved for reloading on other world sizes."""
    for num_classes, global_n in ((11, 13), (4, 7)):
        check_rate_one_equivalence(info.world_size, info.rank, num_classes, global_n)
    head = make_head(17, 3, margins_for(17, True), sample_rate=0.5, seed=1)
    optimizer = head.configure_optimizer("adamw", lr=0.05)
    for step in range(2):
        x, y = batch(step, 9, 17)
        part = local_slice(9, info.world_size, info.rank)
        optimizer.zero_grad()
        head(x[part], y[part]).backward()
        rows = head.sampled_rows
        assert rows is not None and head.sampled_index is not None
        assert rows.numel() == 3 * head.sampled_index.numel()
        optimizer.step()
    state = head.full_state_dict(optimizer)
    shard = head.sharded_state_dict(optimizer)  # the row-sharded checkpoint: (classes, k, D) and (classes,) margins
    assert shard.tensors["weight"].shape == (head.shard_size, 3, DIM)
    assert shard.tensors["class_margins"].shape == (head.shard_size,)
    record = write_row_shard(Path(tmp) / f"rows-{info.world_size}", info.rank, shard.start, shard.end, shard.tensors)
    records: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(records, record)
    if info.rank == 0:
        torch.save(state, f"{tmp}/head-{info.world_size}.pt")
        torch.save({"meta": shard.meta, "index": records}, f"{tmp}/rows-{info.world_size}.pt")
    barrier()
    other = make_head(17, 3, torch.zeros(17), seed=9)
    other_optimizer = other.configure_optimizer("adamw", lr=0.05)
    other.load_full_state_dict(torch.load(f"{tmp}/head-{info.world_size}.pt", mmap=True), other_optimizer)
    again = other.full_state_dict(other_optimizer)
    if info.rank == 0:
        assert again is not None and state is not None
        assert torch.equal(again["weight"], state["weight"])
        assert torch.equal(again["class_margins"], state["class_margins"])


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_heads_equal_the_reference_and_reload_on_one_process(world, tmp_path):
    (tmp_path / f"rows-{world}").mkdir()
    spawn_local_group(landmark_worker, world, args=(str(tmp_path),))
    saved = torch.load(tmp_path / f"head-{world}.pt")
    assert saved["weight"].shape == (51, DIM)
    assert torch.equal(saved["class_margins"], margins_for(17, True).double())
    single = make_head(17, 3, torch.zeros(17))
    single_optimizer = single.configure_optimizer("adamw", lr=0.05)
    single.load_full_state_dict(saved, single_optimizer)
    reloaded = single.full_state_dict(single_optimizer)
    assert torch.equal(reloaded["weight"], saved["weight"])
    for key, value in saved["optimizer"]["state"].items():
        assert torch.equal(reloaded["optimizer"]["state"][key], value), key
    sharded = torch.load(tmp_path / f"rows-{world}.pt")  # row-sharded on `world` ranks, read on 1
    from_rows = make_head(17, 3, torch.zeros(17))
    rows_optimizer = from_rows.configure_optimizer("adamw", lr=0.05)
    from_rows.load_sharded_state_dict(
        sharded["meta"], RowShardReader(tmp_path / f"rows-{world}", sharded["index"]).read, rows_optimizer
    )
    again = from_rows.full_state_dict(rows_optimizer)
    for key in ("weight", "class_margins"):
        assert torch.equal(again[key], saved[key]), key
    for key, value in saved["optimizer"]["state"].items():
        assert torch.equal(again["optimizer"]["state"][key], value), key
