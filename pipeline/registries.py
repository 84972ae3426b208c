"""The pipeline's name -> class registry: how a stage is launched (``pipeline.launcher``).

Built like `dml.registries` (entries name their class by import path, resolved on first use),
so `pipeline.config` checks the name without importing the launchers. Add a launcher with one
``LAUNCHERS.add(...)`` line and its case in ``tests/test_registries.py``.
"""

from __future__ import annotations

from dml.registries import Registry

LAUNCHERS = Registry("launcher", "pipeline.launcher")
LAUNCHERS.add("inprocess", "pipeline.launchers.inprocess:InProcessLauncher", "stages in the flow's own process")
LAUNCHERS.add(
    "torchrun",
    "pipeline.launchers.torchrun:TorchrunLauncher",
    "local torchrun processes (pipeline.nproc_per_node, pipeline.max_restarts)",
    lambda p: {"nproc_per_node": p.nproc_per_node, "max_restarts": p.max_restarts},
)
LAUNCHERS.add(
    "kubernetes",
    "pipeline.launchers.kubernetes:KubernetesLauncher",
    "a Kubernetes Job per stage (pipeline.namespace, pipeline.image, ...)",
    lambda p: {
        "namespace": p.namespace,
        "image": p.image,
        "nproc_per_node": p.nproc_per_node,
        "max_restarts": p.max_restarts,
    },
)
