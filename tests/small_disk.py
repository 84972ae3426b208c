"""A real small disk for disk-full tests: a tmpfs mounted in a test's folder (needs root and
`mount`; the test is skipped with the reason where it cannot be made)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (mount's syntax: ``256k``, ``16m``) at ``mount_point``."""
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a full disk cannot be made here")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {made.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)  # lazy: a busy mount still goes
