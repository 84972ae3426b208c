"""The one clock of records written to disk: UTC, ISO 8601, to the second."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> str:
    """The current UTC time as ``2026-01-31T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """The current UTC time for file names: ``20260131T120000Z``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
