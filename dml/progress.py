"""Progress of long work: a tqdm bar on a terminal, and periodic log lines elsewhere.

Where stderr is not a terminal (CI logs, Kubernetes pods, Prefect task logs) a redrawn bar
is hidden, so the same tqdm object instead writes one plain line through the ``dml.progress``
logger at most every ``DML_PROGRESS_SECONDS`` seconds (default 30), plus a first and a last
line: ``train: 120/1000 step (12%) [00:40<04:53, 3.0 step/s, loss=1.234]``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sized
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)
INTERVAL_ENV, DEFAULT_SECONDS = "DML_PROGRESS_SECONDS", 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
OPEN_FORMAT = "{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}{postfix}]"  # total unknown


class LogLines:
    """A file-like target for tqdm that turns each redraw into one log line (repeats dropped)."""

    def __init__(self) -> None:
        self.last = ""

    def write(self, text: str) -> None:
        """Log one redraw of the bar as an INFO line, unless it repeats the last one."""
        line = text.strip("\r\n ")
        if line and line != self.last:
            self.last = line
            log.info("%s", line)

    def flush(self) -> None:
        """Nothing to flush: every line is logged as it is written."""


def interval_seconds() -> float:
    """Seconds between progress lines off a terminal (``DML_PROGRESS_SECONDS``, default 30)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def progress(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    show: bool = True,
    leave: bool = True,
    **kwargs: Any,
) -> tqdm:
    """A tqdm over ``iterable`` / ``total``: a bar on a terminal, periodic log lines otherwise,
    nothing when ``show`` is False (ranks other than 0)."""
    if not show:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, **kwargs)
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=f" {unit}",
        initial=initial,
        file=LogLines(),
        mininterval=interval_seconds(),
        ascii=True,
        leave=True,
        bar_format=LINE_FORMAT if total else OPEN_FORMAT,
        **kwargs,
    )
