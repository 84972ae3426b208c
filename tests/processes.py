"""Process state read from Linux /proc, for tests that check which workers still run."""

from __future__ import annotations

from pathlib import Path


def _state_and_parent(pid: int | str) -> tuple[str, int]:
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``, zombies included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                _, parent = _state_and_parent(entry.name)
            except OSError:
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its new parent to reap it is dead)."""
    try:
        return _state_and_parent(pid)[0] != "Z"
    except OSError:
        return False
