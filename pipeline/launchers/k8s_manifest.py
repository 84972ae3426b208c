"""The Kubernetes objects that run one pipeline stage: a ConfigMap with the stage's resolved
config and a Job whose single pod runs the `dml` command (under ``torchrun`` with
``nproc_per_node`` processes for the distributed stages).

Volumes follow k8s/base: PVC ``dml-raw`` at /data/raw (read-only), ``dml-shards`` at
/data/shards, ``dml-runs`` at /data/runs, the config at /etc/dml, and /dev/shm in memory for
data-loader workers. The config's paths must therefore point under /data/... . Pod restarts
are left to torchrun (``--max-restarts``) and stage retries to Prefect: ``backoffLimit: 0``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from dml.distributed import torchrun_argv
from pipeline.stage_specs import StageSpec

CONFIG_MOUNT = "/etc/dml"
VOLUMES = (  # (volume name, claim, mount path, read-only)
    ("raw", "dml-raw", "/data/raw", True),
    ("shards", "dml-shards", "/data/shards", False),
    ("runs", "dml-runs", "/data/runs", False),
)
RUN_AS = 10001  # the image's non-root user (Dockerfile)
TTL_SECONDS = 7 * 24 * 3600
MAX_NAME = 63


def job_name(spec: StageSpec, suffix: str) -> str:
    """``dml-<stage>-<key>-<suffix>``: a valid DNS-1123 label (Job names become pod labels).

    Raises ValueError when the stage and suffix make no valid label.
    """
    stage = re.sub(r"[^a-z0-9-]", "-", spec.name.lower())
    name = f"dml-{stage}-{spec.key[:8]}-{suffix}".lower()
    if len(name) > MAX_NAME or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        raise ValueError(f"cannot make a Kubernetes name from stage '{spec.name}' and suffix '{suffix}'")
    return name


def stage_command(spec: StageSpec, nproc_per_node: int, max_restarts: int, resume: bool) -> list[str]:
    """The container command: `dml <stage>` or torchrun around it."""
    stage_args = [
        spec.command,
        "--config",
        f"{CONFIG_MOUNT}/config.yaml",
        *(["--resume"] if resume and spec.resumable else []),
    ]
    if not spec.distributed:
        return ["dml", *stage_args]
    return torchrun_argv(nproc_per_node, stage_args, max_restarts, ["torchrun"])


def _labels(spec: StageSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dml",
        "app.kubernetes.io/component": "pipeline-stage",
        "dml.pipeline/stage": spec.name,
        "dml.pipeline/key": spec.key[:12],
    }


def _container(spec: StageSpec, image: str, command: list[str], nproc: int) -> dict[str, Any]:
    mounts = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    mounts += [
        {"name": name, "mountPath": path, **({"readOnly": True} if read_only else {})}
        for name, _, path, read_only in VOLUMES
    ]
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    threads = "1" if spec.distributed and nproc > 1 else "2"
    return {
        "name": "stage",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [{"name": "OMP_NUM_THREADS", "value": threads}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": {"requests": {"cpu": str(nproc), "memory": f"{2 * nproc}Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }


def render_stage_manifests(
    spec: StageSpec, *, name: str, namespace: str, image: str, nproc_per_node: int, max_restarts: int, resume: bool
) -> list[dict[str, Any]]:
    """[ConfigMap, Job] for ``spec``; apply them in this order."""
    nproc = nproc_per_node if spec.distributed else 1
    labels = _labels(spec)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": namespace, "labels": labels},
        "data": {"config.yaml": yaml.safe_dump(spec.config.model_dump(mode="json"), sort_keys=False)},
    }
    volumes = [{"name": "config", "configMap": {"name": f"{name}-config"}}]
    volumes += [
        {"name": vol, "persistentVolumeClaim": {"claimName": claim, **({"readOnly": True} if ro else {})}}
        for vol, claim, _, ro in VOLUMES
    ]
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}})
    pod_spec = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(spec, image, stage_command(spec, nproc, max_restarts, resume), nproc)],
        "volumes": volumes,
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": TTL_SECONDS,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    return [config_map, job]
