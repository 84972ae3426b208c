"""The one error a pipeline stage raises: which stage failed, why, and where its log is."""

from __future__ import annotations

from pathlib import Path


class StageFailed(RuntimeError):
    """A stage did not finish. ``input_error`` marks failures that a retry cannot fix (bad
    config, missing data: the `DMLError` family, or the CLI's one-line ``error:`` exit)."""

    def __init__(self, stage: str, reason: str, log_path: str | Path | None, input_error: bool = False):
        self.stage = stage
        self.reason = reason
        self.log_path = str(log_path) if log_path is not None else None
        self.input_error = input_error
        where = f" (log: {self.log_path})" if self.log_path else ""
        super().__init__(f"stage '{stage}' failed: {reason}{where}")

    def __reduce__(self):  # keep all fields when Prefect pickles the exception into a state
        return (type(self), (self.stage, self.reason, self.log_path, self.input_error))
