"""Benchmark: the landmark recipe's margins on Omniglot zero-shot (issue 16).

Claim checked: at the budget of the ArcFace baseline of benchmarks/losses_omniglot.py, what
sub-center ArcFace (k = 3 centres per class) and sub-center + dynamic (per-class) margins
change in MAP@R and P@1 against plain ArcFace, all three trained through `PartialFC` (one
process, sample rate 1) exactly as `dml train` runs its head.

Protocol (losses_omniglot's, except for the long tail below):
- train on the background characters, leave-one-out retrieval on the 659 evaluation
  characters x 20 drawings with `dml.eval.retrieval_metrics` (R = 19);
- model: timm ``test_resnet``, 28 px, 128-d, avg pooling, the same seeded initial weights;
- budget: 300 optimizer steps of P=32 characters x K=4 drawings, batches drawn once and
  replayed for every row; Adam(W) lr 1e-3 for the network and 1e-2 for the centres (the
  head's row-sparse AdamW, no weight decay), cosine decay to 0; s=30; centres start
  N(0, 1) as in the baseline, the sub-centre rows drawn from the same seed;
- long tail: Omniglot has 20 drawings of every character, where dynamic margins are one
  constant (every class gets m_max). As in landmark data, the training set is made
  long-tailed: character c keeps ``round(20 * (4 / 20) ** (rank / 963))`` drawings, ranks in
  a seeded random order (geometric from 20 down to 4, median 9); K=4 draws from what is
  kept. The evaluation set is untouched.
- margins: plain and sub-center ArcFace m = 0.3 (the baseline's); dynamic margins from the
  kept counts with `dynamic_margins(counts, m_min=0.2, m_max=0.4, power=0.25)`, so the
  margins straddle 0.3.

Outputs: a table on stdout; JSON in benchmarks/results/landmark_omniglot.json; each trained
model's weights (``<row>.pt``: state_dict and build arguments) and its evaluation embeddings
(``<row>.npz``: ``vectors`` (13180, 128) float32, ``labels``), for benchmarks/reranking.py's
``--embeddings``, in ``--save-dir`` (default ../landmark_omniglot_models beside the repo);
the JSON lists their paths.

Usage: python benchmarks/landmark_omniglot.py [--steps 300] [--threads 1] [--quick]
``--quick``: 20 steps, 50 evaluation characters, no JSON (checks the script end to end).
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import losses_omniglot as base

from dml.eval import retrieval_metrics
from dml.losses import ArcFace, PartialFC, dynamic_margins

RESULTS = ROOT / "benchmarks" / "results" / "landmark_omniglot.json"
SAVE_DIR = ROOT.parent / "landmark_omniglot_models"
MIN_KEPT = 4  # K: a character must have K drawings to fill its place in a batch
MARGIN, DYNAMIC = 0.3, {"m_min": 0.2, "m_max": 0.4, "power": 0.25}
ROWS = {  # row -> (sub-centres, dynamic margins)
    "arcface": (1, False),
    "subcenter_arcface": (3, False),
    "subcenter_dynamic_arcface": (3, True),
}


def long_tail_counts(num_classes: int, seed: int) -> np.ndarray:
    """Drawings kept per character: round(20 * (4 / 20) ** (rank / (C - 1))), ranks in seeded
    random order: geometric from 20 down to 4."""
    rank = np.random.default_rng(seed).permutation(num_classes) / max(1, num_classes - 1)
    top = base.DRAWINGS_PER_CLASS
    return np.round(top * (MIN_KEPT / top) ** rank).astype(np.int64)


def make_batches(counts: np.ndarray, steps: int, p: int, k: int, seed: int) -> torch.Tensor:
    """(steps, p * k) rows into the full background arrays: p distinct characters per step,
    k distinct drawings of each among the first ``counts[c]`` (the kept ones)."""
    rng = np.random.default_rng(seed)
    batches = np.empty((steps, p * k), dtype=np.int64)
    for step in range(steps):
        classes = rng.choice(len(counts), size=p, replace=False)
        drawings = np.stack([rng.choice(counts[c], size=k, replace=False) for c in classes])
        batches[step] = (classes[:, None] * base.DRAWINGS_PER_CLASS + drawings).reshape(-1)
    return torch.from_numpy(batches)


def build_head(row: str, num_classes: int, counts: np.ndarray, seed: int) -> PartialFC:
    k, dynamic = ROWS[row]
    margins = dynamic_margins(counts.tolist(), **DYNAMIC) if dynamic else None
    head = PartialFC(
        base.EMBEDDING_DIM,
        num_classes,
        ArcFace(s=base.MARGIN_SCALE, m=MARGIN),
        sub_centers=k,
        class_margins=margins,
        seed=seed,
    )
    centres = torch.randn(num_classes * k, base.EMBEDDING_DIM, generator=torch.Generator().manual_seed(seed + 1))
    state = head.full_state_dict()
    assert state is not None  # one process
    head.load_full_state_dict({**state, "weight": centres})
    return head


def train(row: str, args: argparse.Namespace, data: dict, batches: torch.Tensor, counts: np.ndarray):
    model = base.build_model(args)
    head = build_head(row, data["num_classes"], counts, args.seed)
    network = torch.optim.Adam(model.parameters(), lr=base.NETWORK_LR)
    centres = head.configure_optimizer("adamw", lr=base.CENTRE_LR, momentum=0.9, weight_decay=0.0)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=len(batches)) for o in (network, centres)]
    model.train()
    losses: list[float] = []
    for rows in batches:
        images = base.normalise(data["train_images"][rows], data["mean"], data["std"])
        loss = head(model(images), data["train_labels"][rows])
        if not torch.isfinite(loss):
            raise RuntimeError(f"{row}: non-finite loss {loss.item()} at step {len(losses)}")
        network.zero_grad(set_to_none=True)
        centres.zero_grad(set_to_none=True)
        loss.backward()
        network.step()
        centres.step()
        for schedule in schedules:
            schedule.step()
        losses.append(loss.item())
    return model, float(np.mean(losses[-max(1, len(batches) // 10) :]))


@torch.no_grad()
def embed(model: torch.nn.Module, data: dict) -> np.ndarray:
    model.eval()
    images = data["eval_images"]
    return torch.cat(
        [
            model(base.normalise(images[i : i + base.EVAL_BATCH], data["mean"], data["std"]))
            for i in range(0, len(images), base.EVAL_BATCH)
        ]
    ).numpy()


def run_row(row: str, args: argparse.Namespace, data: dict, batches: torch.Tensor, counts: np.ndarray) -> dict:
    (model, final_loss), train_seconds = base.timed(train, row, args, data, batches, counts)
    vectors, eval_seconds = base.timed(embed, model, data)
    metrics = retrieval_metrics(vectors, data["eval_labels"].numpy(), ks=(1,))
    result = {
        "row": row,
        "sub_centers": ROWS[row][0],
        "dynamic_margins": ROWS[row][1],
        **{key: float(metrics[key]) for key in ("precision_at_1", "map_at_r", "r_precision")},
        "final_loss": final_loss,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
    }
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        weights, embeddings = args.save_dir / f"{row}.pt", args.save_dir / f"{row}.npz"
        torch.save(
            {
                "state_dict": model.state_dict(),
                "build": {
                    "backbone": args.backbone,
                    "embedding_dim": base.EMBEDDING_DIM,
                    "pooling": "avg",
                    "in_chans": 1,
                    "input_size": args.size,
                },
                "normalisation": {"mean": data["mean"], "std": data["std"]},
            },
            weights,
        )
        np.savez(embeddings, vectors=vectors.astype(np.float32), labels=data["eval_labels"].numpy())
        result.update(model_path=str(weights), embeddings_path=str(embeddings))
    print(
        f"{row:26s} P@1 {result['precision_at_1']:.4f}  MAP@R {result['map_at_r']:.4f}  "
        f"loss {final_loss:.3f}  train {train_seconds:6.1f}s  eval {eval_seconds:5.1f}s",
        flush=True,
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per row (default 300; 20 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="20 steps, 50 evaluation characters, no JSON")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-dir", type=Path, default=None, help=f"models and embeddings (default {SAVE_DIR})")
    parser.add_argument("--output", type=Path, default=None, help=f"JSON path (default {RESULTS})")
    args = parser.parse_args(argv)
    args.backbone, args.size, args.p, args.k, args.data_dir = "test_resnet", 28, 32, 4, base.DATA_DIR
    args.steps = args.steps if args.steps is not None else (20 if args.quick else 300)
    if not args.quick:
        args.output = args.output or RESULTS
        args.save_dir = args.save_dir or SAVE_DIR
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    data = base.load_data(args)
    counts = long_tail_counts(data["num_classes"], args.seed)
    batches = make_batches(counts, args.steps, args.p, args.k, args.seed)
    print(
        f"long tail: {int(counts.sum())} of {len(data['train_images'])} background images kept "
        f"({counts.min()}-{counts.max()} per character, median {int(np.median(counts))}); "
        f"{args.steps} steps of {args.p}x{args.k}; {args.threads} thread(s)",
        flush=True,
    )
    rows = [run_row(row, args, data, batches, counts) for row in args.rows]
    total = time.perf_counter() - PROCESS_START
    print("\n| row | P@1 | MAP@R | R-precision | train s |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['row']} | {r['precision_at_1']:.4f} | {r['map_at_r']:.4f} | {r['r_precision']:.4f} | "
            f"{r['train_seconds']} |"
        )
    print(f"\ntotal {total:.1f}s")
    if args.output is None:
        return
    result = {
        "command": " ".join(["python", "benchmarks/landmark_omniglot.py", *sys.argv[1:]]),
        "protocol": __doc__.split("Protocol", 1)[1].split("Outputs:", 1)[0].strip(),
        "budget": {
            "steps": args.steps,
            "p": args.p,
            "k": args.k,
            "network_lr": base.NETWORK_LR,
            "centre_lr": base.CENTRE_LR,
            "scale": base.MARGIN_SCALE,
            "margin": MARGIN,
            "dynamic_margin": DYNAMIC,
        },
        "long_tail": {
            "kept_images": int(counts.sum()),
            "min": int(counts.min()),
            "max": int(counts.max()),
            "median": float(np.median(counts)),
        },
        "results": rows,
        "total_seconds": round(total, 1),
        "threads": args.threads,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}; models and embeddings in {args.save_dir}")


if __name__ == "__main__":
    main()
