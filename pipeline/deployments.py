"""Deployments of the scheduled retrain (`pipeline.flows.nightly_retrain`): served from one
machine, run by a process work pool, or run by a Kubernetes work pool.

- `serve_deployment`: for ``prefect.serve``: the process that serves it runs the flow on its
  schedule (and blocks); `dml pipeline serve`.
- `process_deployment`: the same flow for a work pool of type ``process`` (``prefect worker
  start --pool NAME`` on a machine with this package, the config and the data).
- `kubernetes_deployment`: the same flow for a work pool of type ``kubernetes`` (a Prefect
  worker from prefect-kubernetes, as in k8s/base/prefect-worker.yaml, runs each flow run as a
  Job). The flow-run pod needs the run config and the data volumes at the paths the config
  names; `work_pool_base_job_template` is a base job template that mounts them.

Every deployment lets one run at a time (`ONE_AT_A_TIME`): a run due while the previous one
still works is cancelled, so a slow night never overlaps the next (the next schedule picks
up whatever changed meanwhile). Registering a deployment (``.apply()``) talks to the Prefect
API only, never to a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from pipeline.flows import nightly_retrain
from pipeline.launchers.k8s_manifest import CONFIG_MOUNT, RUN_AS, VOLUMES
from pipeline.schedules import DEPLOYMENT, NIGHTLY_CRON

WORK_POOL = "dml-k8s"
SERVICE_ACCOUNT = "prefect-worker"  # k8s/base/prefect-worker.yaml: may create Jobs, read pod logs
RUN_CONFIG_MAP = "dml-run-config"  # k8s/base: the run config, mounted at /etc/dml/config.yaml
POD_CONFIG = f"{CONFIG_MOUNT}/config.yaml"
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def _parameters(config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    return {"config_path": config_path, "overrides": list(overrides or []), "only_if_data_changed": True}


def _to_deployment(**kwargs: Any) -> RunnerDeployment:
    """``nightly_retrain.to_deployment``: called from sync code it returns the deployment, not a coroutine."""
    return cast(RunnerDeployment, nightly_retrain.to_deployment(**kwargs))


def _schedule(cron: str | None, interval: float | None) -> dict[str, Any]:
    """``to_deployment`` schedule arguments: every ``interval`` seconds, else ``cron``
    (the nightly default when neither is given)."""
    return {"interval": interval} if interval else {"cron": cron or NIGHTLY_CRON}


def serve_deployment(
    config_path: str | Path,
    cron: str | None = NIGHTLY_CRON,
    overrides: list[str] | None = None,
    name: str = DEPLOYMENT,
    interval: float | None = None,
) -> RunnerDeployment:
    """The scheduled retrain as a deployment for `prefect.serve` on this machine."""
    return _to_deployment(
        name=name,
        **_schedule(cron, interval),
        concurrency_limit=ONE_AT_A_TIME,
        parameters=_parameters(str(Path(config_path).resolve()), overrides),
        tags=["dml", "nightly"],
    )


def serve_nightly(
    config_path: str | Path,
    cron: str | None = NIGHTLY_CRON,
    overrides: list[str] | None = None,
    name: str = DEPLOYMENT,
    interval: float | None = None,
) -> None:
    """Serve the scheduled retrain from this process until interrupted (blocks)."""
    from prefect import serve

    serve(serve_deployment(config_path, cron, overrides, name, interval))


def process_deployment(
    config_path: str | Path,
    work_pool: str,
    cron: str | None = NIGHTLY_CRON,
    overrides: list[str] | None = None,
    name: str = DEPLOYMENT,
    interval: float | None = None,
) -> RunnerDeployment:
    """The scheduled retrain for a ``process`` work pool. The worker imports the flow from
    this installed package (module-path entrypoint, no code pull) and runs it in the current
    directory, so ``config_path`` (made absolute) and the config's relative paths mean what
    they mean to `dml pipeline run` here: a worker on this machine, or one with the same paths."""
    return _to_deployment(
        name=name,
        **_schedule(cron, interval),
        concurrency_limit=ONE_AT_A_TIME,
        parameters=_parameters(str(Path(config_path).resolve()), overrides),
        work_pool_name=work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["dml", "nightly"],
        job_variables={"working_dir": str(Path.cwd())},
    )


def kubernetes_deployment(
    image: str,
    config_path: str = POD_CONFIG,
    cron: str | None = NIGHTLY_CRON,
    work_pool: str = WORK_POOL,
    namespace: str = "dml",
    overrides: list[str] | None = None,
    name: str = f"{DEPLOYMENT}-k8s",
    interval: float | None = None,
) -> RunnerDeployment:
    """The scheduled retrain for a Kubernetes work pool. The flow runs from ``image`` (which
    has this package installed: module-path entrypoint, no code pull) and launches each stage
    as its own Job (``pipeline.launcher=kubernetes`` with the same image and namespace)."""
    launcher = ["pipeline.launcher=kubernetes", f"pipeline.image={image}", f"pipeline.namespace={namespace}"]
    given = {item.split("=", 1)[0].strip() for item in overrides or []}
    launcher = [
        item for item in launcher if item.split("=", 1)[0] not in given
    ]  # the caller's own win (a key twice is refused)
    return _to_deployment(
        name=name,
        **_schedule(cron, interval),
        concurrency_limit=ONE_AT_A_TIME,
        parameters=_parameters(config_path, [*launcher, *(overrides or [])]),
        work_pool_name=work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["dml", "nightly", "kubernetes"],
        job_variables={
            "image": image,
            "namespace": namespace,
            "service_account_name": SERVICE_ACCOUNT,
            "image_pull_policy": "IfNotPresent",
            "env": {"OMP_NUM_THREADS": "1"},
        },
    )


def _variables() -> dict[str, Any]:
    def string(default: str | None, description: str) -> dict[str, Any]:
        return {"type": "string", "default": default, "description": description}

    return {
        "type": "object",
        "properties": {
            "name": string(None, "Job name prefix"),
            "namespace": string("dml", "Namespace of the flow-run Jobs"),
            "image": string("dml:0.1.0", "Image with the dml package installed"),
            "image_pull_policy": {
                "type": "string",
                "enum": ["IfNotPresent", "Always", "Never"],
                "default": "IfNotPresent",
            },
            "service_account_name": string(SERVICE_ACCOUNT, "Service account allowed to create stage Jobs"),
            "env": {"type": "object", "additionalProperties": {"type": "string"}, "default": {}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}, "default": {}},
            "command": string(None, "Command of the flow-run container (set by the worker)"),
            "finished_job_ttl": {"type": "integer", "default": 604800},
            "job_watch_timeout_seconds": {"type": "integer", "default": None},
            "pod_watch_timeout_seconds": {"type": "integer", "default": 300},
            "stream_output": {"type": "boolean", "default": True},
        },
    }


def work_pool_base_job_template() -> dict[str, Any]:
    """A Kubernetes work-pool base job template whose flow-run pods mount the run config and
    the raw / shards / runs volumes where the stage Jobs mount them (k8s/base layout), so
    the flow can read stage stamps and hash models."""
    mounts = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    mounts += [{"name": name, "mountPath": path, **({"readOnly": True} if ro else {})} for name, _, path, ro in VOLUMES]
    volumes = [{"name": "config", "configMap": {"name": RUN_CONFIG_MAP}}]
    volumes += [{"name": name, "persistentVolumeClaim": {"claimName": claim}} for name, claim, _, _ in VOLUMES]
    container = {
        "name": "prefect-job",
        "image": "{{ image }}",
        "imagePullPolicy": "{{ image_pull_policy }}",
        "args": "{{ command }}",
        "env": "{{ env }}",
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    # parallelism / completions inside the pod spec: prefect-kubernetes' worker refuses a
    # template without them there (it checks against its own base manifest); the API server
    # drops them from the pod template with a warning.
    pod = {
        "parallelism": 1,
        "completions": 1,
        "restartPolicy": "Never",
        "serviceAccountName": "{{ service_account_name }}",
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS},
        "containers": [container],
        "volumes": volumes,
    }
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "{{ name }}-", "namespace": "{{ namespace }}", "labels": "{{ labels }}"},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": "{{ finished_job_ttl }}", "template": {"spec": pod}},
    }
    configuration = {
        "command": "{{ command }}",
        "env": "{{ env }}",
        "labels": "{{ labels }}",
        "name": "{{ name }}",
        "namespace": "{{ namespace }}",
        "job_manifest": manifest,
        "job_watch_timeout_seconds": "{{ job_watch_timeout_seconds }}",
        "pod_watch_timeout_seconds": "{{ pod_watch_timeout_seconds }}",
        "stream_output": "{{ stream_output }}",
    }
    return {"job_configuration": configuration, "variables": _variables()}


def ensure_work_pool(name: str, kubernetes: bool) -> str:
    """The type of work pool ``name``; when it does not exist it is created: ``kubernetes``
    (with `work_pool_base_job_template`) when ``kubernetes``, else ``process``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            pool_type = "kubernetes" if kubernetes else "process"
            template = work_pool_base_job_template() if kubernetes else ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
            return pool_type
