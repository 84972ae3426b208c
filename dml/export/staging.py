"""Files of an export are written under temporary names and renamed only when all checks pass.

A failed export therefore never leaves a file under a final name (``model.onnx``,
``model_card.json``, ...) that a deployment could mistake for a checked model: temporaries
are hidden ``.<name>.partial`` files, deleted on failure. The card is renamed last, so a
card on disk always describes files that are already in place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class StagedFiles:
    """Temporary paths for final file names in one directory; ``commit`` renames them in order.

    Use as a context manager: leaving the block with an exception deletes every temporary.
    Files already in the directory under final names are replaced only by ``commit``.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._staged: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        """The temporary path that will become ``directory / name`` on commit."""
        if name not in self._staged:
            temporary = self.directory / f".{name}.partial"
            temporary.unlink(missing_ok=True)  # left over from a crashed run
            self._staged[name] = temporary
        return self._staged[name]

    def final(self, name: str) -> Path:
        """Where ``name`` will be after `commit`: ``directory / name``."""
        return self.directory / name

    def commit(self) -> dict[str, Path]:
        """Rename every temporary to its final name, in the order they were first asked for."""
        committed = {}
        for name, temporary in self._staged.items():
            os.replace(temporary, self.final(name))
            committed[name] = self.final(name)
        self._staged.clear()
        return committed

    def discard(self) -> None:
        """Delete every temporary not yet committed."""
        for temporary in self._staged.values():
            temporary.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is not None:
            log.info("export failed; removing %d unfinished file(s) in %s", len(self._staged), self.directory)
        self.discard()
