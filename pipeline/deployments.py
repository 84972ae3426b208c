"""Deployments of the nightly retrain: served from one machine, or run by a Kubernetes work pool.

- `serve_deployment` / `serve_nightly`: ``flow.serve``-style, the process that calls
  `serve_nightly` runs the flow on its cron schedule (and blocks).
- `kubernetes_deployment`: the same flow for a work pool of type ``kubernetes`` (a Prefect
  worker from prefect-kubernetes, as in k8s/base/prefect-worker.yaml, runs each flow run as a
  Job). The flow-run pod needs the run config and the data volumes at the paths the config
  names; `work_pool_base_job_template` is a base job template that mounts them, for
  ``prefect work-pool create dml-k8s --type kubernetes --base-job-template FILE``.
  Registering the deployment (``.apply()``) talks to the Prefect API only, never to a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment

from pipeline.flows import nightly_retrain
from pipeline.launchers.k8s_manifest import CONFIG_MOUNT, RUN_AS, VOLUMES

NIGHTLY_CRON = "0 2 * * *"  # 02:00 every day
WORK_POOL = "dml-k8s"
SERVICE_ACCOUNT = "prefect-worker"  # k8s/base/prefect-worker.yaml: may create Jobs, read pod logs
RUN_CONFIG_MAP = "dml-run-config"  # k8s/base: the run config, mounted at /etc/dml/config.yaml


def _parameters(config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    return {"config_path": config_path, "overrides": list(overrides or []), "only_if_data_changed": True}


def serve_deployment(config_path: str | Path, cron: str = NIGHTLY_CRON, overrides: list[str] | None = None,
                     name: str = "dml-nightly") -> RunnerDeployment:
    """The nightly retrain as a deployment for `prefect.serve` on this machine."""
    return nightly_retrain.to_deployment(name=name, cron=cron,
                                         parameters=_parameters(str(Path(config_path).resolve()), overrides),
                                         tags=["dml", "nightly"])


def serve_nightly(config_path: str | Path, cron: str = NIGHTLY_CRON, overrides: list[str] | None = None) -> None:
    """Serve the nightly retrain from this process until interrupted (blocks)."""
    from prefect import serve

    serve(serve_deployment(config_path, cron, overrides))


def kubernetes_deployment(image: str, config_path: str = f"{CONFIG_MOUNT}/config.yaml", cron: str = NIGHTLY_CRON,
                          work_pool: str = WORK_POOL, namespace: str = "dml",
                          overrides: list[str] | None = None) -> RunnerDeployment:
    """The nightly retrain for a Kubernetes work pool. The flow runs from ``image`` (which has
    this package installed: module-path entrypoint, no code pull) and launches each stage as
    its own Job (``pipeline.launcher=kubernetes`` with the same image and namespace)."""
    launcher = ["pipeline.launcher=kubernetes", f"pipeline.image={image}", f"pipeline.namespace={namespace}"]
    return nightly_retrain.to_deployment(
        name="dml-nightly-k8s", cron=cron, parameters=_parameters(config_path, [*launcher, *(overrides or [])]),
        work_pool_name=work_pool, entrypoint_type=EntrypointType.MODULE_PATH, tags=["dml", "nightly", "kubernetes"],
        job_variables={"image": image, "namespace": namespace, "service_account_name": SERVICE_ACCOUNT,
                       "image_pull_policy": "IfNotPresent", "env": {"OMP_NUM_THREADS": "1"}},
    )


def _variables() -> dict[str, Any]:
    def string(default: str | None, description: str) -> dict[str, Any]:
        return {"type": "string", "default": default, "description": description}

    return {"type": "object", "properties": {
        "name": string(None, "Job name prefix"),
        "namespace": string("dml", "Namespace of the flow-run Jobs"),
        "image": string("dml:0.1.0", "Image with the dml package installed"),
        "image_pull_policy": {"type": "string", "enum": ["IfNotPresent", "Always", "Never"], "default": "IfNotPresent"},
        "service_account_name": string(SERVICE_ACCOUNT, "Service account allowed to create stage Jobs"),
        "env": {"type": "object", "additionalProperties": {"type": "string"}, "default": {}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}, "default": {}},
        "command": string(None, "Command of the flow-run container (set by the worker)"),
        "finished_job_ttl": {"type": "integer", "default": 604800},
        "job_watch_timeout_seconds": {"type": "integer", "default": None},
        "pod_watch_timeout_seconds": {"type": "integer", "default": 300},
        "stream_output": {"type": "boolean", "default": True},
    }}


def work_pool_base_job_template() -> dict[str, Any]:
    """A Kubernetes work-pool base job template whose flow-run pods mount the run config and
    the raw / shards / runs volumes where the stage Jobs mount them (k8s/base layout), so
    the flow can read stage stamps and hash models."""
    mounts = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    mounts += [{"name": name, "mountPath": path, **({"readOnly": True} if ro else {})} for name, _, path, ro in VOLUMES]
    volumes = [{"name": "config", "configMap": {"name": RUN_CONFIG_MAP}}]
    volumes += [{"name": name, "persistentVolumeClaim": {"claimName": claim}} for name, claim, _, _ in VOLUMES]
    container = {"name": "prefect-job", "image": "{{ image }}", "imagePullPolicy": "{{ image_pull_policy }}",
                 "args": "{{ command }}", "env": "{{ env }}", "volumeMounts": mounts,
                 "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    pod = {"restartPolicy": "Never", "serviceAccountName": "{{ service_account_name }}",
           "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS},
           "containers": [container], "volumes": volumes}
    manifest = {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"generateName": "{{ name }}-", "namespace": "{{ namespace }}", "labels": "{{ labels }}"},
                "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": "{{ finished_job_ttl }}",
                         "template": {"spec": pod}}}
    configuration = {"command": "{{ command }}", "env": "{{ env }}", "labels": "{{ labels }}", "name": "{{ name }}",
                     "namespace": "{{ namespace }}", "job_manifest": manifest,
                     "job_watch_timeout_seconds": "{{ job_watch_timeout_seconds }}",
                     "pod_watch_timeout_seconds": "{{ pod_watch_timeout_seconds }}",
                     "stream_output": "{{ stream_output }}"}
    return {"job_configuration": configuration, "variables": _variables()}
