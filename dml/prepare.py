"""The `prepare` stage: one function shared by the CLI, cluster jobs and Prefect tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dml.config import DMLConfig, save_config
from dml.data.manifest import MANIFEST, manifest_name, merge_manifests, verify_shards
from dml.data.shards import write_shards
from dml.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    """Where the shards went and what they hold."""

    output_dir: Path
    manifest_path: Path
    inputs: int
    written: int
    rejected: int


def parse_partition(text: str | None) -> tuple[int, int] | None:
    """Parse ``i/N`` (0-based ``i``) into a tuple, with a one-line error on bad input.

    Raises DataError for text that is not ``i/N`` with 0 <= i < N.
    """
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise DataError(f"--partition must look like i/N (e.g. 0/4), got '{text}'") from None
    if not 0 <= index < count:
        raise DataError(f"--partition {text}: i must be in 0..N-1")
    return index, count


def run_prepare(config: DMLConfig, resume: bool = False, partition: tuple[int, int] | None = None) -> PrepareResult:
    """Write shards for ``config.prepare`` and save the resolved config beside them."""
    out_dir = Path(config.prepare.output_dir)
    log.info("prepare: start (source %s -> %s)", config.prepare.source.path, out_dir)
    manifest = write_shards(config.prepare, resume=resume, partition=partition)
    save_config(config, out_dir / "config.yaml")
    counts = manifest["counts"]
    path = out_dir / manifest_name(partition)
    if partition is None:  # a partition may hold only rejects or one split; the merge checks the whole
        check_outcome(manifest, path)
    log.info("prepare: done -> %s", path)
    return PrepareResult(out_dir, path, counts["inputs"], counts["written"], counts["rejected"])


def check_outcome(manifest: dict, path: Path) -> None:
    """Raise `DataError` when no input was written; warn when a split that training or
    evaluation needs came out empty. ``path`` is the manifest that lists the reasons."""
    counts = manifest["counts"]
    if counts["written"] == 0:
        first = manifest["rejected"][0] if manifest["rejected"] else None
        example = f" (first: {first['source']}: {first['reason'].splitlines()[0]})" if first else ""
        raise DataError(
            f"all {counts['inputs']} inputs were rejected, none written{example}; every reason is listed in {path}"
        )
    split = manifest["config"]["split"]
    settings = (
        f"split.mode {split['mode']}, train_fraction {split['train_fraction']}, {len(manifest['classes'])} classes"
    )
    for name, purpose in (("train", "`dml train` has nothing to train on"), ("query", "`dml evaluate` has no queries")):
        if manifest["splits"].get(name, {}).get("count", 0) == 0:
            log.warning("prepare: the split leaves no %s samples (%s): %s", name, settings, purpose)


def run_merge(shard_dir: str | Path) -> PrepareResult:
    """Combine the partial manifests of a partitioned run into manifest.json."""
    manifest = merge_manifests(shard_dir)
    counts = manifest["counts"]
    path = Path(shard_dir) / MANIFEST
    check_outcome(manifest, path)
    log.info("prepare: merged partial manifests -> %s", path)
    return PrepareResult(Path(shard_dir), path, counts["inputs"], counts["written"], counts["rejected"])


def run_verify(shard_dir: str | Path) -> list[str]:
    """Re-hash every shard; return the problems (empty when all shards match)."""
    problems = verify_shards(shard_dir)
    log.info("prepare: verified %s: %s", shard_dir, "ok" if not problems else f"{len(problems)} problem(s)")
    return problems
