"""Benchmark: metric-learning losses on Omniglot, zero-shot retrieval (issue 3).

Claim checked: with one small CNN, one optimizer-step budget and the very same P x K batches,
how the losses of `dml.losses` rank on classes never seen in training, and that dml's
ArcFace lands where pytorch-metric-learning's ``ArcFaceLoss`` lands on the same setup.

Protocol ("metric learning reality check" style zero-shot split):
- train on the 964 background characters (``images_background.npz``, 20 drawings each),
  evaluate on the 659 evaluation characters (``images_evaluation.npz``), disjoint classes;
- metrics: `dml.eval.retrieval_metrics(embeddings, labels)` with gallery None, i.e.
  leave-one-out over the 13,180 evaluation images (a query never retrieves itself, R = 19):
  precision@1, MAP@R (and R-precision);
- images: the bool arrays (True = white paper) are inverted so strokes are 1, downsampled
  once from 105x105 to ``--size`` (area averaging), kept in memory as uint8, and normalised
  with the background set's pixel mean / std. No augmentation.
- model: ``dml.models.build_embedding_model(BACKBONE, 128, "avg", in_chans=1)``, default
  timm ``test_resnet`` (a 0.39M-parameter ResNet: deep stem, four stages of one block,
  widths 32-48-48-96), random init, the same initial weights for every loss (seeded);
- batches: P=32 characters x K=4 drawings = 128 images, drawn once from a seeded generator
  and replayed identically for every loss; ``--steps`` optimizer steps (default 300, about
  2 epochs of the background set);
- optimizer: Adam, lr 1e-3 for the network, 1e-2 for class centres (margin heads only),
  no weight decay, cosine decay of both to 0 over the steps, float32.

Hyperparameters (published defaults, not tuned per loss; s=30 for every margin head):
- ArcFace (Deng et al. 2019): s=30, m=0.3 rad, through `dml.losses.MarginHead` (full FC
  over the 964 training classes; the batch's labels pick the target columns).
- CosFace (Wang et al. 2018): s=30, m=0.35 (the paper's m).
- SphereFace (Liu et al. 2017), normalised as in the ArcFace paper's comparison: s=30,
  m=1.35 (the paper's m=4 needs its lambda annealing on unnormalised features).
- PML ArcFace: ``pytorch_metric_learning.losses.ArcFaceLoss(964, 128,
  margin=degrees(0.3)=17.19, scale=30)``, i.e. the same s and m as dml's ArcFace.
  All four heads start from the same (964, 128) N(0, 1) centre matrix (PML stores its
  transpose), so only the loss differs between dml ArcFace and PML ArcFace.
- triplet: `TripletMarginLoss(margin=0.2, mining="semihard")` (FaceNet's semi-hard mining,
  Schroff et al. 2015; unsquared distance between normalised embeddings).
- contrastive: `ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)` (Hadsell et al. 2006).
- multi-similarity: `MultiSimilarityLoss(alpha=2, beta=50, base=0.5)` with
  `MultiSimilarityMiner(epsilon=0.1)` (Wang et al. 2019).

Timing: the machine has 2 cores shared with other jobs (load average 3-10 while this was
written). Under that load one intra-op thread measured 3-7x faster per step than two
(threads of one process wait on each other when the cores are oversubscribed), so
``--threads`` defaults to 1; pass 2 on an idle machine. Channels-last tensors made a step
~30% faster. The 300-step default keeps the whole run near 10-15 minutes at that load (the
limit is 20). Each loss's training and evaluation times, the total (from process start, so
imports and data loading count) and the load average are recorded. A reference row
"untrained" evaluates the randomly initialised network.

Short budgets favour losses that converge fast. The margin heads learn 964 class centres,
each of which is the target of only ~10 batches in 300 steps, so they lag the pair losses
here: with these settings ArcFace measured P@1 0.09 at 300 steps (0.08 at 250, training
loss ~14.8 and still falling) but 0.43 at 1000 steps, above triplet / multi-similarity at
300 (0.35 / 0.37). A normalised softmax without margin (s=30 or s=10) decreased just as
slowly, and dml's and PML's ArcFace agree, so this is the budget, not a margin bug. Compare
losses at one budget only. Usage:
    python benchmarks/losses_omniglot.py [--steps 300] [--quick] [--losses arcface triplet]
``--quick`` (20 steps, 50 evaluation characters, prints only) checks the script end to end.
"""

from __future__ import annotations

import time
from typing import Any

PROCESS_START = time.perf_counter()  # before the heavy imports: the total covers them too

import argparse
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dml.eval import retrieval_metrics
from dml.losses import (
    ArcFace,
    ContrastiveLoss,
    CosFace,
    MarginHead,
    MultiSimilarityLoss,
    MultiSimilarityMiner,
    SphereFace,
    TripletMarginLoss,
)
from dml.models import build_embedding_model

RESULTS = ROOT / "benchmarks" / "results" / "losses_omniglot.json"
DATA_DIR = ROOT.parent / "shared" / "data" / "omniglot"
DRAWINGS_PER_CLASS = 20
EMBEDDING_DIM = 128
MARGIN_SCALE = 30.0
ARCFACE_MARGIN = 0.3
NETWORK_LR, CENTRE_LR = 1e-3, 1e-2
EVAL_BATCH = 1024

HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "arcface": {"s": MARGIN_SCALE, "m": ARCFACE_MARGIN},
    "cosface": {"s": MARGIN_SCALE, "m": 0.35},
    "sphereface": {"s": MARGIN_SCALE, "m": 1.35},
    "pml_arcface": {"scale": MARGIN_SCALE, "margin_degrees": round(math.degrees(ARCFACE_MARGIN), 4)},
    "triplet_semihard": {"margin": 0.2, "mining": "semihard"},
    "contrastive": {"pos_margin": 0.0, "neg_margin": 1.0},
    "multi_similarity": {"alpha": 2.0, "beta": 50.0, "base": 0.5, "miner_epsilon": 0.1},
}
LOSS_NAMES = tuple(HYPERPARAMETERS)
MARGIN_HEADS = {"arcface": ArcFace, "cosface": CosFace, "sphereface": SphereFace}


def load_split(path: Path, size: int, max_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an Omniglot npz; return uint8 images (N, 1, size, size), strokes bright, and
    int64 labels (N,) = the character's row in the file. N = classes x 20."""
    if not path.is_file():
        raise ValueError(f"Omniglot file not found: {path} (see /work/shared/data/README.md)")
    with np.load(path) as archive:
        images = archive["images"]
    if images.ndim != 4 or images.shape[1] != DRAWINGS_PER_CLASS or images.dtype != bool:
        raise ValueError(f"{path}: expected a bool array (classes, 20, H, W), got {images.dtype} {images.shape}")
    if max_classes is not None:
        images = images[:max_classes]
    classes = images.shape[0]
    flat = images.reshape(classes * DRAWINGS_PER_CLASS, 1, *images.shape[2:])
    out = torch.empty(len(flat), 1, size, size, dtype=torch.uint8)
    for start in range(0, len(flat), 2048):  # chunks keep the float copy small
        strokes = torch.from_numpy(~flat[start : start + 2048]).float()
        small = F.interpolate(strokes, size=(size, size), mode="area")
        out[start : start + 2048] = (small * 255).round().to(torch.uint8)
    labels = torch.arange(classes).repeat_interleave(DRAWINGS_PER_CLASS)
    return out, labels


def make_batches(num_classes: int, steps: int, p: int, k: int, seed: int) -> torch.Tensor:
    """(steps, p * k) row indices into the training images: per step p distinct characters,
    k distinct drawings of each, grouped by character."""
    if p > num_classes or k > DRAWINGS_PER_CLASS:
        raise ValueError(f"P={p} / K={k} exceed {num_classes} classes / {DRAWINGS_PER_CLASS} drawings")
    rng = np.random.default_rng(seed)
    batches = np.empty((steps, p * k), dtype=np.int64)
    for step in range(steps):
        classes = rng.choice(num_classes, size=p, replace=False)
        drawings = np.stack([rng.choice(DRAWINGS_PER_CLASS, size=k, replace=False) for _ in range(p)])
        batches[step] = (classes[:, None] * DRAWINGS_PER_CLASS + drawings).reshape(-1)
    return torch.from_numpy(batches)


class PmlArcFace(nn.Module):
    """pytorch-metric-learning's ArcFaceLoss behind the ``(embeddings, labels) -> loss`` call,
    with its (D, C) weight set to the transpose of the given (C, D) centres."""

    def __init__(self, centres: torch.Tensor):
        super().__init__()
        from pytorch_metric_learning.losses import ArcFaceLoss  # baseline only

        classes, dim = centres.shape
        params = HYPERPARAMETERS["pml_arcface"]
        self.loss = ArcFaceLoss(classes, dim, margin=params["margin_degrees"], scale=params["scale"])
        with torch.no_grad():
            self.loss.W.copy_(centres.t())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels)


def build_criterion(name: str, num_classes: int, centres: torch.Tensor) -> nn.Module:
    """The loss module for ``name``; margin heads start from a copy of ``centres`` (C, D)."""
    params = HYPERPARAMETERS[name]
    if name in MARGIN_HEADS:
        head = MarginHead(EMBEDDING_DIM, num_classes, MARGIN_HEADS[name](s=params["s"], m=params["m"]))
        with torch.no_grad():
            head.weight.copy_(centres)
        return head
    if name == "pml_arcface":
        return PmlArcFace(centres)
    if name == "triplet_semihard":
        return TripletMarginLoss(margin=params["margin"], mining=params["mining"])
    if name == "contrastive":
        return ContrastiveLoss(pos_margin=params["pos_margin"], neg_margin=params["neg_margin"])
    if name == "multi_similarity":
        miner = MultiSimilarityMiner(epsilon=params["miner_epsilon"])
        return MultiSimilarityLoss(alpha=params["alpha"], beta=params["beta"], base=params["base"], miner=miner)
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")


def build_model(args: argparse.Namespace) -> nn.Module:
    """The embedding network, seeded so every loss starts from the same weights."""
    torch.manual_seed(args.seed)
    model = build_embedding_model(args.backbone, EMBEDDING_DIM, "avg", in_chans=1, input_size=args.size)
    return model.to(memory_format=torch.channels_last)  # ~30% faster steps on this CPU


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> float32 standardised, channels-last like the model."""
    return ((images.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)


def train(name: str, args: argparse.Namespace, data: dict, batches: torch.Tensor) -> tuple[nn.Module, float]:
    """Train a fresh model with loss ``name`` on ``batches``; return it and the mean loss
    over the last 10% of the steps."""
    model = build_model(args)
    centres = torch.randn(data["num_classes"], EMBEDDING_DIM, generator=torch.Generator().manual_seed(args.seed + 1))
    criterion = build_criterion(name, data["num_classes"], centres)
    groups = [{"params": list(model.parameters()), "lr": NETWORK_LR}]
    if list(criterion.parameters()):
        groups.append({"params": list(criterion.parameters()), "lr": CENTRE_LR})
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(batches))
    model.train()
    tail = max(1, len(batches) // 10)
    losses: list[float] = []
    for rows in batches:
        images = normalise(data["train_images"][rows], data["mean"], data["std"])
        loss = criterion(model(images), data["train_labels"][rows])
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite loss {loss.item()} at step {len(losses)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return model, float(np.mean(losses[-tail:]))


@torch.no_grad()
def evaluate(model: nn.Module, data: dict) -> dict:
    """Leave-one-out retrieval metrics of the model's embeddings of the evaluation set."""
    model.eval()
    images = data["eval_images"]
    embeddings = torch.cat(
        [
            model(normalise(images[start : start + EVAL_BATCH], data["mean"], data["std"]))
            for start in range(0, len(images), EVAL_BATCH)
        ]
    )
    metrics = retrieval_metrics(embeddings.numpy(), data["eval_labels"].numpy(), ks=(1,))
    return {key: float(metrics[key]) for key in ("precision_at_1", "map_at_r", "r_precision")}


def timed(function: Callable, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def run_loss(name: str, args: argparse.Namespace, data: dict, batches: torch.Tensor) -> dict:
    (model, final_loss), train_seconds = timed(train, name, args, data, batches)
    metrics, eval_seconds = timed(evaluate, model, data)
    row = {
        "loss": name,
        **metrics,
        "final_loss": final_loss,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "hyperparameters": HYPERPARAMETERS[name],
    }
    print(
        f"{name:18s} P@1 {metrics['precision_at_1']:.4f}  MAP@R {metrics['map_at_r']:.4f}  "
        f"train {train_seconds:6.1f}s ({train_seconds / len(batches):.3f}s/step)  eval {eval_seconds:5.1f}s",
        flush=True,
    )
    return row


def load_data(args: argparse.Namespace) -> dict:
    eval_classes = 50 if args.quick else None
    train_images, train_labels = load_split(args.data_dir / "images_background.npz", args.size)
    eval_images, eval_labels = load_split(args.data_dir / "images_evaluation.npz", args.size, eval_classes)
    pixels = train_images.float() / 255.0
    return {
        "train_images": train_images,
        "train_labels": train_labels,
        "eval_images": eval_images,
        "eval_labels": eval_labels,
        "num_classes": int(train_labels.max()) + 1,
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
    }


def print_table(rows: list[dict]) -> None:
    print("\n| loss | P@1 | MAP@R | R-precision | train s | eval s |\n|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['loss']} | {row['precision_at_1']:.4f} | {row['map_at_r']:.4f} | "
            f"{row['r_precision']:.4f} | {row['train_seconds']} | {row['eval_seconds']} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per loss (default 300; 20 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="20 steps, 50 evaluation characters, no JSON")
    parser.add_argument("--losses", nargs="+", default=list(LOSS_NAMES), choices=LOSS_NAMES)
    parser.add_argument("--backbone", default="test_resnet", help="timm model name")
    parser.add_argument("--size", type=int, default=28, help="image side after downsampling")
    parser.add_argument("--p", type=int, default=32, help="characters per batch")
    parser.add_argument("--k", type=int, default=4, help="drawings per character per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--output", type=Path, default=None, help=f"JSON path (default {RESULTS}; none with --quick)")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (20 if args.quick else 300)
    if args.steps < 1 or args.size < 8 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1 and --size >= 8")
    if args.output is None and not args.quick:
        args.output = RESULTS
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = PROCESS_START
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    data, load_seconds = timed(load_data, args)
    batches = make_batches(data["num_classes"], args.steps, args.p, args.k, args.seed)
    print(
        f"data: {len(data['train_images'])} train / {len(data['eval_images'])} eval images at "
        f"{args.size}x{args.size}, loaded in {load_seconds:.1f}s; {args.steps} steps of "
        f"{args.p}x{args.k}; {args.threads} thread(s)",
        flush=True,
    )
    reference, reference_seconds = timed(evaluate, build_model(args), data)
    print(
        f"{'untrained':18s} P@1 {reference['precision_at_1']:.4f}  MAP@R {reference['map_at_r']:.4f}  "
        f"eval {reference_seconds:5.1f}s",
        flush=True,
    )
    rows = [{"loss": "untrained", **reference, "train_seconds": 0.0, "eval_seconds": round(reference_seconds, 1)}]
    for name in args.losses:
        loss_start = time.perf_counter()
        rows.append(run_loss(name, args, data, batches))
        print(
            f"  {name}: {time.perf_counter() - loss_start:.1f}s, total so far {time.perf_counter() - started:.1f}s",
            flush=True,
        )
    total = time.perf_counter() - started
    print_table(rows)
    print(f"\ntotal {total:.1f}s ({total / 60:.1f} min)")
    if args.output is not None:
        write_results(args, data, rows, total, load_start)


def write_results(
    args: argparse.Namespace, data: dict, rows: list[dict], total: float, load_start: tuple[float, float, float]
) -> None:
    import pytorch_metric_learning
    import timm

    model = build_model(args)
    result = {
        "command": " ".join(["python", "benchmarks/losses_omniglot.py", *sys.argv[1:]]),
        "protocol": "train on images_background (964 characters), leave-one-out retrieval on "
        "images_evaluation (659 characters x 20), dml.eval.retrieval_metrics",
        "model": {
            "backbone": args.backbone,
            "embedding_dim": EMBEDDING_DIM,
            "pooling": "avg",
            "in_chans": 1,
            "input_size": args.size,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "budget": {
            "steps": args.steps,
            "p": args.p,
            "k": args.k,
            "batch_size": args.p * args.k,
            "optimizer": "adam",
            "network_lr": NETWORK_LR,
            "centre_lr": CENTRE_LR,
            "lr_schedule": "cosine to 0",
            "weight_decay": 0.0,
            "augmentation": "none",
        },
        "seeds": {"model_init": args.seed, "centre_init": args.seed + 1, "batches": args.seed},
        "normalisation": {"mean": data["mean"], "std": data["std"]},
        "eval_images": len(data["eval_images"]),
        "threads": args.threads,
        "results": rows,
        "total_seconds": round(total, 1),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "pytorch_metric_learning": pytorch_metric_learning.__version__,
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
