"""The shard plan: which record goes to which split and which shard, decided before any work.

The plan depends only on the record list and the config (seeded RNG), so every partition of a
cluster job computes the same plan and writes disjoint shards of it, and a resumed run knows
exactly which shards are still owed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dml.config import PrepareConfig
from dml.data.sources import Record, Source
from dml.errors import DataError
from dml.progress import progress

log = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")
# split.mode "source": these split values are honoured as given; HELD_OUT is drawn into query
# and gallery per class by query_fraction (IDX t10k and Omniglot evaluation use it).
HELD_OUT = "test"
SOURCE_SPLITS = (*SPLITS, HELD_OUT)


@dataclass(frozen=True)
class PlannedSample:
    """One record with its global key and class index, as it will appear in a shard."""

    key: str
    record: Record
    class_index: int


@dataclass
class ShardTask:
    """One shard to write: its file name, split and samples in order."""

    name: str
    split: str
    samples: list[PlannedSample] = field(default_factory=list)


@dataclass
class ShardPlan:
    """Classes, shard tasks and the inputs refused before reading (manifest ``rejected`` entries)."""

    classes: list[str]
    tasks: list[ShardTask]
    skipped_over_cap: int
    digest: str
    rejected: list[dict] = field(default_factory=list)

    def for_partition(self, index: int, count: int) -> list[ShardTask]:
        """The shards partition ``index`` of ``count`` writes (round-robin over the plan)."""
        return [t for i, t in enumerate(self.tasks) if i % count == index]


def sorted_class_names(labels: set[str]) -> list[str]:
    """Class names in a stable order: numeric when every label is an integer, else lexical.

    Labels of equal value (``1`` and ``01``) are two classes, ordered by their text: sorting
    by value alone left them in the set's order, which changes with Python's per-process
    string hashing, so class indices, shards and the plan digest changed from run to run.
    """
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def _cap_per_class(records: list[Record], cap: int | None) -> tuple[list[Record], int]:
    if cap is None:
        return records, 0
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for record in records:
        seen[record.label] += 1
        if seen[record.label] <= cap:
            kept.append(record)
    return kept, len(records) - len(kept)


def _split_held_out(
    indices: list[int], query_fraction: float, rng: np.random.Generator, assignment: dict[int, str]
) -> None:
    """Assign one class's held-out samples to query and gallery (at least one query)."""
    order = [indices[i] for i in rng.permutation(len(indices))]
    n_query = len(order) if query_fraction >= 1.0 else max(1, round(query_fraction * len(order)))
    for pos, idx in enumerate(order):
        assignment[idx] = "query" if pos < n_query else "gallery"


def _train_classes(classes: list[str], split_cfg, rng: np.random.Generator) -> set[str]:
    if split_cfg.train_classes is not None:
        unknown = sorted(set(split_cfg.train_classes) - set(classes))
        if unknown:
            raise DataError(f"split.train_classes names classes not in the source: {unknown[:5]}")
        return set(split_cfg.train_classes)
    order = [classes[i] for i in rng.permutation(len(classes))]
    return set(order[: round(split_cfg.train_fraction * len(order))])


def assign_splits(records: list[Record], config: PrepareConfig) -> dict[int, str]:
    """Map record position -> split name for the configured split mode.

    In split.mode "source" every record's split must be one of SOURCE_SPLITS already
    (`reject_bad_source_splits`).
    """
    split_cfg = config.split
    rng = np.random.default_rng(split_cfg.seed)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_class[record.label].append(i)
    classes = sorted_class_names(set(by_class))
    assignment: dict[int, str] = {}
    if split_cfg.mode == "class":
        train_classes = _train_classes(classes, split_cfg, rng)
        for name in classes:
            if name in train_classes:
                assignment.update(dict.fromkeys(by_class[name], "train"))
            else:
                _split_held_out(by_class[name], split_cfg.query_fraction, rng, assignment)
    elif split_cfg.mode == "sample":
        for name in classes:
            members = [by_class[name][i] for i in rng.permutation(len(by_class[name]))]
            n_train = round(split_cfg.train_fraction * len(members))
            assignment.update(dict.fromkeys(members[:n_train], "train"))
            if members[n_train:]:
                _split_held_out(members[n_train:], split_cfg.query_fraction, rng, assignment)
    else:  # source: train / query / gallery as given; HELD_OUT drawn per class
        for name in classes:
            held = []
            for i in by_class[name]:
                split = records[i].split
                if split == HELD_OUT:
                    held.append(i)
                else:
                    assert split is not None  # reject_bad_source_splits refused records without one
                    assignment[i] = split
            if held:
                _split_held_out(held, split_cfg.query_fraction, rng, assignment)
    return assignment


def _chunk(samples: list[PlannedSample], sizes: list[int], split: str, config: PrepareConfig) -> list[ShardTask]:
    tasks: list[ShardTask] = []
    current: ShardTask | None = None
    current_bytes = 0
    for sample, size in zip(samples, sizes, strict=True):
        full = current is not None and (
            len(current.samples) >= config.shards.max_samples or current_bytes + size > config.shards.max_bytes
        )
        if current is None or full:
            current = ShardTask(f"{split}-{len(tasks):06d}.tar", split)
            tasks.append(current)
            current_bytes = 0
        current.samples.append(sample)
        current_bytes += size
    return tasks


def reject_bad_source_splits(records: list[Record]) -> list[Record]:
    """For split.mode "source": records whose split value is missing or unknown become rejected.

    Raises DataError when no record has a split value at all (the source has no split column).
    """
    if records and all(r.split is None for r in records):
        raise DataError("split.mode 'source' needs a split column or file in the source; this source has none")
    out = []
    for r in records:
        if r.rejection is None and r.split not in SOURCE_SPLITS:
            reason = (
                f"split value '{r.split}' is not one of {', '.join(SOURCE_SPLITS)}"
                if r.split is not None
                else "no split value"
            )
            r = r.rejected("bad_split", reason)
        out.append(r)
    return out


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: bytes of a file name that are not UTF-8
        return True
    return False


def reject_names_not_utf8(records: list[Record]) -> list[Record]:
    """Records whose path or label holds bytes that are not UTF-8 (file names from another
    system's encoding, read as surrogates) become rejected ``bad_name``: the shard metadata,
    manifest, plan digest and reports are UTF-8 text (the digest raised UnicodeEncodeError)."""
    out = []
    for r in records:
        if r.rejection is None and (_not_utf8(r.source_id) or _not_utf8(r.label)):
            where = "path" if _not_utf8(r.source_id) else "class name"
            r = r.rejected(
                "bad_name", f"the {where} is not valid UTF-8 (another system's file name encoding?); rename it"
            )
        out.append(r)
    return out


def rejection_entry(record: Record) -> dict:
    """A manifest ``rejected`` entry for a record refused before reading (no shard key)."""
    assert record.rejection is not None
    entry: dict[str, Any] = {
        "key": None,
        "source": record.source_id,
        "code": record.rejection.code,
        "reason": record.rejection.reason,
    }
    if record.row is not None:
        entry["row"] = record.row
    return entry


def _by_code(rejected: list[dict]) -> str:
    return ", ".join(f"{n} {code}" for code, n in sorted(Counter(e["code"] for e in rejected).items()))


def _no_usable_inputs(listed: list[Record], rejected: list[dict], path: object) -> DataError:
    if not listed:
        return DataError(f"source is empty: no inputs found in {path}")
    first = rejected[0]
    return DataError(
        f"no usable inputs in {path}: {len(listed)} listed, all rejected ({_by_code(rejected)}); "
        f"first: {first['source'] or '(no path)'}: {first['reason']}"
    )


def make_plan(source: Source, config: PrepareConfig) -> ShardPlan:
    """List the source and decide every sample's key, class index, split and shard.

    Inputs refused while listing (by the source's rules, or an unknown split value in
    split.mode "source") go to ``plan.rejected``. Raises DataError when no input is usable.
    """
    log.info("prepare: planning (listing %s)", source.description.get("path"))
    listed = reject_names_not_utf8(source.records())
    if config.split.mode == "source":
        listed = reject_bad_source_splits(listed)
    rejected = [rejection_entry(r) for r in listed if r.rejection is not None]
    records, skipped = _cap_per_class([r for r in listed if r.rejection is None], config.max_per_class)
    if not records:
        raise _no_usable_inputs(listed, rejected, source.description.get("path"))
    if rejected:
        log.info(
            "listing: %d inputs, %d refused by the input rules (%s); each is named in the manifest",
            len(listed),
            len(rejected),
            _by_code(rejected),
        )
    classes = sorted_class_names({r.label for r in records})
    class_index = {name: i for i, name in enumerate(classes)}
    assignment = assign_splits(records, config)
    width = max(9, len(str(len(records))))
    rng = np.random.default_rng(config.split.seed + 1)
    tasks: list[ShardTask] = []
    sizing = progress(total=len(records), desc="prepare: planning", unit="img")
    for split in SPLITS:
        members = [i for i in range(len(records)) if assignment.get(i) == split]
        # Shuffle within the split so each shard mixes classes (streaming shuffles stay local).
        members = [members[i] for i in rng.permutation(len(members))]
        samples = [PlannedSample(f"{i:0{width}d}", records[i], class_index[records[i].label]) for i in members]
        sizes = []
        for i in members:  # a stat per file for some sources: minutes at millions of files
            sizes.append(source.size_hint(records[i]))
            sizing.update()
        tasks.extend(_chunk(samples, sizes, split, config))
    sizing.close()
    return ShardPlan(classes, tasks, skipped, _plan_digest(classes, tasks, rejected, config), rejected)


def _plan_digest(classes: list[str], tasks: list[ShardTask], rejected: list[dict], config: PrepareConfig) -> str:
    """A hash of everything that decides shard contents and the refusals, to refuse mixing plans
    on resume/merge."""
    h = hashlib.sha256()
    settings = config.model_dump(mode="json", exclude={"workers", "output_dir"})
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(classes).encode())
    for task in tasks:
        h.update(task.name.encode())
        for s in task.samples:
            face = f"\t{s.record.face}" if s.record.face is not None else ""  # aligned crops depend on it
            h.update(f"{s.key}\t{s.record.source_id}\t{s.class_index}{face}\n".encode())
    if rejected:  # (not hashed when empty, so plans without refusals keep their digest)
        h.update(json.dumps(rejected, sort_keys=True).encode())
    return h.hexdigest()
