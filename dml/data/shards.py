"""`write_shards`: turn a source into WebDataset tar shards, in parallel, resumably.

Each shard of the plan is written by one worker process: ``<split>-NNNNNN.tar`` holding, per
sample, ``<key>.jpg|png`` (image bytes), ``<key>.cls`` (class index as text) and
``<key>.json`` (source id, original label, split, size). A finished shard leaves a small
record in ``.progress/``; ``resume=True`` keeps shards whose file still has the recorded sha256
and redoes the rest. Workers die with the run; a lost worker ends it with one line saying
``--resume`` continues, and no ``.tmp`` file is left behind.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from dml.config import ImageConfig, PrepareConfig
from dml.data.encode import EncodedImage, RejectedImage, encode_image
from dml.data.face_align import align_face
from dml.data.manifest import assemble_manifest, manifest_name, write_manifest
from dml.data.output_lock import hold_output_dir
from dml.data.plan import ShardPlan, ShardTask, make_plan
from dml.data.sources import FolderSource, Record, Source, open_source
from dml.data.tar_members import DeterministicTarWriter
from dml.data.workers import die_with_parent, ignore_interrupts, sigterm_as_interrupt
from dml.errors import DataError
from dml.files import atomic_path, sha256_file, write_json_atomic
from dml.progress import progress as progress_bar

log = logging.getLogger(__name__)
PROGRESS_DIR = ".progress"


@dataclass
class ShardResult:
    """What one written shard holds; the manifest is assembled from these."""

    name: str
    split: str
    count: int
    bytes: int
    sha256: str
    class_counts: dict[str, int] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)


# Each worker process keeps one source (with its lazily loaded arrays) for all its shards.
_worker_source: Source | None = None


def _init_worker(source: Source, parent_pid: int) -> None:
    global _worker_source
    die_with_parent(parent_pid)
    ignore_interrupts()
    _worker_source = source


def _read_and_encode(source: Source, record: Record, image_config: ImageConfig) -> EncodedImage:
    """Read and encode one record; Pillow's large-image warning becomes a log line naming the file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        payload = align_face(source.read(record), record.face, image_config.align)
        encoded = encode_image(payload, image_config)
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            log.warning("%s: %s", record.source_id, str(warning.message).split(", could be")[0])
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return encoded


def write_one_shard(task: ShardTask, source: Source, image_config: ImageConfig, out_dir: Path) -> ShardResult:
    """Write one shard atomically and return its record; bad images are rejected, not raised.

    Raises `OSError` naming the shard (e.g. disk full) with no ``.tmp`` left behind, and
    `DataError` when the source itself turns out unreadable.
    """
    counts: Counter[int] = Counter()
    rejected = []
    with atomic_path(out_dir / task.name) as tmp:
        with DeterministicTarWriter(tmp) as writer:
            for sample in task.samples:
                try:
                    encoded = _read_and_encode(source, sample.record, image_config)
                except (RejectedImage, OSError, ValueError) as exc:
                    rejected.append({"key": sample.key, "source": sample.record.source_id, "reason": str(exc)})
                    continue
                meta = {
                    "source": sample.record.source_id,
                    "label": sample.record.label,
                    "split": task.split,
                    "width": encoded.width,
                    "height": encoded.height,
                }
                writer.add(f"{sample.key}.{encoded.extension}", encoded.data)
                writer.add(f"{sample.key}.cls", str(sample.class_index).encode())
                writer.add(f"{sample.key}.json", json.dumps(meta, sort_keys=True).encode())
                counts[sample.class_index] += 1
        result = ShardResult(
            task.name,
            task.split,
            sum(counts.values()),
            tmp.stat().st_size,
            sha256_file(tmp),
            {str(k): v for k, v in sorted(counts.items())},
            rejected,
        )
    write_json_atomic(out_dir / PROGRESS_DIR / f"{task.name}.json", asdict(result))
    return result


def _write_in_worker(task: ShardTask, image_config: ImageConfig, out_dir: Path) -> ShardResult:
    assert _worker_source is not None
    return write_one_shard(task, _worker_source, image_config, out_dir)


def _finished(task: ShardTask, out_dir: Path) -> ShardResult | None:
    """The recorded result of a shard whose file still has the sha256 it was written with."""
    record = out_dir / PROGRESS_DIR / f"{task.name}.json"
    shard = out_dir / task.name
    if not (record.exists() and shard.exists()):
        return None
    try:
        result = ShardResult(**json.loads(record.read_text()))
    except (ValueError, TypeError):
        log.warning("resume: %s has an unreadable progress record; writing the shard again", shard)
        return None
    if sha256_file(shard) != result.sha256:
        log.warning("resume: %s differs from the sha256 it was written with; writing it again", shard)
        return None
    return result


def _make_output_dir(out_dir: Path, source: Source) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"prepare.output_dir {out_dir} is a file, not a folder")
    if isinstance(source, FolderSource) and out_dir.resolve().is_relative_to(source.root.resolve()):
        # its shards would be listed as inputs of the next run (and --resume refused the changed plan)
        raise DataError(
            f"prepare.output_dir {out_dir} is inside the image folder {source.root}; choose a folder outside the source"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_output_dir(out_dir: Path, digest: str, resume: bool, partition: tuple[int, int] | None) -> None:
    plan_file = out_dir / PROGRESS_DIR / "plan.json"
    if plan_file.exists():
        previous = json.loads(plan_file.read_text())["digest"]
        if previous != digest:
            raise DataError(f"{out_dir} holds shards of a different source/config; choose a new output_dir")
        if not resume and (out_dir / manifest_name(partition)).exists():
            raise DataError(f"{out_dir} is already prepared; pass --resume to finish or redo missing shards")
    elif any(out_dir.glob("*.tar")):
        raise DataError(f"{out_dir} holds shards not written by this plan; choose a new output_dir")
    (out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_file, {"digest": digest})


def _remove_temporaries(tasks: list[ShardTask], out_dir: Path) -> None:
    """Delete the ``.tmp`` files of ``tasks`` that a killed worker or run left behind (only
    this run's: other partitions may be writing into the same folder)."""
    for task in tasks:
        (out_dir / (task.name + ".tmp")).unlink(missing_ok=True)


def _run_tasks(tasks: list[ShardTask], source: Source, config: PrepareConfig, out_dir: Path) -> list[ShardResult]:
    _remove_temporaries(tasks, out_dir)
    try:
        if config.workers == 1 or len(tasks) <= 1:
            return _run_here(tasks, source, config, out_dir)
        return _run_in_pool(tasks, source, config, out_dir)
    finally:
        _remove_temporaries(tasks, out_dir)


def _run_here(tasks: list[ShardTask], source: Source, config: PrepareConfig, out_dir: Path) -> list[ShardResult]:
    results = []
    with progress_bar(total=sum(len(t.samples) for t in tasks), unit="img", desc="prepare") as progress:
        for task in tasks:
            results.append(write_one_shard(task, source, config.image, out_dir))
            progress.update(len(task.samples))
    return results


def _run_in_pool(tasks: list[ShardTask], source: Source, config: PrepareConfig, out_dir: Path) -> list[ShardResult]:
    """Write ``tasks`` in worker processes that die with this one; on any failure the queued
    shards are cancelled and the running ones finish before the error is raised."""
    # fork: workers start instantly and never re-import the caller's __main__ (spawn and
    # forkserver do, which costs seconds per worker when the caller imported torch). They
    # run only PIL/tar code, so the caller's threads do not matter; the progress bar (which
    # starts a monitor thread) is created after the workers are forked.
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(
        config.workers, mp_context=context, initializer=_init_worker, initargs=(source, os.getpid())
    )
    results: list[ShardResult] = []
    try:
        futures = {pool.submit(_write_in_worker, t, config.image, out_dir): t for t in tasks}
        with progress_bar(total=sum(len(t.samples) for t in tasks), unit="img", desc="prepare") as progress:
            for future in as_completed(futures):
                results.append(future.result())
                progress.update(len(futures[future].samples))
    except BrokenProcessPool:
        raise DataError(
            f"a prepare worker process was lost (killed, e.g. by the out-of-memory killer) with "
            f"{len(results)} of {len(tasks)} shards written to {out_dir}; run the same command "
            "with --resume to continue"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def write_shards(
    config: PrepareConfig, resume: bool = False, partition: tuple[int, int] | None = None, source: Source | None = None
) -> dict:
    """Prepare shards as configured and return the manifest (also written to disk).

    ``partition=(i, n)`` writes only partition ``i`` of ``n`` and a partial manifest; run
    `merge_manifests` once all partitions are done. ``source`` replaces the configured one
    (`dml.tune.folds` re-shards a prepared split). Returns the (partial) manifest dict.
    """
    if source is None:
        source = open_source(config.source.kind, config.source.path, config.source.class_names)
    out_dir = Path(config.output_dir)
    _make_output_dir(out_dir, source)
    plan = make_plan(source, config)
    stopped = f"no .tmp left in {out_dir}; run the same command with --resume to continue"
    with hold_output_dir(out_dir / PROGRESS_DIR, partition), sigterm_as_interrupt(stopped):
        return _write_planned(plan, source, config, out_dir, resume, partition)


def _write_planned(
    plan: ShardPlan,
    source: Source,
    config: PrepareConfig,
    out_dir: Path,
    resume: bool,
    partition: tuple[int, int] | None,
) -> dict:
    _check_output_dir(out_dir, plan.digest, resume, partition)
    tasks = plan.for_partition(*partition) if partition else plan.tasks
    done = {t.name: r for t in tasks if resume and (r := _finished(t, out_dir)) is not None}
    if done:
        log.info(
            "resume: %d of %d shards already complete (sha256 checked), writing %d",
            len(done),
            len(tasks),
            len(tasks) - len(done),
        )
    todo = [t for t in tasks if t.name not in done]
    results = list(done.values()) + _run_tasks(todo, source, config, out_dir)
    manifest = assemble_manifest(plan, results, source.description, config, partition)
    path = write_manifest(out_dir, manifest, partition)
    counts = manifest["counts"]
    log.info(
        "prepare: %d inputs -> %d written, %d rejected, %d shards; manifest at %s",
        counts["inputs"],
        counts["written"],
        counts["rejected"],
        len(results),
        path,
    )
    return manifest
