"""Face verification sets in `dml evaluate`: embed them (collective), keep their embeddings
with the others, score them, and render their part of the report and its ROC picture.

Report keys: ``report.json["verification_sets"][<name>]`` holds every number of
`face_verification_metrics` plus ``roc_curve`` (exact TAR / FAR over all pairs, at most
`ROC_POINTS` points); the headline gains ``ver_<name>_accuracy`` (10-fold, mean),
``ver_<name>_accuracy_std``, ``ver_<name>_val_at_far_1e-03`` and the TAR@FAR values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml.config import DataConfig, EvalConfig
from dml.eval.face_verification import pair_distances
from dml.eval.plots import new_figure, save_figure
from dml.eval.verification_sets import (
    PairEmbeddings,
    embed_verification_set,
    flat_metrics,
    load_verification_set,
    score_pair_embeddings,
)

log = logging.getLogger(__name__)
ROC_POINTS = 2000
ROC_FILE = "verification_sets_roc.png"
HEADLINE_SUFFIXES = {
    "accuracy": "10-fold accuracy",
    "accuracy_std": "10-fold accuracy std",
    "best_threshold_accuracy": "best-threshold accuracy",
    "roc_auc": "ROC AUC",
    "eer": "EER",
}


def embed_sets(
    model: torch.nn.Module, data: DataConfig, config: EvalConfig, device: torch.device
) -> list[PairEmbeddings]:
    """Read and embed every ``config.verification_sets`` (collective; all ranks get all)."""
    out = []
    for spec in config.verification_sets:
        loaded = load_verification_set(spec)
        out.append(embed_verification_set(model, loaded, data, device, config.flip, max(64, data.batch_size)))
    return out


def exact_roc(pairs: PairEmbeddings, max_points: int = ROC_POINTS) -> dict[str, list[float]]:
    """TAR and FAR at every distinct distance threshold over all pairs, thinned to at most
    ``max_points`` points (first and last kept): {"far", "tar"}."""
    distances = pair_distances(pairs.vectors)
    order = np.argsort(distances, kind="stable")
    same = pairs.is_same[order]
    last_of_group = np.r_[np.diff(distances[order]) > 0, True]
    tar = np.cumsum(same)[last_of_group] / max(int(same.sum()), 1)
    far = np.cumsum(~same)[last_of_group] / max(int((~same).sum()), 1)
    keep = np.unique(np.linspace(0, len(tar) - 1, min(max_points, len(tar))).round().astype(int))
    return {"far": far[keep].tolist(), "tar": tar[keep].tolist()}


def score_sets(sets: Sequence[PairEmbeddings], fars: Sequence[float]) -> dict[str, dict[str, Any]]:
    """name -> every number of the set plus its ``roc_curve``."""
    scored = {}
    for pairs in sets:
        scored[pairs.name] = {**score_pair_embeddings(pairs, fars), "roc_curve": exact_roc(pairs)}
        log.info(
            "evaluate: %s: 10-fold accuracy %.4f +- %.4f over %d pairs",
            pairs.name,
            scored[pairs.name]["accuracy"],
            scored[pairs.name]["accuracy_std"],
            scored[pairs.name]["num_pairs"],
        )
    return scored


def headline_entries(scored: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The headline numbers of every set (`flat_metrics` names)."""
    out: dict[str, float | None] = {}
    for name, metrics in scored.items():
        out.update(flat_metrics(name, dict(metrics)))
    return out


def headline_label(key: str, names: Sequence[str]) -> str | None:
    """'ver_lfw_accuracy' -> 'lfw: 10-fold accuracy'; None when ``key`` is not a set's."""
    for name in sorted(names, key=len, reverse=True):
        rest = key.removeprefix(f"ver_{name}_")
        if rest != key:
            if rest.startswith("tar_at_far_"):
                return f"{name}: TAR@FAR={rest.removeprefix('tar_at_far_')}"
            if rest.startswith("val_at_far_"):
                return f"{name}: val@FAR={rest.removeprefix('val_at_far_')} (insightface)"
            return f"{name}: {HEADLINE_SUFFIXES.get(rest, rest.replace('_', ' '))}"
    return None


def _number(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_section(scored: Mapping[str, Mapping[str, Any]], fars: Sequence[float], query_split: str) -> list[str]:
    """The report.md table: one row per set."""
    if not scored:
        return []
    far_keys = [
        f"{f:.0e}"
        for f in fars
        if any((m.get("tar_at_far") or {}).get(f"{f:.0e}") is not None for m in scored.values())
    ]
    head = [
        "set",
        "pairs (same / different)",
        "10-fold accuracy (mean ± std)",
        "best-threshold accuracy",
        "val@FAR=1e-03 (insightface)",
        *[f"TAR@FAR={k}" for k in far_keys],
        "ROC AUC",
        "EER",
    ]
    lines = [
        "",
        "## Face verification sets",
        "",
        "insightface's protocol: squared L2 distance of normalised embeddings, thresholds 0..4 step "
        "0.01 chosen on 9 folds and applied to the 10th (folds in file order); TAR@FAR is exact over "
        f"each set's pairs. (The TAR@FAR, ROC AUC and EER above are over split `{query_split}`.)",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |",
    ]
    for name, m in scored.items():
        val = m["val_at_far"]
        row = [
            f"`{name}`",
            f"{m['num_pairs']} ({m['num_same']} / {m['num_different']})",
            f"{m['accuracy']:.4f} ± {m['accuracy_std']:.4f}",
            _number(m["best_threshold_accuracy"]),
            "n/a" if val["val"] is None else f"{val['val']:.4f} ± {val['val_std']:.4f}",
            *[_number((m.get("tar_at_far") or {}).get(k)) for k in far_keys],
            _number(m["roc_auc"]),
            _number(m["eer"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plot_verification_roc(scored: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """TAR against FAR (log scale) of every set, the 10-fold accuracy in the legend and TAR
    at the configured FARs marked; FARs below one false accept of the largest set are not drawn."""
    figure = new_figure(6.4, 4.8)
    axes = figure.add_subplot()
    floor = min(1.0 / max(m["num_different"], 1) for m in scored.values())  # the largest set's resolution
    marked = False
    for index, (name, m) in enumerate(scored.items()):
        colour = f"C{index % 10}"
        curve = m["roc_curve"]
        far = np.asarray(curve["far"])
        shown = far >= floor
        axes.step(
            far[shown],
            np.asarray(curve["tar"])[shown],
            where="post",
            color=colour,
            lw=1.6,
            label=f"{name}: 10-fold accuracy {100 * m['accuracy']:.2f} ± {100 * m['accuracy_std']:.2f} % "
            f"({m['num_pairs']} pairs)",
        )
        points = [(float(k), v) for k, v in (m.get("tar_at_far") or {}).items() if v is not None and float(k) >= floor]
        if points:
            axes.scatter([f for f, _ in points], [t for _, t in points], color=colour, s=22, zorder=3)
            marked = True
        for at, tar in points:
            axes.annotate(
                f"TAR {tar:.3f} @ FAR {at:.0e}",
                (at, tar),
                textcoords="offset points",
                xytext=(6, -4),
                fontsize=7,
                color=colour,
            )
    if marked:  # one legend entry for the dots of every set, after the curves
        axes.scatter([], [], color="0.35", s=22, label="TAR at the configured FARs")
    axes.set_xscale("log")
    axes.set_xlim(floor, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("false accept rate (FAR), log scale")
    axes.set_ylabel("true accept rate (TAR)")
    axes.set_title("Face verification sets: TAR against FAR over all pairs", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return save_figure(figure, path)
