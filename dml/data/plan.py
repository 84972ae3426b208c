"""The shard plan: which record goes to which split and which shard, decided before any work.

The plan depends only on the record list and the config (seeded RNG), so every partition of a
cluster job computes the same plan and writes disjoint shards of it, and a resumed run knows
exactly which shards are still owed.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from dml.config import PrepareConfig
from dml.data.sources import Record, Source
from dml.errors import DataError

SPLITS = ("train", "query", "gallery")


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
    classes: list[str]
    tasks: list[ShardTask]
    skipped_over_cap: int
    digest: str

    def for_partition(self, index: int, count: int) -> list[ShardTask]:
        """The shards partition ``index`` of ``count`` writes (round-robin over the plan)."""
        return [t for i, t in enumerate(self.tasks) if i % count == index]


def sorted_class_names(labels: set[str]) -> list[str]:
    """Class names in a stable order: numeric when every label is an integer, else lexical."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
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


def _split_held_out(indices: list[int], query_fraction: float, rng: np.random.Generator,
                    assignment: dict[int, str]) -> None:
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
    return set(order[:round(split_cfg.train_fraction * len(order))])


def assign_splits(records: list[Record], config: PrepareConfig) -> dict[int, str]:
    """Map record position -> split name for the configured split mode."""
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
                assignment.update({i: "train" for i in by_class[name]})
            else:
                _split_held_out(by_class[name], split_cfg.query_fraction, rng, assignment)
    elif split_cfg.mode == "sample":
        for name in classes:
            members = [by_class[name][i] for i in rng.permutation(len(by_class[name]))]
            n_train = round(split_cfg.train_fraction * len(members))
            assignment.update({i: "train" for i in members[:n_train]})
            if members[n_train:]:
                _split_held_out(members[n_train:], split_cfg.query_fraction, rng, assignment)
    else:  # source
        missing = sum(1 for r in records if r.split is None)
        if missing:
            raise DataError(f"split.mode 'source' needs a split for every input; {missing} have none")
        for name in classes:
            held = [i for i in by_class[name] if records[i].split != "train"]
            assignment.update({i: "train" for i in by_class[name] if records[i].split == "train"})
            if held:
                _split_held_out(held, split_cfg.query_fraction, rng, assignment)
    return assignment


def _chunk(samples: list[PlannedSample], sizes: list[int], split: str, config: PrepareConfig) -> list[ShardTask]:
    tasks: list[ShardTask] = []
    current: ShardTask | None = None
    current_bytes = 0
    for sample, size in zip(samples, sizes):
        full = current is not None and (
            len(current.samples) >= config.shards.max_samples
            or current_bytes + size > config.shards.max_bytes)
        if current is None or full:
            current = ShardTask(f"{split}-{len(tasks):06d}.tar", split)
            tasks.append(current)
            current_bytes = 0
        current.samples.append(sample)
        current_bytes += size
    return tasks


def make_plan(source: Source, config: PrepareConfig) -> ShardPlan:
    """List the source and decide every sample's key, class index, split and shard."""
    records, skipped = _cap_per_class(source.records(), config.max_per_class)
    if not records:
        raise DataError(f"source is empty: no inputs found in {source.description.get('path')}")
    classes = sorted_class_names({r.label for r in records})
    class_index = {name: i for i, name in enumerate(classes)}
    assignment = assign_splits(records, config)
    width = max(9, len(str(len(records))))
    rng = np.random.default_rng(config.split.seed + 1)
    tasks: list[ShardTask] = []
    for split in SPLITS:
        members = [i for i in range(len(records)) if assignment.get(i) == split]
        # Shuffle within the split so each shard mixes classes (streaming shuffles stay local).
        members = [members[i] for i in rng.permutation(len(members))]
        samples = [PlannedSample(f"{i:0{width}d}", records[i], class_index[records[i].label]) for i in members]
        sizes = [source.size_hint(records[i]) for i in members]
        tasks.extend(_chunk(samples, sizes, split, config))
    return ShardPlan(classes, tasks, skipped, _plan_digest(classes, tasks, config))


def _plan_digest(classes: list[str], tasks: list[ShardTask], config: PrepareConfig) -> str:
    """A hash of everything that decides shard contents, to refuse mixing plans on resume/merge."""
    h = hashlib.sha256()
    settings = config.model_dump(mode="json", exclude={"workers", "output_dir"})
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(classes).encode())
    for task in tasks:
        h.update(task.name.encode())
        for s in task.samples:
            h.update(f"{s.key}\t{s.record.source_id}\t{s.class_index}\n".encode())
    return h.hexdigest()
