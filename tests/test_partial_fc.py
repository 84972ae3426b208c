"""PartialFC: equality with full-softmax margin CE, sparse updates, world-size-free checkpoints."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dml.distributed import DistInfo, barrier
from dml.losses.distributed_softmax import distributed_cross_entropy
from dml.losses.margins import ArcFace, CombinedMargin, CosFace
from dml.losses.partial_fc import PartialFC
from dml.losses.shard_state import init_centre_shard, shard_bounds
from local_group import spawn_local_group

DIM = 8
TOL = 1e-6  # float64 throughout; the differences seen are ~1e-13


def assert_near(actual: torch.Tensor, expected: torch.Tensor, atol: float = TOL, rtol: float = 0.0) -> None:
    """|actual - expected| <= atol + rtol |expected| everywhere. (torch.testing.assert_close
    would do, but its first call imports sympy: ~4 s in every spawned worker.)"""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert actual.numel() == 0 or excess.max().item() <= 0, f"off by up to {excess.max().item() + atol:.3g}"


def reference_ce(weight: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, margin):
    """Single-process full-softmax margin cross-entropy; returns (loss, d/d embeddings, d/d weight)."""
    w = weight.detach().clone().requires_grad_(True)
    x = embeddings.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(margin(F.normalize(x, dim=1) @ F.normalize(w, dim=1).t(), labels), labels)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def batch(step: int, n: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(n, DIM, generator=gen, dtype=torch.float64), torch.randint(0, num_classes, (n,), generator=gen))


def local_slice(n: int, world: int, rank: int) -> slice:
    """Deliberately unequal split of a global batch: shares grow with the rank; with 3 ranks rank 0 gets none."""
    weights = [r + (world != 3) for r in range(world)]
    cuts = [0] + [n * sum(weights[: r + 1]) // sum(weights) for r in range(world)]
    return slice(cuts[rank], cuts[rank + 1])


def full_weight(num_classes: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(num_classes, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def whole_head(head: PartialFC) -> dict:
    """``head.full_state_dict()`` in one process (where it is never None)."""
    state = head.full_state_dict()
    assert state is not None
    return state


def head_with_weight(weight: torch.Tensor, margin, sample_rate: float = 1.0, seed: int = 0) -> PartialFC:
    head = PartialFC(DIM, weight.shape[0], margin, sample_rate=sample_rate, seed=seed).double()
    head.load_full_state_dict(
        {
            "format": "dml.partial_fc/1",
            "num_classes": weight.shape[0],
            "embedding_dim": DIM,
            "weight": weight,
            "sampler": {"seed": seed, "step": 0},
            "optimizer": None,
        }
    )
    return head


# --- single process --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "margin",
    [ArcFace(), CosFace(), CombinedMargin(s=30.0, m1=1.0, m2=0.3, m3=0.2)],
    ids=["arcface", "cosface", "combined"],
)
def test_world_one_equals_full_softmax_margin_ce(margin):
    weight, (x, y) = full_weight(23), batch(0, 17, 23)
    head = head_with_weight(weight, margin)
    emb = x.clone().requires_grad_(True)
    loss = head(emb, y)
    loss.backward()
    ref_loss, ref_dx, ref_dw = reference_ce(weight, x, y, margin)
    assert loss.item() > 0.1
    assert_near(loss.detach(), ref_loss)
    assert_near(emb.grad, ref_dx)
    assert_near(head.weight.grad, ref_dw)


def test_sampled_loss_is_full_softmax_over_the_sampled_centres():
    weight, (x, y) = full_weight(40), batch(1, 6, 40)
    head = head_with_weight(weight, ArcFace(), sample_rate=0.3)
    loss = head(x, y)
    index = head.sampled_index
    assert index.numel() == 12  # ceil(0.3 * 40); 0.3 * 40 is 12.000000000000002 in floating point
    assert torch.equal(index, index.sort().values)
    assert set(y.tolist()) <= set(index.tolist())
    remapped = torch.searchsorted(index, y)
    ref_loss, _, _ = reference_ce(weight[index], x, remapped, ArcFace())
    assert_near(loss.detach(), ref_loss)
    head.eval()  # eval scores every centre: the full softmax again
    assert_near(head(x, y).detach(), reference_ce(weight, x, y, ArcFace())[0])
    assert head.sampled_index is None


def test_more_positive_classes_than_the_sample_keeps_all_positives():
    head = PartialFC(DIM, 50, ArcFace(), sample_rate=0.1)
    labels = torch.arange(0, 50, 5)  # 10 positives, sample size ceil(5.0) = 5
    head(torch.randn(10, DIM), labels)
    assert head.sampled_index.tolist() == labels.tolist()


def test_sampling_is_reproducible_given_the_seed_and_changes_per_step():
    x, y = batch(2, 4, 200)
    draws = []
    for _ in range(2):
        head = PartialFC(DIM, 200, ArcFace(), sample_rate=0.1, seed=5)
        draws.append([])
        for _ in range(3):
            head(x.float(), y)
            draws[-1].append(head.sampled_index.tolist())
    assert draws[0] == draws[1]
    assert draws[0][0] != draws[0][1] != draws[0][2]
    other = PartialFC(DIM, 200, ArcFace(), sample_rate=0.1, seed=6)
    other(x.float(), y)
    assert other.sampled_index.tolist() != draws[0][0]


def sampled_step_checks(head: PartialFC, optimizer, x, y) -> torch.Tensor:
    """One sampled step: rows not sampled and their optimizer state stay bit-identical."""
    weight_before = head.weight.detach().clone()
    state_before = {k: v.clone() for k, v in optimizer.row_state().items()}
    optimizer.zero_grad()
    head(x, y).backward()
    optimizer.step()
    index = head.sampled_index
    assert index is not None  # sample_rate < 1 samples rows
    untouched = torch.ones(head.shard_size, dtype=torch.bool)
    untouched[index] = False
    assert untouched.any()
    assert torch.equal(head.weight.detach()[untouched], weight_before[untouched])
    assert (head.weight.detach()[index] != weight_before[index]).any(dim=1).all()
    for key, before in state_before.items():
        after = optimizer.row_state()[key]
        assert torch.equal(after[untouched], before[untouched]), key
        assert (after[index] != before[index]).reshape(index.numel(), -1).any(dim=1).all(), key
    return index


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_sparse_optimizer_leaves_unsampled_rows_and_state_untouched(name):
    head = PartialFC(DIM, 60, ArcFace(), sample_rate=0.2, seed=1).double()
    optimizer = head.configure_optimizer(name, lr=0.1)
    times_sampled = torch.zeros(60)
    for step in range(3):
        x, y = batch(step, 5, 60)
        index = sampled_step_checks(head, optimizer, x, y)
        assert set(y.tolist()) <= set(index.tolist())
        times_sampled[index] += 1
    if name == "adamw":
        assert torch.equal(optimizer.row_state()["row_step"], times_sampled)
        assert optimizer.row_state()["row_step"].dtype == torch.float32


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_sparse_step_in_chunks_changes_no_bit(monkeypatch, name, chunk_rows):
    """The sampled rows are updated a bounded chunk at a time; any chunk size gives the bits of
    one whole-sample update (the update is row-wise)."""
    heads = {}
    for chunked in (False, True):
        row_bytes = DIM * 8  # float64 rows
        monkeypatch.setattr("dml.losses.sparse_optim.STEP_CHUNK_BYTES", chunk_rows * row_bytes if chunked else 2**40)
        head = PartialFC(DIM, 60, ArcFace(), sample_rate=0.3, seed=2).double()
        optimizer = head.configure_optimizer(name, lr=0.1)
        for step in range(3):
            x, y = batch(step, 5, 60)
            optimizer.zero_grad()
            head(x, y).backward()
            optimizer.step()
        heads[chunked] = (head.weight.detach(), optimizer.row_state())
    assert torch.equal(heads[False][0], heads[True][0])
    for key, value in heads[False][1].items():
        assert torch.equal(value, heads[True][1][key]), key


@pytest.mark.parametrize(
    "name, torch_optimizer",
    [
        ("sgd", lambda p: torch.optim.SGD([p], lr=0.5, momentum=0.9, weight_decay=5e-4)),
        ("adamw", lambda p: torch.optim.AdamW([p], lr=0.01, weight_decay=5e-4, betas=(0.9, 0.999))),
    ],
)
def test_rate_one_matches_the_torch_optimizer(name, torch_optimizer):
    weight = full_weight(12)
    head = head_with_weight(weight, CosFace(s=16.0))
    optimizer = head.configure_optimizer(name, lr=0.5 if name == "sgd" else 0.01)
    reference = torch.nn.Parameter(weight.clone())
    ref_optimizer = torch_optimizer(reference)
    for step in range(3):
        x, y = batch(step, 7, 12)
        optimizer.zero_grad()
        head(x, y).backward()
        optimizer.step()
        ref_optimizer.zero_grad()
        F.cross_entropy(CosFace(s=16.0)(F.normalize(x) @ F.normalize(reference).t(), y), y).backward()
        ref_optimizer.step()
    assert not torch.allclose(head.weight.detach(), weight)
    assert_near(head.weight.detach(), reference.detach(), atol=1e-10)


def test_lr_scheduler_drives_the_head_optimizer():
    head = head_with_weight(full_weight(10), CosFace(s=16.0))
    optimizer = head.configure_optimizer("sgd", lr=1.0, momentum=0.0, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    x, y = batch(0, 5, 10)
    for lr in (1.0, 0.1):
        before = head.weight.detach().clone()
        optimizer.zero_grad()
        head(x, y).backward()
        grad = head.weight.grad.clone()
        optimizer.step()
        scheduler.step()
        assert_near(head.weight.detach(), before - lr * grad, atol=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_optimizer_state_dict_round_trip_continues_identically():
    def run(head, optimizer, steps):
        for step in steps:
            x, y = batch(step, 5, 30)
            optimizer.zero_grad()
            head(x, y).backward()
            optimizer.step()

    head = PartialFC(DIM, 30, ArcFace(), sample_rate=0.3, seed=2).double()
    optimizer = head.configure_optimizer("adamw", lr=0.05)
    run(head, optimizer, range(2))
    # state_dict() shares storage with the live tensors: copy, as torch.save would.
    saved_weights, saved_opt = copy.deepcopy(head.state_dict()), copy.deepcopy(optimizer.state_dict())
    saved_step = head.sample_step
    run(head, optimizer, range(2, 4))
    resumed = PartialFC(DIM, 30, ArcFace(), sample_rate=0.3, seed=2).double()
    resumed.load_state_dict(saved_weights)
    resumed.sample_step = saved_step
    resumed_opt = resumed.configure_optimizer("adamw", lr=0.05)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.row_state()["row_step"].dtype == torch.float32
    run(resumed, resumed_opt, range(2, 4))
    assert torch.equal(resumed.weight, head.weight)
    assert torch.equal(resumed_opt.row_state()["exp_avg_sq"], optimizer.row_state()["exp_avg_sq"])


def test_full_state_round_trip_in_one_process_with_the_optimizer_passed():
    head = PartialFC(DIM, 25, ArcFace(), sample_rate=0.5, seed=4).double()
    optimizer = head.configure_optimizer("sgd", lr=0.1)
    x, y = batch(0, 6, 25)
    head(x, y).backward()
    optimizer.step()
    state = head.full_state_dict(optimizer)
    assert state["weight"].shape == (25, DIM) and state["sampler"] == {"seed": 4, "step": 1}
    assert head.full_state_dict()["optimizer"] is None  # the head does not hold its optimizer
    fresh = PartialFC(DIM, 25, ArcFace(), sample_rate=0.5, seed=99).double()
    fresh_opt = fresh.configure_optimizer("sgd", lr=0.7)
    fresh.load_full_state_dict(state, fresh_opt)
    reloaded = fresh.full_state_dict(fresh_opt)
    assert torch.equal(reloaded["weight"], state["weight"])
    assert torch.equal(
        reloaded["optimizer"]["state"]["momentum_buffer"], state["optimizer"]["state"]["momentum_buffer"]
    )
    assert fresh_opt.param_groups[0]["lr"] == 0.1 and reloaded["sampler"] == state["sampler"]
    fresh.load_full_state_dict({**state, "optimizer": None}, fresh_opt)  # no saved state: reset
    assert not fresh_opt.state


def test_centre_init_is_independent_of_the_world_size():
    full = init_centre_shard(10_000, 4, 0, 10_000, seed=3)
    for world in (2, 3, 7):
        bounds = [shard_bounds(10_000, world, r) for r in range(world)]
        base, extra = divmod(10_000, world)
        assert [b - a for a, b in bounds] == [base + (r < extra) for r in range(world)]
        assert bounds[-1][1] == 10_000 and all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
        shards = torch.cat([init_centre_shard(10_000, 4, a, b, seed=3) for a, b in bounds])
        assert torch.equal(shards, full)
    assert not torch.equal(full, init_centre_shard(10_000, 4, 0, 10_000, seed=4))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PartialFC(DIM, 10, ArcFace(), sample_rate=0.0), "sample_rate must be in"),
        (lambda: PartialFC(DIM, 10, ArcFace(), sample_rate=1.5), "sample_rate must be in"),
        (lambda: PartialFC(0, 10, ArcFace()), "embedding_dim must be"),
        (
            lambda: PartialFC(DIM, 10, ArcFace())(torch.randn(3, DIM), torch.tensor([0, 1, 10])),
            r"labels must be in \[0, 10\)",
        ),
        (
            lambda: PartialFC(DIM, 10, ArcFace())(torch.randn(3, DIM + 1), torch.tensor([0, 1, 2])),
            "embeddings must have shape",
        ),
        (lambda: PartialFC(DIM, 10, ArcFace())(torch.randn(3, DIM), torch.tensor([0.0, 1.0, 2.0])), "integer tensor"),
        (
            lambda: PartialFC(DIM, 10, ArcFace())(torch.randn(0, DIM), torch.zeros(0, dtype=torch.long)),
            "global batch is empty",
        ),
        (lambda: PartialFC(DIM, 10, ArcFace()).configure_optimizer("lamb", lr=0.1), "unknown head optimizer 'lamb'"),
        (
            lambda: PartialFC(DIM, 10, ArcFace()).load_full_state_dict(whole_head(PartialFC(DIM, 11, ArcFace()))),
            "saved head is 11 classes",
        ),
    ],
)
def test_bad_input_is_a_clear_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_distributed_ce_refuses_a_second_backward():
    logits = torch.randn(4, 5, requires_grad=True)
    loss = distributed_cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    assert_near(logits.grad, torch.autograd.grad(F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])), logits)[0])
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


# --- real process groups ---------------------------------------------------------------------


def check_equivalence(info: DistInfo, num_classes: int = 11, global_n: int = 13) -> None:
    """sample_rate 1 on this group == single-process full softmax ArcFace CE (value and gradients).

    11 classes divide evenly over neither 2 nor 3 ranks; `local_slice` gives unequal batches.
    """
    rank, world = info.rank, info.world_size
    margin = ArcFace()
    head = PartialFC(DIM, num_classes, margin, seed=3)
    assert head.shard_size == num_classes // world + (rank < num_classes % world)
    initial = head.full_state_dict()
    if rank == 0:  # the sharded init is the single-process init
        assert initial is not None
        assert torch.equal(initial["weight"], init_centre_shard(num_classes, DIM, 0, num_classes, seed=3))
    head.double()
    weight = full_weight(num_classes)
    head.load_full_state_dict(
        {
            "format": "dml.partial_fc/1",
            "num_classes": num_classes,
            "embedding_dim": DIM,
            "weight": weight,
            "sampler": {"seed": 3, "step": 0},
            "optimizer": None,
        }
    )
    x, y = batch(0, global_n, num_classes)
    part = local_slice(global_n, world, rank)
    emb = x[part].clone().requires_grad_(True)
    loss = head(emb, y[part])
    loss.backward()
    ref_loss, ref_dx, ref_dw = reference_ce(weight, x, y, margin)
    assert_near(loss.detach(), ref_loss)
    assert emb.grad is not None and head.weight.grad is not None
    assert_near(emb.grad, ref_dx[part])
    assert_near(head.weight.grad, ref_dw[head.class_start : head.class_end])
    losses = [None] * world
    torch.distributed.all_gather_object(losses, loss.item())
    assert len(set(losses)) == 1  # bit-identical on every rank


def sparse_worker(info: DistInfo, tmp: str) -> dict:
    check_equivalence(info)
    num_classes, global_n = 101, 9
    sampled: dict[str, Any] = {}
    for name in ("sgd", "adamw"):
        head = PartialFC(DIM, num_classes, ArcFace(), sample_rate=0.1, seed=8).double()
        optimizer = head.configure_optimizer(name, lr=0.1)
        for step in range(2):
            x, y = batch(step, global_n, num_classes)
            part = local_slice(global_n, info.world_size, info.rank)
            index = sampled_step_checks(head, optimizer, x[part], y[part])
            positives = [c - head.class_start for c in y.tolist() if head.class_start <= c < head.class_end]
            assert set(positives) <= set(index.tolist())  # includes the other rank's positives
            assert index.numel() == max(len(set(positives)), math.ceil(0.1 * head.shard_size))
            sampled[name] = sampled.get(name, 0) + index.numel()

    # Resuming a sampled run on the same world size reproduces it bit for bit.
    def train(head, optimizer, steps):
        for step in steps:
            x, y = batch(step, global_n, num_classes)
            part = local_slice(global_n, info.world_size, info.rank)
            optimizer.zero_grad()
            head(x[part], y[part]).backward()
            optimizer.step()

    head = PartialFC(DIM, num_classes, CosFace(), sample_rate=0.3, seed=8).double()
    optimizer = head.configure_optimizer("adamw", lr=0.05)
    train(head, optimizer, range(3))
    uninterrupted = head.full_state_dict(optimizer)
    head = PartialFC(DIM, num_classes, CosFace(), sample_rate=0.3, seed=8).double()
    optimizer = head.configure_optimizer("adamw", lr=0.05)
    train(head, optimizer, range(1))
    state = head.full_state_dict(optimizer)
    if info.rank == 0:
        torch.save(state, f"{tmp}/step1.pt")
    barrier()
    resumed = PartialFC(DIM, num_classes, CosFace(), sample_rate=0.3, seed=0).double()
    resumed_opt = resumed.configure_optimizer("adamw", lr=0.05)
    resumed.load_full_state_dict(torch.load(f"{tmp}/step1.pt", mmap=True), resumed_opt)
    train(resumed, resumed_opt, range(1, 3))
    final = resumed.full_state_dict(resumed_opt)
    if info.rank == 0:
        assert final is not None and uninterrupted is not None
        assert torch.equal(final["weight"], uninterrupted["weight"])
        for key, value in uninterrupted["optimizer"]["state"].items():
            assert torch.equal(final["optimizer"]["state"][key], value), key
    return sampled


@pytest.mark.dist
def test_two_ranks_match_full_softmax_and_update_only_sampled_rows(tmp_path):
    results = spawn_local_group(sparse_worker, 2, args=(str(tmp_path),))
    assert all(r["sgd"] > 0 and r["adamw"] > 0 for r in results)


def train_steps(head: PartialFC, optimizer, steps, world: int, rank: int) -> None:
    for step in steps:
        x, y = batch(step, 12, 17)
        part = local_slice(12, world, rank)
        optimizer.zero_grad()
        head(x[part], y[part]).backward()
        optimizer.step()


def checkpoint_writer(info: DistInfo, tmp: str) -> None:
    check_equivalence(info)
    head = PartialFC(DIM, 17, CosFace(s=16.0), seed=1).double()
    optimizer = head.configure_optimizer("adamw", lr=0.05)
    train_steps(head, optimizer, range(2), info.world_size, info.rank)
    state = head.full_state_dict(optimizer)
    if info.rank == 0:
        torch.save(state, f"{tmp}/ckpt.pt")
    train_steps(head, optimizer, range(2, 4), info.world_size, info.rank)
    final = head.full_state_dict(optimizer)
    if info.rank == 0:
        torch.save(final, f"{tmp}/final.pt")


def checkpoint_reader(info: DistInfo, tmp: str) -> None:
    head = PartialFC(DIM, 17, CosFace(s=16.0), seed=5).double()
    optimizer = head.configure_optimizer("adamw", lr=0.9)
    saved = torch.load(f"{tmp}/ckpt.pt", mmap=True)
    head.load_full_state_dict(saved, optimizer)
    check_resume(head, optimizer, saved, torch.load(f"{tmp}/final.pt"), info.world_size, info.rank)


def check_resume(head, optimizer, saved, final, world, rank) -> None:
    reloaded = head.full_state_dict(optimizer)
    if rank == 0:
        assert torch.equal(reloaded["weight"], saved["weight"])
        assert reloaded["optimizer"]["hyperparameters"] == saved["optimizer"]["hyperparameters"]
        for key, value in saved["optimizer"]["state"].items():
            assert torch.equal(reloaded["optimizer"]["state"][key], value), key
    train_steps(head, optimizer, range(2, 4), world, rank)
    resumed = head.full_state_dict(optimizer)
    if rank == 0:
        assert not torch.allclose(resumed["weight"], saved["weight"])
        assert_near(resumed["weight"], final["weight"], atol=1e-10)
        for key, value in final["optimizer"]["state"].items():
            assert_near(resumed["optimizer"]["state"][key], value, rtol=1e-8, atol=1e-12)


@pytest.mark.dist
def test_three_ranks_match_full_softmax_and_checkpoint_resumes_on_two_and_one(tmp_path):
    spawn_local_group(checkpoint_writer, 3, args=(str(tmp_path),))
    spawn_local_group(checkpoint_reader, 2, args=(str(tmp_path),))
    head = PartialFC(DIM, 17, CosFace(s=16.0), seed=5).double()
    saved = torch.load(tmp_path / "ckpt.pt")
    optimizer = head.configure_optimizer("adamw", lr=0.9)
    head.load_full_state_dict(saved, optimizer)  # one process
    assert optimizer.param_groups[0]["lr"] == 0.05
    check_resume(head, optimizer, saved, torch.load(tmp_path / "final.pt"), 1, 0)
