"""`manifest.json`: the contract between `dml prepare` and every later stage.

It lists the classes (index -> name), per-split and per-shard counts, each shard's sha256,
the source, the config and every rejected input with a reason code and reason: inputs refused
while listing (hidden, duplicate, bad row, ...; ``key`` null, ``row`` for tables) and inputs
that could not be read or decoded (code ``unreadable``, with their shard key). Partitioned runs write
``manifest.part-IIIII-of-NNNNN.json``; `merge_manifests` combines them into the same
``manifest.json`` a single run would have written.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dml.errors import DataError
from dml.files import sha256_file, write_json_atomic

if TYPE_CHECKING:
    from dml.config import PrepareConfig
    from dml.data.plan import ShardPlan
    from dml.data.shards import ShardResult

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Code of a rejection found while reading or decoding an image (listing rules give their own).
UNREADABLE = "unreadable"


def manifest_name(partition: tuple[int, int] | None) -> str:
    """File name of the full manifest, or of one partition's partial manifest."""
    if partition is None:
        return MANIFEST
    index, count = partition
    return f"manifest.part-{index:05d}-of-{count:05d}.json"


def _splits_from_shards(shards: list[dict]) -> dict[str, dict]:
    splits: dict[str, dict] = {}
    for shard in sorted(shards, key=lambda s: s["name"]):
        entry = splits.setdefault(shard["split"], {"count": 0, "class_counts": Counter(), "shards": []})
        entry["count"] += shard["count"]
        entry["class_counts"].update({int(k): v for k, v in shard["class_counts"].items()})
        entry["shards"].append({k: shard[k] for k in ("name", "count", "bytes", "sha256")})
    for entry in splits.values():
        counts = entry["class_counts"]
        entry["num_classes"] = len(counts)
        entry["class_counts"] = {str(k): counts[k] for k in sorted(counts)}
    return dict(sorted(splits.items()))


def _build(
    classes: list[str],
    shards: list[dict],
    rejected: list[dict],
    *,
    source: dict,
    config: dict,
    digest: str,
    skipped: int,
    partition: tuple[int, int] | None,
) -> dict:
    written = sum(s["count"] for s in shards)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "dml prepare",
        "source": source,
        "config": config,
        "plan_digest": digest,
        "partition": None if partition is None else {"index": partition[0], "count": partition[1]},
        "classes": classes,
        "splits": _splits_from_shards(shards),
        "counts": {
            "inputs": written + len(rejected),
            "written": written,
            "rejected": len(rejected),
            "rejected_by_code": dict(sorted(Counter(r.get("code", UNREADABLE) for r in rejected).items())),
            "skipped_over_max_per_class": skipped,
        },
        # Refused while listing (key null) first, by source path and row; then by shard key.
        "rejected": sorted(
            rejected, key=lambda r: (r["key"] is not None, r["key"] or "", r["source"], r.get("row", -1))
        ),
        # Kept so partial manifests can be merged without re-reading shards.
        "shard_records": sorted(shards, key=lambda s: s["name"]) if partition is not None else None,
    }
    return manifest


def assemble_manifest(
    plan: ShardPlan, results: list[ShardResult], source: dict, config: PrepareConfig, partition: tuple[int, int] | None
) -> dict:
    """Build the manifest for the shards in ``results`` and check no input went missing.

    Raises DataError when a shard's written and rejected samples do not add up to its plan.
    """
    from dataclasses import asdict

    shards = [asdict(r) for r in results]
    rejected = [{"code": UNREADABLE, **item} for r in results for item in r.rejected]
    if partition is None or partition[0] == 0:  # inputs refused while listing: one partition names them
        rejected += plan.rejected
    for shard in shards:
        shard.pop("rejected")
    planned = {t.name: len(t.samples) for t in plan.tasks}
    for r in results:
        if r.count + len(r.rejected) != planned[r.name]:
            raise DataError(
                f"shard {r.name}: {planned[r.name]} planned, {r.count} written + {len(r.rejected)} rejected"
            )
    return _build(
        plan.classes,
        shards,
        rejected,
        source=source,
        config=config.model_dump(mode="json"),
        digest=plan.digest,
        skipped=plan.skipped_over_cap if partition is None or partition[0] == 0 else 0,
        partition=partition,
    )


def write_manifest(out_dir: Path, manifest: dict, partition: tuple[int, int] | None = None) -> Path:
    """Write ``manifest`` atomically as ``manifest.json`` (or the partition's part file); returns its path."""
    path = Path(out_dir) / manifest_name(partition)
    write_json_atomic(path, manifest)
    return path


def load_manifest(shard_dir: str | Path) -> dict:
    """Read ``manifest.json`` from a shard directory; a missing, unreadable or foreign file
    (not written by `dml prepare`) is a one-line `DataError`."""
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"no {MANIFEST} in {shard_dir}: run `dml prepare` (or --merge) first")
    return _read_manifest_file(path)


def _read_manifest_file(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    _check_ours(manifest, path)
    return manifest


def _check_ours(manifest: Any, path: Path) -> None:
    """Raise unless ``manifest`` has the layout `dml prepare` writes (down to each shard entry)."""
    ours = isinstance(manifest, dict) and manifest.get("created_by") == "dml prepare"
    if ours and manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {manifest.get('format_version')!r}; this dml reads version {FORMAT_VERSION}"
        )
    splits = manifest.get("splits") if ours else None
    ours = isinstance(splits, dict) and all(
        isinstance(split, dict)
        and isinstance(split.get("shards"), list)
        and all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("sha256"), str)
            for s in split["shards"]
        )
        for split in splits.values()
    )
    if not ours:
        raise DataError(
            f"{path} is not a manifest written by `dml prepare` "
            "(expected created_by 'dml prepare' and splits with named, hashed shards)"
        )


def manifest_digest(shard_dir: str | Path) -> str:
    """sha256 of the manifest file: identifies the data for caching and reports."""
    return sha256_file(Path(shard_dir) / MANIFEST)


def split_shards(manifest: dict, shard_dir: str | Path, split: str) -> list[str]:
    """Paths of a split's shards; an unknown split is a one-line error naming the known ones.

    Raises DataError for an unknown split.
    """
    if split not in manifest["splits"]:
        raise DataError(f"split '{split}' not in manifest (has: {', '.join(manifest['splits'])})")
    return [str(Path(shard_dir) / s["name"]) for s in manifest["splits"][split]["shards"]]


def verify_shards(shard_dir: str | Path) -> list[str]:
    """Re-hash every shard listed in the manifest; return one message per missing/altered shard."""
    manifest = load_manifest(shard_dir)
    problems = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = Path(shard_dir) / shard["name"]
            if not path.exists():
                problems.append(f"missing shard: {shard['name']}")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"altered shard: {shard['name']} (sha256 differs from the manifest)")
    return problems


def merge_manifests(shard_dir: str | Path) -> dict:
    """Combine all partial manifests of a partitioned run into ``manifest.json``.

    Raises DataError when parts are missing, foreign, or from other partition counts or plans.
    """
    shard_dir = Path(shard_dir)
    parts = sorted(shard_dir.glob("manifest.part-*-of-*.json"))
    if not parts:
        raise DataError(f"no partial manifests (manifest.part-*.json) in {shard_dir}")
    loaded = [_read_manifest_file(p) for p in parts]
    if foreign := [p.name for p, m in zip(parts, loaded, strict=True) if not isinstance(m.get("partition"), dict)]:
        raise DataError(f"cannot merge: {foreign[0]} in {shard_dir} is not a partial manifest")
    counts = sorted({m["partition"]["count"] for m in loaded})
    if len(counts) > 1:  # a job re-run with another N leaves the old N's parts: both sets would be summed
        per_count = Counter(m["partition"]["count"] for m in loaded)
        held = ", ".join(f"{per_count[n]} of {n} (manifest.part-*-of-{n:05d}.json)" for n in counts)
        raise DataError(
            f"cannot merge: {shard_dir} holds partial manifests of {len(counts)} partition counts: "
            f"{held}; remove those of the count no longer in use and merge again"
        )
    count = counts[0]
    have = {m["partition"]["index"] for m in loaded}
    if missing := sorted(set(range(count)) - have):
        raise DataError(f"cannot merge: partitions {missing} of {count} have not finished")
    if len({m["plan_digest"] for m in loaded}) != 1:
        raise DataError("cannot merge: partial manifests come from different plans (source or config differ)")
    first = loaded[0]
    manifest = _build(
        first["classes"],
        [s for m in loaded for s in m["shard_records"]],
        [r for m in loaded for r in m["rejected"]],
        source=first["source"],
        config=first["config"],
        digest=first["plan_digest"],
        skipped=sum(m["counts"]["skipped_over_max_per_class"] for m in loaded),
        partition=None,
    )
    write_manifest(shard_dir, manifest)
    return manifest
