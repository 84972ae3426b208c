"""Run a stage inside the flow's own process by calling its `dml` stage function."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dml.config import DMLConfig
from dml.errors import DMLError
from pipeline.errors import StageFailed
from pipeline.launchers.logs import start_log
from pipeline.stage_specs import StageSpec


def _prepare(config: DMLConfig, resume: bool) -> Any:
    from dml.prepare import run_prepare

    return run_prepare(config, resume=resume)


def _train(config: DMLConfig, resume: bool) -> Any:
    from dml.train.run import run_train

    return run_train(config, resume=resume)


def _evaluate(config: DMLConfig, resume: bool) -> Any:
    from dml.eval.run import run_evaluate

    return run_evaluate(config)


def _distill(config: DMLConfig, resume: bool) -> Any:
    from dml.distill.run import (
        run_distill,  # written separately; may be missing in old installs
    )

    return run_distill(config, resume=resume)


def _export(config: DMLConfig, resume: bool) -> Any:
    from dml.export.run import run_export

    return run_export(config)


STAGE_FUNCTIONS: dict[str, Callable[[DMLConfig, bool], Any]] = {
    "prepare": _prepare,
    "train": _train,
    "evaluate": _evaluate,
    "distill": _distill,
    "export": _export,
}


class _StageLog:
    """Copy the `dml` loggers' records into the stage log for the duration of a call."""

    def __init__(self, path):
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        self.logger = logging.getLogger("dml")

    def __enter__(self) -> _StageLog:
        self.level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        self.handler.close()


@dataclass
class InProcessLauncher:
    """Calls `dml.prepare.run_prepare`, `dml.train.run.run_train`, ... directly (world size 1)."""

    name: str = "inprocess"

    def launch(self, spec: StageSpec, resume: bool) -> None:
        """Run the stage function in this process, its log lines copied to the stage log.

        Raises StageFailed when the stage raises.
        """
        log_path = start_log(spec.log_path, spec.name, self.name, spec.key)
        with _StageLog(log_path) as stage_log:
            try:
                STAGE_FUNCTIONS[spec.command](spec.config, resume)
            except ImportError as exc:
                reason = f"the `dml {spec.command}` stage is not available in this installation ({exc})"
                stage_log.logger.error(reason)
                raise StageFailed(spec.name, reason, log_path, input_error=True) from exc
            except DMLError as exc:
                stage_log.logger.error("dml %s: error: %s", spec.command, exc)
                raise StageFailed(spec.name, str(exc), log_path, input_error=True) from exc
            except Exception as exc:
                stage_log.logger.error("stage %s raised:\n%s", spec.name, traceback.format_exc())
                raise StageFailed(spec.name, f"{type(exc).__name__}: {exc}", log_path) from exc
