"""The final step of the protocol: retrain one config on all training classes with several
seeds, test each model once on the held-out classes, and summarise as mean and 95% interval;
also the metrics of the k fold models' concatenated embedding (as the paper reports both).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dml.config import DMLConfig, validate_config
from dml.errors import DMLError
from dml.tune.launch import run_training
from dml.tune.space import with_values
from dml.tune.trial import write_run_config

log = logging.getLogger(__name__)

TEST_METRICS = ("map_at_r", "precision_at_1", "r_precision")


def mean_ci95(values: list[float]) -> dict[str, Any]:
    """Mean and the half-width of its two-sided 95% Student-t interval. One value has no
    interval: ``ci95``, ``low`` and ``high`` are None (not 0, which read as "no spread")."""
    from scipy.stats import t

    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    half = float(t.ppf(0.975, len(data) - 1) * data.std(ddof=1) / np.sqrt(len(data))) if len(data) > 1 else None
    return {
        "mean": mean,
        "ci95": half,
        "low": None if half is None else mean - half,
        "high": None if half is None else mean + half,
        "n": len(data),
        "values": [float(v) for v in data],
    }


def mean_and_interval(summary: dict[str, Any]) -> str:
    """``0.4533 ± 0.0120``, or ``0.4533 (1 seed, no interval)`` for a `mean_ci95` of one value."""
    if summary["ci95"] is None:
        return f"{summary['mean']:.4f} (1 seed, no interval)"
    return f"{summary['mean']:.4f} ± {summary['ci95']:.4f}"


def test_overrides(config: DMLConfig) -> dict[str, Any]:
    """A retrain scores the test classes once, at its end (``evaluate``'s query and gallery
    splits), and never while training."""
    return {
        "train.eval_split": config.evaluate.query_split,
        "train.eval_gallery_split": config.evaluate.gallery_split,
        "train.eval_every": None,
    }


def retrain(base: dict[str, Any], seeds: int, out_dir: Path, parallel: int = 1, nproc_per_node: int = 1) -> list[Path]:
    """Train ``base`` (a run config mapping) with seeds ``seed``, ``seed+1``, ... into
    ``out_dir/seed-I`` (``parallel`` at a time), each tested once at its end (`test_overrides`);
    a seed whose run already finished is kept. Returns the run folders. Raises `TrainFailed`
    when a training fails."""
    first = int(base.get("seed", 0))
    test = test_overrides(validate_config(base))
    run_dirs = [out_dir / f"seed-{first + i}" for i in range(seeds)]

    def train(run_dir: Path) -> Path:
        if (run_dir / "train_result.json").exists():
            return run_dir
        seed = int(run_dir.name.removeprefix("seed-"))
        config = write_run_config(
            with_values(base, {**test, "seed": seed, "train.run_dir": str(run_dir)}),
            run_dir.with_name(run_dir.name + ".yaml"),
        )
        log.info("tune: retraining seed %d -> %s", seed, run_dir)
        run_training(config, run_dir, nproc_per_node, lambda record: False)
        return run_dir

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(train, run_dirs))


def _embed(model_dir: Path, config: DMLConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from dml.eval.embed import extract_embeddings
    from dml.eval.run import model_data_config
    from dml.models.model_file import load_final_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, payload = load_final_model(model_dir, device)
    embeddings = extract_embeddings(model, model_data_config(config, payload["data"]), split, device)
    return embeddings.vectors, embeddings.labels


def test_metrics(model_dirs: list[Path], config: DMLConfig, concatenate: bool = False) -> list[dict[str, float]]:
    """Test metrics on ``config.evaluate``'s query (and gallery) split of ``config.data``'s
    shards: one dict per model, or with ``concatenate`` one dict for the models' embeddings
    concatenated (each L2-normalised, (N, k*D), normalised again)."""
    evaluate = config.evaluate
    splits = [evaluate.query_split] + ([evaluate.gallery_split] if evaluate.gallery_split else [])
    embedded = [[_embed(d, config, split) for split in splits] for d in model_dirs]
    if concatenate:
        joined = []
        for i in range(len(splits)):
            vectors = np.concatenate([model[i][0] for model in embedded], axis=1)
            joined.append((vectors / np.linalg.norm(vectors, axis=1, keepdims=True), embedded[0][i][1]))
        embedded = [joined]
    return [_metrics(parts) for parts in embedded]


def _metrics(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    from dml.eval.metrics import retrieval_metrics

    (query, query_labels), *gallery_part = parts  # query only: leave-one-out
    gallery, gallery_labels = gallery_part[0] if gallery_part else (None, None)
    metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels)
    return {k: float(metrics[k]) for k in TEST_METRICS}


def final_test_metrics(run_dir: Path) -> dict[str, float]:
    """The test metrics a retrain logged at its end (``train_result.json``).

    Raises DMLError naming the first metric it lacks.
    """
    import json

    metrics = json.loads((run_dir / "train_result.json").read_text())["metrics"]
    missing = [name for name in TEST_METRICS if f"eval_{name}" not in metrics]
    if missing:
        raise DMLError(f"{run_dir}: no test eval_{missing[0]} in train_result.json (test split missing?)")
    return {name: float(metrics[f"eval_{name}"]) for name in TEST_METRICS}


def retrain_and_test(
    base: dict[str, Any], seeds: int, out_dir: Path, parallel: int = 1, nproc_per_node: int = 1
) -> dict[str, Any]:
    """`retrain` (each seed tested once at its end): per-seed test metrics and each metric's
    mean and 95% interval."""
    run_dirs = retrain(base, seeds, out_dir, parallel, nproc_per_node)
    per_seed = [final_test_metrics(d) for d in run_dirs]
    return {
        "run_dirs": [str(d) for d in run_dirs],
        "per_seed": per_seed,
        **{name: mean_ci95([m[name] for m in per_seed]) for name in TEST_METRICS},
    }
