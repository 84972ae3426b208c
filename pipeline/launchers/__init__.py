"""How a stage is started: in the flow's process, as local torchrun processes, or as a
Kubernetes Job. All launchers take a `StageSpec` and raise `StageFailed`; the flow code is
the same for each (chosen by ``pipeline.launcher``)."""

from __future__ import annotations

from typing import Protocol

from pipeline.config import PipelineConfig
from pipeline.launchers.inprocess import InProcessLauncher
from pipeline.launchers.kubernetes import KubernetesLauncher
from pipeline.launchers.torchrun import TorchrunLauncher
from pipeline.registries import LAUNCHERS
from pipeline.stage_specs import StageSpec


class Launcher(Protocol):
    name: str

    def launch(self, spec: StageSpec, resume: bool) -> None:
        """Run ``spec`` to completion; raise `StageFailed` (stage, reason, log path) otherwise."""


def build_launcher(settings: PipelineConfig) -> Launcher:
    """The launcher registered as ``pipeline.launcher`` (`pipeline.registries.LAUNCHERS`); ValueError
    if none is (the config refuses such a name when it loads)."""
    return LAUNCHERS.build(settings.launcher, settings=settings)


__all__ = ["InProcessLauncher", "KubernetesLauncher", "Launcher", "TorchrunLauncher", "build_launcher"]
