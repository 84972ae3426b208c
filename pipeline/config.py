"""The ``pipeline`` section of a config, and the config of a pipeline run.

`dml` carries a config file's ``pipeline:`` section along unread (``DMLConfig.pipeline`` is a
plain mapping), so one file serves `dml train` and `dml pipeline run` alike; this package
owns what the section means. `PipelineRunConfig` is the whole config with that section
checked: unknown keys and bad values are refused when the config loads, in the same one-line
`ConfigError` as every other section's.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from dml.config import DMLConfig, StrictModel
from dml.registries import RegisteredName
from pipeline.registries import LAUNCHERS


class PipelineConfig(StrictModel):
    """`dml pipeline run`: how distributed stages are launched and where the flow keeps state."""

    launcher: Annotated[str, RegisteredName(LAUNCHERS)] = "torchrun"  # `pipeline.registries.LAUNCHERS`
    nproc_per_node: int = Field(2, ge=1)
    max_restarts: int = Field(0, ge=0)
    namespace: str = "dml"
    image: str = "dml-pipeline:latest"
    evaluate_teacher: bool = True
    publish_dir: str | None = None
    # A failed stage is tried again this many times (infrastructure failures only: a bad
    # config or missing input fails the same way again), after retry_delay_seconds.
    stage_retries: int = Field(2, ge=0)
    retry_delay_seconds: float = Field(30.0, ge=0)


class PipelineRunConfig(DMLConfig):
    """Every stage's sections plus the checked ``pipeline`` section (a `DMLConfig`, so each
    stage function takes it as it is)."""

    pipeline: PipelineConfig = PipelineConfig()  # type: ignore[assignment]
