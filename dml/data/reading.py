"""Reading a shard as the manifest describes it: the one check every reader goes through.

Training (uniform and P x K), evaluation, the teacher cache, export parity images and report
look-ups all read samples with `read_shard`, and decode images with `decode_image`. Each
knows from ``manifest.json`` how many samples a shard holds, so these are found in one place:

- a shard that ends early (fewer samples than the manifest lists), or cannot be opened;
- a member that cannot be read (cut inside it, or an unreadable header);
- a sample missing a part (image, ``.cls``, ``.json``), or whose ``.cls`` / ``.json`` does not parse;
- an image whose bytes do not decode.

What happens then is ``data.bad_samples`` (`BadSamplePolicy`): ``stop`` (the default) raises
`BadSampleError`, one line naming the shard, the sample key and the reason; ``skip`` logs one
warning per bad sample (per reading process), drops it and counts it in a counter shared
with DataLoader workers, which training writes to ``metrics.jsonl``. Evaluation compares
what it embedded with the manifest's count and says so in its report.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from dml.data import pixels
from dml.data.manifest import split_shards
from dml.data.tar_members import TarMemberError, iter_tar_members, member_key
from dml.errors import DataError

log = logging.getLogger(__name__)
IMAGE_PARTS = ("jpg", "png", "jpeg")
POLICIES = ("stop", "skip")


class BadSampleError(DataError):
    """A shard, member or sample that does not match the manifest (one line: shard, key, reason).

    Raised in a DataLoader worker, torch re-creates it in the main process with the worker's
    whole traceback as its message; the constructor keeps only the original line.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if f"{type(self).__name__}: " in last else last
        super().__init__(message)


@dataclass(frozen=True)
class ShardSpec:
    """One shard to read: its path and the number of samples the manifest lists for it."""

    url: str
    count: int


def split_shard_specs(manifest: dict, shard_dir: str | Path, split: str) -> list[ShardSpec]:
    """The shards of ``split`` with their manifest counts (unknown split: one-line `DataError`)."""
    urls = split_shards(manifest, shard_dir, split)
    return [
        ShardSpec(url, int(entry["count"]))
        for url, entry in zip(urls, manifest["splits"][split]["shards"], strict=True)
    ]


class BadSamplePolicy:
    """What to do with a bad sample: ``stop`` (raise `BadSampleError`) or ``skip`` (warn unless
    ``warn`` is off, and count).

    Picklable into DataLoader workers (fork or spawn); ``skipped`` is shared with them.
    """

    def __init__(self, mode: str = "stop", warn: bool = True):
        if mode not in POLICIES:
            raise ValueError(f"bad-sample policy must be one of {POLICIES}, got {mode!r}")
        self.mode, self.warn = mode, warn
        self._skipped = multiprocessing.get_context().Value("q", 0)
        self._warned: set[tuple[str, str]] = set()

    @property
    def skipped(self) -> int:
        """Distinct bad samples dropped so far by this process and its DataLoader workers (a
        worker that reads the same bad sample again does not count it again)."""
        return int(self._skipped.value)

    def bad(self, shard: str, key: str, reason: str, count: int = 1) -> None:
        """Report ``count`` bad samples at ``key`` of ``shard``: raise, or warn once and count.

        Raises BadSampleError in ``stop`` mode.
        """
        message = f"{shard}: sample {key}: {reason}"
        if self.mode == "stop":
            raise BadSampleError(f"{message} (data.bad_samples=skip drops bad samples instead)")
        # Counted and warned once per (shard, key) in a process: the training stream draws
        # shards again and again to fill its shuffle buffer, and a count per read told a user
        # 10,035 skipped samples for a shard that lacked 15.
        if (shard, key) in self._warned:
            return
        self._warned.add((shard, key))
        with self._skipped.get_lock():
            self._skipped.value += count
        if self.warn:
            log.warning("skipped %s", message)


def sample_problem(sample: dict[str, Any]) -> str | None:
    """Why a raw sample (bytes per extension) is unusable, or None: parts and their parsing."""
    if not any(part in sample for part in IMAGE_PARTS):
        return "no image part (.jpg/.png)"
    for part in ("cls", "json"):
        if part not in sample:
            return f"missing part .{part}"
    try:
        int(sample["cls"])
    except ValueError:
        return f"bad .cls {bytes(sample['cls'][:20])!r} (not a class index)"
    try:
        json.loads(sample["json"])
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return f"bad .json ({exc})"
    return None


class _ShardCheck:
    """Counts the samples of one shard and reports each bad one to the policy."""

    def __init__(self, shard: ShardSpec, policy: BadSamplePolicy):
        self.shard, self.policy = shard, policy
        self.seen = 0
        self.last_key = "<start of shard>"

    def bad(self, key: str, reason: str, count: int = 1) -> None:
        self.policy.bad(self.shard.url, key, reason, count)

    def finish(self, sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield ``sample`` if it is good and within the manifest's count; else report it."""
        self.seen += 1
        self.last_key = sample["__key__"]
        if self.seen > self.shard.count:
            self.bad(self.last_key, f"the manifest lists {self.shard.count} samples; this is sample {self.seen}")
        elif (problem := sample_problem(sample)) is not None:
            self.bad(self.last_key, problem)
        else:
            yield sample

    def broken(self, key: str, reason: str) -> None:
        self.seen += 1
        self.last_key = key
        self.bad(key, reason)

    def end(self) -> None:
        missing = self.shard.count - self.seen
        if missing > 0:
            self.bad(
                f"after {self.last_key}",
                f"shard ends after {self.seen} of the {self.shard.count} samples "
                f"the manifest lists ({missing} missing)",
                count=missing,
            )


def _members(stream: BinaryIO, url: str) -> Iterator[tuple[str, str, bytes]]:
    for name, data in iter_tar_members(stream, url):
        key, ext = member_key(name)
        yield key, ext, data


def read_shard(shard: ShardSpec, policy: BadSamplePolicy) -> Iterator[dict[str, Any]]:
    """Good raw samples of one shard (``__key__``, ``__url__``, bytes per extension), in order.

    Every problem (see the module docstring) goes to ``policy``: with ``stop`` the first one
    raises `BadSampleError`; with ``skip`` the bad sample is dropped and counted, and a shard
    that ends early counts every sample it lacks.
    """
    check = _ShardCheck(shard, policy)
    current: dict[str, Any] | None = None
    try:
        with open(shard.url, "rb", buffering=1 << 20) as stream:
            for key, ext, data in _members(stream, shard.url):
                if current is not None and current["__key__"] != key:
                    yield from check.finish(current)
                    current = None
                current = current or {"__key__": key, "__url__": shard.url}
                current[ext] = data
    except TarMemberError as exc:
        reason = str(exc).removeprefix(f"{shard.url}: ")
        if exc.member:  # this member is unreadable: its sample is bad, whatever came before
            key = member_key(exc.member)[0]
            if current is not None and current["__key__"] != key:
                yield from check.finish(current)
            check.broken(key, reason)
        elif current is not None and sample_problem(current) is not None:
            check.broken(current["__key__"], f"incomplete: {reason}")
        elif current is not None:
            yield from check.finish(current)
        current = None
    except OSError as exc:
        check.bad("<whole shard>", f"cannot be read ({exc.strerror or exc})", count=shard.count)
        return
    if current is not None:
        yield from check.finish(current)
    check.end()


def decode_image(sample: dict[str, Any], policy: BadSamplePolicy) -> Image.Image | None:
    """The sample's image, fully decoded by the pipeline's pixel rule (`dml.data.pixels`:
    oriented, 8-bit L or RGB); None (after telling ``policy``) when its bytes do not decode."""
    data = next(sample[part] for part in IMAGE_PARTS if part in sample)
    try:
        return pixels.decode_image(data)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds on corrupt bytes; each means "does not decode"
        policy.bad(
            sample.get("__url__", "?"), sample["__key__"], f"image does not decode ({type(exc).__name__}: {exc})"
        )
        return None
