"""Worker processes that end with the process that started them, and stop cleanly on Ctrl-C / SIGTERM.

A parent killed with SIGKILL runs no clean-up, so its pool workers would live on as orphans
and keep writing. Each worker therefore asks the kernel to kill it when its parent dies
(Linux ``prctl(PR_SET_PDEATHSIG)``), and also watches its parent's pid from a daemon
thread: that covers other systems, and a parent that died before the signal was armed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_INTERVAL_S = 1.0


def die_with_parent(parent_pid: int, use_prctl: bool = True) -> None:
    """Make the calling process exit as soon as process ``parent_pid`` (its parent) ends.

    Call it first thing in a worker (a pool initializer). ``use_prctl=False`` relies on the
    pid watch alone, as on systems without ``prctl``.
    """
    if use_prctl:
        _set_parent_death_signal(signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent was already gone when the signal was armed
        os._exit(1)


def _set_parent_death_signal(sig: signal.Signals) -> bool:
    """Ask the Linux kernel to send ``sig`` when the parent dies; False where unsupported."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _resolve_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # the running program's symbols include libc's
    except (OSError, AttributeError):
        return None


_PRCTL = _resolve_prctl()  # looked up at import: a child between fork and exec only calls it


def arm_parent_death_signal() -> None:
    """A ``preexec_fn`` for `subprocess`: the child gets SIGTERM when the thread that started
    it ends (Linux; a no-op elsewhere), so a launcher killed with SIGKILL leaves no child
    behind. torchrun passes the SIGTERM on to its workers. Only calls a function looked up
    beforehand: between fork and exec nothing may import or allocate much."""
    _set_parent_death_signal(signal.SIGTERM)


def _watch_parent(parent_pid: int) -> None:
    # An orphan is re-parented (to init or a subreaper), so its parent pid changes.
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)


def ignore_interrupts() -> None:
    """In a worker: leave Ctrl-C to the parent and restore SIGTERM's default action.

    Ctrl-C reaches the whole process group; a worker that raised KeyboardInterrupt printed a
    traceback and broke the pool while the parent was cleaning up. A forked worker also
    inherits the parent's SIGTERM handler (`sigterm_as_interrupt`), which is not its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Interrupted(KeyboardInterrupt):
    """The work was stopped (Ctrl-C or SIGTERM) after its clean-up; the message says what next."""


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt(message: str) -> Iterator[None]:
    """Within the block, SIGTERM (kill, timeout, Kubernetes) acts like Ctrl-C, so ``finally``
    clean-ups run (SIGTERM's default action ends the process at once); either becomes
    `Interrupted` with ``message``. Only the main thread can set handlers: elsewhere the block
    runs as it is."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(message) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
