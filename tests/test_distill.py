"""`dml distill`: the losses on hand-computed cases, the teacher cache, and real runs."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dml.config import DMLConfig
from dml.distill.losses import absolute_teacher_loss, relative_teacher_loss, rkd_angle_loss, rkd_distance_loss
from dml.distill.objective import DistillObjective
from local_group import spawn_local_group, torchrun_dml

# The rest (timm models, loaders, the trainer) is imported inside the tests that need it, so
# the worker processes of the 2-rank gradient test import this module in a few seconds.


SQRT2 = math.sqrt(2.0)


def t(points) -> torch.Tensor:
    return torch.tensor(points, dtype=torch.float64)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# --- losses on hand-computed cases ------------------------------------------------------------
# Student: right triangle (0,0), (3,0), (0,4): side lengths d01=3, d02=4, d12=5.
# Teacher: (0,0), (1,0), (0,1): d01=1, d02=1, d12=sqrt(2).
STUDENT, TEACHER = t([[0, 0], [3, 0], [0, 4]]), t([[0, 0], [1, 0], [0, 1]])


def test_absolute_l2_and_cosine():
    # squared row distances: 0, (3-1)^2 = 4, (4-1)^2 = 9 -> mean 13/3
    assert absolute_teacher_loss(STUDENT, TEACHER, "l2").item() == pytest.approx(13 / 3)
    # cos: 1, <(1,1),(0,1)>/sqrt(2) = 1/sqrt(2), 1 -> mean of (1 - cos) = (1 - 1/sqrt(2)) / 3
    student, teacher = t([[1, 0], [1, 1], [0, 2]]), t([[1, 0], [0, 1], [0, 3]])
    assert absolute_teacher_loss(student, teacher, "cosine").item() == pytest.approx((1 - 1 / SQRT2) / 3)
    with pytest.raises(ValueError, match="student width 3 != teacher width 2"):
        absolute_teacher_loss(torch.zeros(3, 3), TEACHER.float())


def test_relative_teacher():
    # |3 - 1| + |4 - 1| + |5 - sqrt(2)| over 3 pairs
    assert relative_teacher_loss(STUDENT, TEACHER).item() == pytest.approx((10 - SQRT2) / 3)


def test_rkd_distance_quadratic_and_linear_huber():
    # Triangle: psi_s = (3, 4, 5) / 4; psi_t = (1, 1, sqrt2) / ((2 + sqrt2) / 3); all |diff| < 1.
    mu_t = (2 + SQRT2) / 3
    diffs = [3 / 4 - 1 / mu_t, 4 / 4 - 1 / mu_t, 5 / 4 - SQRT2 / mu_t]
    assert rkd_distance_loss(STUDENT, TEACHER).item() == pytest.approx(sum(huber(d) for d in diffs) / 3)
    # 4 points: student three at the origin and one at (1,0): pair distances (01,02,03,12,13,23)
    # = (0,0,1,0,1,1), mean 1/2 -> psi_s = (0,0,2,0,2,2). Teacher unit square (0,0),(1,0),(0,1),(1,1):
    # (1,1,sqrt2,sqrt2,1,1), mean (4 + 2 sqrt2)/6. Diffs -0.88, -0.88, 0.76, -1.24, 1.12, 1.12:
    # three in the linear part of the Huber loss.
    student, teacher = t([[0, 0], [0, 0], [0, 0], [1, 0]]), t([[0, 0], [1, 0], [0, 1], [1, 1]])
    mu = (4 + 2 * SQRT2) / 6
    psi_t = [1 / mu, 1 / mu, SQRT2 / mu, SQRT2 / mu, 1 / mu, 1 / mu]
    diffs = [s - q for s, q in zip([0, 0, 2, 0, 2, 2], psi_t, strict=True)]
    assert sum(abs(d) > 1 for d in diffs) == 3
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(sum(huber(d) for d in diffs) / 6)


def test_rkd_angle_hand_case_and_chunking():
    # Right triangle angles (cos at vertex 0, 1, 2): 0, 9/15 = 0.6, 16/20 = 0.8; teacher: 0, 1/sqrt2, 1/sqrt2.
    # Each angle appears in 2 of the 6 ordered triplets, so the mean over triplets = mean over vertices.
    expected = (huber(0.6 - 1 / SQRT2) + huber(0.8 - 1 / SQRT2)) / 3
    assert rkd_angle_loss(STUDENT, TEACHER).item() == pytest.approx(expected)
    # Student (0,0),(2,0),(1,1): cos 1/sqrt2, 1/sqrt2, 0; collinear teacher (0,0),(1,0),(-1,0): -1, 1, 1.
    # Differences 1.707 (linear Huber), -0.293, -1 (Huber 0.5 either way).
    student, teacher = t([[0, 0], [2, 0], [1, 1]]), t([[0, 0], [1, 0], [-1, 0]])
    expected = (huber(1 / SQRT2 + 1) + huber(1 / SQRT2 - 1) + huber(-1.0)) / 3
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(expected)
    # Chunked over anchors (checkpointed) = all at once, value and gradient.
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 4, dtype=torch.float64)
    whole = rkd_angle_loss(x, y)
    (grad_whole,) = torch.autograd.grad(whole, x)
    parts = rkd_angle_loss(x, y, anchor_chunk=2)
    (grad_parts,) = torch.autograd.grad(parts, x)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)
    assert torch.allclose(grad_parts, grad_whole, rtol=1e-10, atol=1e-12)


# --- the objective's gradient on 2 ranks = on 1 rank holding both halves -------------------
class FixedTeacher:
    """Teacher embeddings from a table, by sample key (the objective is what is under test)."""

    embedding_dim = 8

    def __init__(self, table: torch.Tensor):
        self.table = table

    def embed(self, images, keys):
        return self.table[torch.tensor([int(k) for k in keys])]


def objective_gradient(rows: list[int], world: int) -> torch.Tensor:
    """Gradient of every-loss-on objective w.r.t. a shared linear layer W, averaged over
    ranks as DDP would; embeddings = normalize(X[rows] @ W)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    table, labels = F.normalize(torch.randn(12, 8, generator=g), dim=1), torch.randint(0, 5, (12,), generator=g)
    w.requires_grad_(True)
    config = DMLConfig.model_validate(
        {
            "loss": {"scale": 8.0},
            "distill": {
                "student": {"embedding_dim": 8},
                "absolute_weight": 1.0,
                "relative_weight": 0.5,
                "rkd_distance_weight": 1.0,
                "rkd_angle_weight": 1.0,
                "label_weight": 0.3,
            },
        }
    )
    objective = DistillObjective(config, 5, torch.device("cpu"), FixedTeacher(table))
    loss, _ = objective(F.normalize(x[rows] @ w, dim=1).float(), labels[rows], keys=[str(i) for i in rows])
    loss.backward()
    assert w.grad is not None
    grad = w.grad.clone()
    if world > 1:
        torch.distributed.all_reduce(grad)
    return grad / world


def half_batch_worker(info):
    return objective_gradient(list(range(6 * info.rank, 6 * info.rank + 6)), info.world_size)


@pytest.mark.dist
def test_two_rank_gradient_equals_single_process():
    # absolute: per-rank means; relational: global batch; label: partial FC sharded over ranks.
    single = objective_gradient(list(range(12)), 1)
    for grad in spawn_local_group(half_batch_worker, 2):
        assert torch.allclose(grad, single, rtol=1e-4, atol=1e-6)


# --- a teacher, its cache --------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """Tiny shards and a 2-step teacher with a checkpoint (its class centres are needed)."""
    from dml.train.run import run_train
    from train_fixtures import tiny_shards, tiny_train_config

    root = tmp_path_factory.mktemp("distill")
    shards = tiny_shards(root)
    base = tiny_train_config(shards, root / "teacher", train={"max_steps": 2, "checkpoint_every": 100})
    run_train(DMLConfig.model_validate(base))
    return shards, root / "teacher", base


def distill_config(base: dict, teacher: Path, run_dir: Path, **distill) -> dict:
    config = json.loads(json.dumps(base))
    config["train"].update(max_steps=3, checkpoint_every=100)
    config["distill"] = {
        "teacher": str(teacher),
        "run_dir": str(run_dir),
        "student": {"backbone": "mobilenetv3_small_050"},
        **distill,
    }
    return config


def teacher_view_embedding(model, data, shard_dir: Path, key: str) -> np.ndarray:
    """The teacher's flip-averaged embedding of one training image, computed directly."""
    from PIL import Image

    from dml.data.manifest import load_manifest, split_shards
    from dml.data.reading import IMAGE_PARTS as IMAGE_KEYS
    from dml.data.tar_members import iter_tar_samples
    from dml.data.transforms import build_eval_transform

    manifest = load_manifest(shard_dir)
    for url in split_shards(manifest, shard_dir, "train"):
        for sample in iter_tar_samples(url):
            if sample["__key__"] == key:
                raw = next(sample[k] for k in IMAGE_KEYS if k in sample)
                image = build_eval_transform(data)(Image.open(io.BytesIO(raw))).unsqueeze(0)
                with torch.no_grad():
                    return F.normalize(model(image) + model(torch.flip(image, dims=[3])), dim=1)[0].numpy()
    raise KeyError(key)


def test_cache_reused_and_rebuilt_when_stale(teacher_run, tmp_path):
    from dml.data.manifest import load_manifest
    from dml.distill.teacher import describe_teacher
    from dml.distill.teacher_cache import cache_dir, cache_meta, ensure_teacher_cache
    from dml.models.model_file import load_final_model, save_final_model

    shards_src, teacher_dir, base = teacher_run
    shards = Path(shutil.copytree(shards_src, tmp_path / "shards"))
    data = DMLConfig.model_validate({**base, "data": {**base["data"], "shard_dir": str(shards)}}).data
    record = describe_teacher(teacher_dir)
    first = ensure_teacher_cache(record, data, torch.device("cpu"))
    count = load_manifest(shards)["splits"]["train"]["count"]
    assert first.rebuilt and first.vectors.shape == (count, 16)
    assert first.directory.parent == shards / "teacher_cache" and first.directory.name.startswith(record.sha256[:16])
    model, _ = load_final_model(teacher_dir)
    key = str(first.keys[5])
    assert np.allclose(first.lookup([key])[0], teacher_view_embedding(model, record.data, shards, key), atol=1e-5)
    with pytest.raises(Exception, match="not in the teacher cache"):
        first.lookup(["no-such-key"])
    written = (first.directory / "vectors.npy").stat().st_mtime_ns

    again = ensure_teacher_cache(record, data, torch.device("cpu"))
    assert not again.rebuilt and (again.directory / "vectors.npy").stat().st_mtime_ns == written

    # Other teacher weights: another sha256, another cache, different vectors.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other_dir = tmp_path / "teacher2"
    other_dir.mkdir()
    save_final_model(model, DMLConfig.model_validate(base), other_dir / "model.pt", data_digest="x")
    other = ensure_teacher_cache(describe_teacher(other_dir), data, torch.device("cpu"))
    assert other.rebuilt and other.directory != first.directory
    assert not np.allclose(other.lookup([key]), first.lookup([key]))

    # A damaged cache under the expected name is rebuilt, not used.
    meta = json.loads((first.directory / "meta.json").read_text())
    (first.directory / "meta.json").write_text(json.dumps({**meta, "manifest_sha256": "0" * 64}))
    assert ensure_teacher_cache(record, data, torch.device("cpu")).rebuilt

    # Other data (any change of manifest.json): another cache.
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "note": "re-prepared"}))
    changed = ensure_teacher_cache(record, data, torch.device("cpu"))
    assert changed.rebuilt and changed.directory != first.directory
    assert cache_dir(shards, cache_meta(record, data)) == changed.directory


# --- runs -------------------------------------------------------------------------------------
def test_single_process_every_loss_on_the_fly(teacher_run, tmp_path):
    from dml.distill.run import run_distill
    from dml.errors import ConfigError
    from dml.files import sha256_file
    from dml.models.model_file import load_final_model
    from dml.train.checkpoint import latest_checkpoint, read_head_rows
    from dml.train.metrics_log import read_metrics

    _shards, teacher_dir, base = teacher_run
    config = DMLConfig.model_validate(
        distill_config(
            base,
            teacher_dir,
            tmp_path / "student",
            teacher_embeddings="on_the_fly",
            absolute_weight=1.0,
            absolute_kind="l2",
            relative_weight=0.5,
            rkd_distance_weight=1.0,
            rkd_angle_weight=2.0,
            label_weight=0.1,
            init_head_from_teacher=True,
            freeze_head=True,
        )
    )
    result = run_distill(config)
    assert result.steps == 3
    records = [r for r in read_metrics(tmp_path / "student") if "loss_main" in r]
    names = ("absolute", "relative", "rkd_distance", "rkd_angle", "label")
    for r in records:
        assert all(math.isfinite(r[f"loss_{n}"]) and r[f"loss_{n}"] >= 0 for n in names)
        weighted = (
            r["loss_absolute"]
            + 0.5 * r["loss_relative"]
            + r["loss_rkd_distance"]
            + 2 * r["loss_rkd_angle"]
            + 0.1 * r["loss_label"]
        )
        assert r["loss_main"] == pytest.approx(weighted, rel=1e-5)
    student, payload = load_final_model(tmp_path / "student")
    assert student.embedding_dim == 16 and payload["model"]["backbone"] == "mobilenetv3_small_050"
    assert payload["teacher"]["sha256"] == sha256_file(teacher_dir / "model.pt")
    # Frozen head initialised from the teacher's centres: unchanged after training.
    teacher_head = read_head_rows(latest_checkpoint(teacher_dir))
    assert torch.equal(read_head_rows(latest_checkpoint(tmp_path / "student")), teacher_head)
    with pytest.raises(ConfigError, match="teacher embeds in 16 dims"):
        bad = distill_config(base, teacher_dir, tmp_path / "bad")
        bad["distill"]["student"]["embedding_dim"] = 32
        run_distill(DMLConfig.model_validate(bad))


@pytest.mark.dist
def test_two_process_cached_run(teacher_run, tmp_path):
    from dml.distill.teacher import describe_teacher
    from dml.distill.teacher_cache import ensure_teacher_cache
    from dml.eval.embed import extract_embeddings
    from dml.files import sha256_file
    from dml.models.model_file import load_final_model
    from dml.train.checkpoint import STATE, latest_checkpoint
    from train_fixtures import ROOT, write_config

    shards_src, teacher_dir, base = teacher_run
    shards = Path(shutil.copytree(shards_src, tmp_path / "shards"))
    config = distill_config(
        {**base, "data": {**base["data"], "shard_dir": str(shards)}},
        teacher_dir,
        tmp_path / "student",
        teacher_embeddings="cached",
        rkd_distance_weight=1.0,
        label_weight=0.1,
    )
    path = write_config(tmp_path / "distill.yaml", config)
    cmd = torchrun_dml(2, "distill", "--config", str(path))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = torch.load(latest_checkpoint(tmp_path / "student") / STATE, weights_only=False)
    assert saved["world_size"] == 2 and saved["train_state"]["step"] == 3
    _, payload = load_final_model(tmp_path / "student")
    assert payload["teacher"]["sha256"] == sha256_file(teacher_dir / "model.pt")
    # The cache both ranks built equals a single-process extraction of the split.
    cfg = DMLConfig.model_validate(config)
    cache = ensure_teacher_cache(describe_teacher(teacher_dir), cfg.data, torch.device("cpu"))
    assert not cache.rebuilt
    model, _ = load_final_model(teacher_dir)
    direct = extract_embeddings(model, cfg.data, "train", torch.device("cpu"), flip=True)
    assert list(cache.keys) == direct.keys
    assert np.allclose(np.asarray(cache.vectors), direct.vectors, atol=1e-5)
