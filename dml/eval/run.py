"""`dml evaluate`: embed the query (and gallery) split with a trained model, compute retrieval,
verification and identification metrics, and write ``report.json``, ``report.md`` and plots.

Flow: check the inputs (model file, shards, splits) on every rank before any collective, so
bad input fails the same way everywhere; join the process group (none at world size 1);
every rank embeds its share of each split (`extract_embeddings`, collective); rank 0 saves
the embeddings under ``<output_dir>/embeddings`` and does everything else while the other
ranks return. Given ``embeddings_dir`` the model is never loaded: the saved embeddings
(with the provenance in their ``meta.json``) are evaluated again.

The model is rebuilt from its own saved model and data config (image size, channels,
normalisation), reading shards from ``config.data.shard_dir`` with this run's batch size and
loader workers. Models and embedding run on the GPU when this rank has one (untested here:
no GPU on the development machines), otherwise on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dml.clock import utc_now
from dml.config import DataConfig, DMLConfig
from dml.data.manifest import load_manifest, manifest_digest
from dml.distributed import cleanup, init_distributed, is_initialized
from dml.errors import DataError, DMLError
from dml.eval.embed import Embeddings, extract_embeddings
from dml.eval.embedding_store import EmbeddingSet, load_embedding_set
from dml.eval.evaluation import evaluate_embeddings, headline_metrics
from dml.eval.pairs_lookup import resolve_pairs_file
from dml.eval.report import build_report, write_report
from dml.eval.stage_plots import draw_report_plots
from dml.eval.verification_report import ROC_FILE, embed_sets, headline_entries, plot_verification_roc, score_sets
from dml.files import sha256_file
from dml.models.model_file import find_model_file, load_final_model
from dml.tracking.stage_hooks import track_evaluation

log = logging.getLogger(__name__)
EMBEDDINGS_SUBDIR = "embeddings"


@dataclass
class EvalResult:
    """What `run_evaluate` wrote. ``metrics`` are the headline numbers (P@1, MAP@R,
    R-precision, recall@k, TAR@FAR, ROC AUC, EER, CMC rank 1; None when not computed); on
    ranks other than 0, which write nothing, it is empty."""

    output_dir: str
    report_path: str
    markdown_path: str
    metrics: dict[str, float | None]
    embeddings_dir: str = ""
    plots: dict[str, str] = field(default_factory=dict)


def check_split(manifest: dict, split: str, role: str, minimum: int = 1) -> int:
    """Number of samples of ``split``; a missing split or one smaller than ``minimum`` is a DMLError."""
    if split not in manifest["splits"]:
        raise DMLError(f"{role} split '{split}' not in the shards (has: {', '.join(manifest['splits']) or 'none'})")
    count = int(manifest["splits"][split]["count"])
    if count < minimum:
        raise DMLError(f"{role} split '{split}' has {count} samples; evaluation needs at least {minimum}")
    return count


def check_inputs(config: DMLConfig) -> Path:
    """Validate model file, manifest and splits before any collective; returns the model file."""
    model_file = find_model_file(config.evaluate.model_path, "evaluate.model_path")
    manifest = load_manifest(config.data.shard_dir)
    gallery_split = config.evaluate.gallery_split
    check_split(manifest, config.evaluate.query_split, "query", minimum=2 if gallery_split is None else 1)
    if gallery_split is not None:
        check_split(manifest, gallery_split, "gallery")
    return model_file


def model_data_config(config: DMLConfig, saved: dict[str, Any]) -> DataConfig:
    """The model's own data config (image size, channels, normalisation) reading this run's
    shards with this run's batch size, loader workers and bad-sample policy."""
    here = config.data
    return DataConfig.model_validate(
        {
            **saved,
            "shard_dir": here.shard_dir,
            "batch_size": here.batch_size,
            "num_workers": here.num_workers,
            "bad_samples": here.bad_samples,
        }
    )


def embed_with_model(config: DMLConfig, model_file: Path, device: Any) -> EmbeddingSet:
    """Embed the query (and gallery) split on every rank (collective); provenance in ``meta``."""
    model, payload = load_final_model(model_file, device)
    data = model_data_config(config, payload["data"])
    digest = manifest_digest(config.data.shard_dir)
    if payload.get("data_digest") != digest:
        log.info("evaluate: the shards' manifest differs from the one the model was trained on")
    evaluate = config.evaluate
    query = _embed_split(model, data, evaluate.query_split, device, evaluate.flip)
    gallery = None
    if evaluate.gallery_split is not None:
        gallery = _embed_split(model, data, evaluate.gallery_split, device, evaluate.flip)
    verification = embed_sets(model, data, evaluate, device)
    meta = {
        "created_at": utc_now(),
        "flip": evaluate.flip,
        "model": {
            "path": str(model_file),
            "training_data_digest": payload.get("data_digest"),
            "model": payload["model"],
            "data": data.model_dump(mode="json"),
        },
        "data": {
            "shard_dir": config.data.shard_dir,
            "manifest_sha256": digest,
            "manifest_counts": {
                split: manifest_count(config.data.shard_dir, split)
                for split in (evaluate.query_split, evaluate.gallery_split)
                if split
            },
        },
    }
    return EmbeddingSet(evaluate.query_split, query, evaluate.gallery_split, gallery, meta, verification)


def manifest_count(shard_dir: str | Path, split: str) -> int:
    """How many samples the manifest lists for ``split``."""
    return int(load_manifest(shard_dir)["splits"][split]["count"])


def count_summary(embeddings: EmbeddingSet) -> tuple[dict[str, int], list[str]]:
    """Report counts (embedded, listed in the manifest, skipped per split) and one note per
    split that has fewer samples than its manifest lists (bad samples dropped by the skip policy)."""
    listed = embeddings.meta.get("data", {}).get("manifest_counts", {})
    counts = {
        "num_query": len(embeddings.query.keys),
        "num_gallery": len(embeddings.gallery.keys) if embeddings.gallery else 0,
    }
    notes = []
    for role, split, found in (
        ("query", embeddings.query_split, counts["num_query"]),
        ("gallery", embeddings.gallery_split, counts["num_gallery"]),
    ):
        if split is None or split not in listed:
            continue
        counts[f"manifest_{role}"] = int(listed[split])
        counts[f"skipped_{role}"] = int(listed[split]) - found
        if found < int(listed[split]):
            notes.append(
                f"metrics are over {found} of the {listed[split]} {role} samples the manifest lists: "
                f"{int(listed[split]) - found} bad samples were skipped (data.bad_samples=skip)"
            )
    return counts, notes


def _embed_split(model: Any, data: DataConfig, split: str, device: Any, flip: bool) -> Embeddings:
    embeddings = extract_embeddings(model, data, split, device, flip=flip)
    if not embeddings.keys:
        raise DMLError(f"split '{split}' yielded no samples from {data.shard_dir}")
    return embeddings


def run_evaluate(config: DMLConfig, embeddings_dir: str | Path | None = None) -> EvalResult:
    """Evaluate as configured by ``config.evaluate``; see the module docstring for the flow.

    Works alone, under torchrun (gloo or NCCL) and inside an existing process group (which it
    leaves in place). Returns the paths written and the headline metrics (rank 0; other ranks
    get an `EvalResult` with empty metrics). Bad input is a one-line `DMLError`.
    Peak memory on rank 0: the query and gallery embeddings (N x D x 4 bytes each), plus the
    metric passes (see `retrieval_metrics` and `verification_metrics`).
    """
    started = utc_now()
    output_dir = Path(config.evaluate.output_dir)
    model_file = check_inputs(config) if embeddings_dir is None else None
    created_group = not is_initialized()
    info = init_distributed()
    try:
        if embeddings_dir is None:
            assert model_file is not None  # check_inputs found it
            embeddings = embed_with_model(config, model_file, info.device)
    finally:
        if created_group:
            cleanup()
    if info.rank != 0:
        return EvalResult(str(output_dir), str(output_dir / "report.json"), str(output_dir / "report.md"), {})
    output_dir.mkdir(parents=True, exist_ok=True)
    if embeddings_dir is None:
        assert model_file is not None  # check_inputs found it
        embeddings.meta["model"]["sha256"] = sha256_file(model_file)
        embeddings_dir = embeddings.save(output_dir / EMBEDDINGS_SUBDIR)
        log.info("evaluate: embeddings saved to %s", embeddings_dir)
    else:
        embeddings = load_embedding_set(
            embeddings_dir,
            config.evaluate.query_split,
            config.evaluate.gallery_split,
            [spec.set_name for spec in config.evaluate.verification_sets],
        )
        log.info("evaluate: using saved embeddings from %s (model not loaded)", embeddings_dir)
    return report_on_embeddings(config, embeddings, Path(embeddings_dir), started)


def report_on_embeddings(config: DMLConfig, embeddings: EmbeddingSet, embeddings_dir: Path, started: str) -> EvalResult:
    """Metrics, plots and report files for ``embeddings`` (rank 0 only).

    Raises DMLError for leave-one-out over fewer than 2 samples.
    """
    evaluate, output_dir = config.evaluate, Path(config.evaluate.output_dir)
    if evaluate.gallery_split is None and len(embeddings.query.keys) < 2:
        raise DMLError(f"leave-one-out needs at least 2 samples in split '{evaluate.query_split}'")
    class_names = matching_class_names(config, embeddings)
    pairs = None
    if evaluate.pairs_file is not None:
        keys = embeddings.query.keys + (embeddings.gallery.keys if embeddings.gallery is not None else [])
        pairs = resolve_pairs_file(evaluate.pairs_file, keys, config.data.shard_dir, embeddings.splits())
    metrics = evaluate_embeddings(embeddings, evaluate, seed=config.seed, pairs=pairs)
    counts, count_notes = count_summary(embeddings)
    for note in count_notes:
        log.warning("evaluate: %s", note)
    headline = headline_metrics(metrics, evaluate)
    face_sets = score_sets(embeddings.verification, evaluate.fars)
    headline.update(headline_entries(face_sets))
    metrics.notes.extend(f"verification set {name}: {note}" for name, m in face_sets.items() for note in m["notes"])
    plots = draw_report_plots(config, embeddings, metrics, output_dir, class_names)
    if face_sets and evaluate.plots:
        plots["verification_sets_roc"] = plot_verification_roc(face_sets, output_dir / ROC_FILE).name
    report = build_report(
        metrics,
        headline,
        config=config.model_dump(mode="json"),
        provenance=_provenance(embeddings, embeddings_dir),
        counts=counts,
        plots=plots,
        class_names=class_names,
        verification_sets=face_sets,
        timestamps={"started_at": started, "finished_at": utc_now(), "embedded_at": embeddings.meta.get("created_at")},
    )
    report["notes"] = count_notes + report["notes"]
    report_path, markdown_path = write_report(output_dir, report, metrics, class_names)
    log.info("evaluate: report -> %s (%s)", report_path, _summary(headline))
    result = EvalResult(
        str(output_dir),
        str(report_path),
        str(markdown_path),
        report["headline"],
        str(embeddings_dir),
        {name: str(output_dir / file) for name, file in plots.items()},
    )
    track_evaluation(config, result, embeddings, class_names)
    return result


def matching_class_names(config: DMLConfig, embeddings: EmbeddingSet) -> list[str] | None:
    """Class names from ``config.data.shard_dir``'s manifest when it is the manifest the
    embeddings were made from (same sha256); otherwise None, with one logged line."""
    try:
        manifest = load_manifest(config.data.shard_dir)
        digest = manifest_digest(config.data.shard_dir)
    except DataError as exc:
        log.info("evaluate: no class names or images (%s)", exc)
        return None
    if digest != embeddings.meta.get("data", {}).get("manifest_sha256"):
        log.info(
            "evaluate: %s is not the data the embeddings came from; labels shown as numbers", config.data.shard_dir
        )
        return None
    return list(manifest["classes"])


def _provenance(embeddings: EmbeddingSet, embeddings_dir: Path) -> dict[str, Any]:
    meta = embeddings.meta
    model, data = meta.get("model", {}), meta.get("data", {})
    return {
        "model": {
            "path": model.get("path"),
            "sha256": model.get("sha256"),
            "training_data_digest": model.get("training_data_digest"),
            "model_config": model.get("model"),
            "data_config": model.get("data"),
        },
        "data": {
            "shard_dir": data.get("shard_dir"),
            "manifest_sha256": data.get("manifest_sha256"),
            "query_split": embeddings.query_split,
            "gallery_split": embeddings.gallery_split if embeddings.gallery is not None else None,
            "flip": meta.get("flip"),
        },
        "embeddings_dir": str(embeddings_dir),
    }


def _summary(headline: dict[str, Any]) -> str:
    shown = [
        f"{name}={value:.4f}"
        for name, value in headline.items()
        if name in ("precision_at_1", "map_at_r", "roc_auc") and isinstance(value, float)
    ]
    return ", ".join(shown)
