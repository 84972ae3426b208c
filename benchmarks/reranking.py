"""Benchmark: retrieval post-processing on Omniglot zero-shot (issue 16).

Claim checked: what database-side augmentation (DBA), alpha query expansion (alpha-QE) and
k-reciprocal re-ranking add to MAP@R, P@1 and GAP of a trained embedding, and what each costs
per 10,000 queries, measured side by side on the same embeddings in one run.

Protocol: the embeddings are those of benchmarks/losses_omniglot.py's ArcFace model (its
defaults: timm ``test_resnet``, 28 px, 300 steps of 32 x 4 on the 964 background characters,
s=30, m=0.3), trained here (``--loss`` picks another of its losses), or any (N, D) embeddings
given with ``--embeddings file.npz``
(arrays ``vectors`` and ``labels``, e.g. a sub-center model's). Retrieval is leave-one-out
over the 13,180 evaluation-character images (R = 19), as in the losses benchmark; each
method goes through `dml.eval.reranking.reranked_metrics`, exactly as `dml evaluate` runs it.
Parameters: DBA and alpha-QE with k in ``--ks`` and alpha 3 (Radenović et al.); k-reciprocal
with the paper's k1 20, k2 6, lambda 0.3. "plain" is the search without post-processing,
timed through the same scorer.

Outputs: a table on stdout, JSON in benchmarks/results/reranking.json (or ``--output``).

Usage: python benchmarks/reranking.py [--loss arcface] [--embeddings file.npz] [--ks 2 5 10] [--threads 2]
       [--save-embeddings file.npz] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dml.config_reranking import RerankingConfig  # noqa: E402
from dml.eval.ranked_metrics import score_rankings  # noqa: E402
from dml.eval.reranking import reranked_metrics, vector_ranker  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "reranking.json"
KS = (1, 10)


def trained_embeddings(loss: str, threads: int, quick: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Train losses_omniglot's model with ``loss`` and its defaults; embed the evaluation set."""
    import losses_omniglot as losses

    args = losses.parse_args(["--losses", loss, "--threads", str(threads)] + (["--quick"] if quick else []))
    data = losses.load_data(args)
    batches = losses.make_batches(data["num_classes"], args.steps, args.p, args.k, args.seed)
    started = time.perf_counter()
    model, _ = losses.train(loss, args, data, batches)
    model.eval()
    images = data["eval_images"]
    with torch.no_grad():
        vectors = torch.cat(
            [
                model(losses.normalise(images[i : i + losses.EVAL_BATCH], data["mean"], data["std"]))
                for i in range(0, len(images), losses.EVAL_BATCH)
            ]
        ).numpy()
    source = {
        "model": f"losses_omniglot {loss}",
        "steps": args.steps,
        "backbone": args.backbone,
        "size": args.size,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    return vectors, data["eval_labels"].numpy(), source


def plain_row(vectors: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    started = time.perf_counter()
    scores = score_rankings(vector_ranker(vectors, vectors, True), labels, labels, True, KS)
    scores["seconds"] = time.perf_counter() - started
    return scores


def variants(ks: list[int]) -> list[tuple[str, RerankingConfig]]:
    """(label, config) for every method alone and the landmark chain, at each k."""
    rows = []
    for k in ks:
        expansion = {"k": k, "alpha": 3.0}
        rows.append((f"dba k={k}", RerankingConfig(methods=("dba",), dba=expansion)))
        rows.append((f"alpha_qe k={k}", RerankingConfig(methods=("alpha_qe",), alpha_qe=expansion)))
        rows.append(
            (f"dba+alpha_qe k={k}", RerankingConfig(methods=("dba", "alpha_qe"), dba=expansion, alpha_qe=expansion))
        )
    rows.append(("k_reciprocal k1=20 k2=6 l=0.3", RerankingConfig(methods=("k_reciprocal",))))
    rows.append(
        (
            f"dba k={ks[0]}+k_reciprocal",
            RerankingConfig(methods=("dba", "k_reciprocal"), dba={"k": ks[0], "alpha": 3.0}),
        )
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", type=Path, help="npz with vectors (N, D) and labels (N,)")
    parser.add_argument("--loss", default="arcface", help="losses_omniglot loss to train (e.g. triplet_semihard)")
    parser.add_argument("--save-embeddings", type=Path, help="write the trained model's embeddings here")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 5], help="k of DBA / alpha-QE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="20 training steps, 50 characters, no JSON")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    if args.embeddings:
        with np.load(args.embeddings, allow_pickle=False) as saved:
            vectors, labels = saved["vectors"], saved["labels"]
        source: dict[str, Any] = {"embeddings": str(args.embeddings)}
    else:
        vectors, labels, source = trained_embeddings(args.loss, args.threads, args.quick)
        if args.save_embeddings:
            np.savez(args.save_embeddings, vectors=vectors, labels=labels)
    print(
        f"embeddings: {vectors.shape[0]} x {vectors.shape[1]}, {len(np.unique(labels))} classes, "
        f"leave-one-out; {source}",
        flush=True,
    )
    rows = [{"method": "plain", **plain_row(vectors, labels)}]
    for label, config in variants(args.ks):
        result = reranked_metrics(vectors, labels, None, None, config, KS)
        rows.append({"method": label, **result["+".join(config.methods)]})
        print(
            f"{label:32s} MAP@R {rows[-1]['map_at_r']:.4f} P@1 {rows[-1]['precision_at_1']:.4f} "
            f"({rows[-1]['seconds']:.1f} s)",
            flush=True,
        )
    per_10k = 10_000 / len(vectors)
    print("\n| method | MAP@R | P@1 | GAP | s | s per 10k queries | added s per 10k |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["seconds_per_10k_queries"] = row["seconds"] * per_10k
        row["added_seconds_per_10k_queries"] = (row["seconds"] - rows[0]["seconds"]) * per_10k
        print(
            f"| {row['method']} | {row['map_at_r']:.4f} | {row['precision_at_1']:.4f} | "
            f"{row['global_average_precision']:.4f} | {row['seconds']:.1f} | {row['seconds_per_10k_queries']:.1f} | "
            f"{row['added_seconds_per_10k_queries']:+.1f} |"
        )
    output = args.output or (None if args.quick else RESULTS)
    if output is not None:
        output.write_text(
            json.dumps(
                {
                    "command": "python benchmarks/reranking.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "source": source,
                    "num_embeddings": len(vectors),
                    "ks_reported": list(KS),
                    "threads": args.threads,
                    "machine": platform.processor() or platform.machine(),
                    "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg(),
                    "rows": rows,
                },
                indent=1,
            )
        )
        print(f"results -> {output}")


if __name__ == "__main__":
    main()
