"""Run a stage as a local subprocess: ``torchrun`` with N processes for the distributed
stages (train, distill, evaluate), plain ``python -m dml.cli`` for the others.

The stage's resolved config is written to ``<output>/logs/<stage>.config.yaml`` first; the
processes' stdout and stderr go to ``<output>/logs/<stage>.log``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dml.config import save_config
from dml.data.workers import arm_parent_death_signal
from dml.distributed import torchrun_argv
from pipeline.errors import StageFailed
from pipeline.launchers.logs import failure_reason, start_log, tail
from pipeline.stage_specs import StageSpec


def stage_config_file(spec: StageSpec) -> Path:
    """Where a subprocess launcher writes the stage's resolved config."""
    return spec.log_path.parent / f"{spec.name}.config.yaml"


@dataclass
class TorchrunLauncher:
    """``nproc_per_node`` local processes (gloo on CPU, NCCL when each process has a GPU:
    chosen by `dml.distributed`, untested here), ``max_restarts`` elastic restarts; restarted
    workers resume from the last checkpoint (`dml train` reads TORCHELASTIC_RESTART_COUNT)."""

    nproc_per_node: int = 2
    max_restarts: int = 0
    python: str = sys.executable
    name: str = "torchrun"

    def command(self, spec: StageSpec, config_file: Path, resume: bool) -> list[str]:
        """The argv that runs ``spec`` (torchrun only for distributed stages)."""
        stage_args = [spec.command, "--config", str(config_file), *(["--resume"] if resume and spec.resumable else [])]
        if not spec.distributed:
            return [self.python, "-m", "dml.cli", *stage_args]
        return torchrun_argv(
            self.nproc_per_node, stage_args, self.max_restarts, [self.python, "-m", "torch.distributed.run"]
        )

    def launch(self, spec: StageSpec, resume: bool) -> None:
        """Run the stage under local torchrun with its saved config, output in the stage log.

        Raises StageFailed when torchrun exits non-zero.
        """
        log_path = start_log(spec.log_path, spec.name, self.name, spec.key)
        config_file = save_config(spec.config, stage_config_file(spec))
        argv = self.command(spec, config_file, resume)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")  # N processes share the cores; torch would take all
        with log_path.open("a") as handle:
            handle.write("$ " + " ".join(argv) + "\n")
            handle.flush()
            # a pipeline killed with SIGKILL would leave torchrun and its workers training
            returncode = subprocess.run(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=os.getcwd(),
                check=False,
                preexec_fn=arm_parent_death_signal,
            ).returncode
        if returncode != 0:
            reason, input_error = failure_reason(tail(log_path), f"exit code {returncode}")
            raise StageFailed(spec.name, reason, log_path, input_error=input_error)
