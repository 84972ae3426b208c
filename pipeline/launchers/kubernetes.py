"""Run a stage as a Kubernetes Job with plain ``kubectl`` (no Kubernetes Python client).

``launch``: render the ConfigMap + Job (`k8s_manifest`), keep a copy in
``<output>/logs/<stage>.k8s.yaml``, ``kubectl apply`` it, stream the pod's log into the stage
log (``kubectl logs -f``), poll the Job until it completes or fails, and on failure raise
`StageFailed` with the pod's termination reason (OOMKilled, exit code, image pull errors)
and the `dml` error line from its log. Nothing is deleted: finished Jobs expire by their TTL.

Only the manifest rendering and the status parsing are tested (offline: no cluster on the
development machines); the kubectl calls themselves are untested here.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.errors import StageFailed
from pipeline.launchers.k8s_manifest import job_name, render_stage_manifests
from pipeline.launchers.logs import failure_reason, start_log, tail
from pipeline.stage_specs import StageSpec

# Waiting reasons that never resolve on their own: fail the stage instead of waiting forever.
FATAL_WAITING = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)


def job_condition(job: dict[str, Any]) -> str | None:
    """ "Complete", "Failed" or None (still running) from a Job's status."""
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return condition["type"]
    return None


def pod_problem(pods: dict[str, Any]) -> str | None:
    """The first pod problem in a ``kubectl get pods -o json`` list: a terminated container with
    a non-zero exit code (reason, exit code, message) or a fatal waiting reason; else None."""
    for pod in pods.get("items", []):
        name = pod.get("metadata", {}).get("name", "?")
        for status in pod.get("status", {}).get("containerStatuses") or []:
            state = status.get("state", {})
            terminated = state.get("terminated") or status.get("lastState", {}).get("terminated")
            if terminated and terminated.get("exitCode", 0) != 0:
                message = f": {terminated['message'].strip()}" if terminated.get("message") else ""
                return (
                    f"pod {name}: container {status.get('name')} {terminated.get('reason', 'Error')} "
                    f"(exit code {terminated.get('exitCode')}){message}"
                )
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in FATAL_WAITING:
                return f"pod {name}: {waiting['reason']}: {waiting.get('message', '').strip()}".rstrip(": ")
        if pod.get("status", {}).get("phase") == "Failed" and pod["status"].get("reason"):
            return f"pod {name}: {pod['status']['reason']}: {pod['status'].get('message', '')}".rstrip(": ")
    return None


@dataclass
class KubernetesLauncher:
    """Stages as Jobs in ``namespace`` running ``image``; see the module docstring."""

    namespace: str = "dml"
    image: str = "dml-pipeline:latest"
    nproc_per_node: int = 1
    max_restarts: int = 0
    kubectl: str = "kubectl"
    poll_seconds: float = 10.0
    name: str = "kubernetes"

    def manifests(self, spec: StageSpec, resume: bool, suffix: str | None = None) -> list[dict[str, Any]]:
        """The ConfigMap and Job this launcher would apply for ``spec``."""
        name = job_name(spec, suffix or uuid.uuid4().hex[:5])
        return render_stage_manifests(
            spec,
            name=name,
            namespace=self.namespace,
            image=self.image,
            nproc_per_node=self.nproc_per_node,
            max_restarts=self.max_restarts,
            resume=resume,
        )

    def _kubectl(self, *args: str) -> str:
        try:
            done = subprocess.run(
                [self.kubectl, "-n", self.namespace, *args],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                check=False,
            )  # never wait on a credentials prompt
        except FileNotFoundError:
            raise RuntimeError(f"kubectl {' '.join(args[:2])} failed: no {self.kubectl} on PATH") from None
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args[:2])} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def launch(self, spec: StageSpec, resume: bool) -> None:
        """Apply the stage's Job manifests with kubectl and wait for the Job, its pod logs in the stage log.

        Raises StageFailed when the Job fails or cannot be started.
        """
        log_path = start_log(spec.log_path, spec.name, self.name, spec.key)
        manifests = self.manifests(spec, resume)
        name = manifests[-1]["metadata"]["name"]
        manifest_file = spec.log_path.parent / f"{spec.name}.k8s.yaml"
        manifest_file.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
        try:
            self._kubectl("apply", "-f", str(manifest_file))
        except RuntimeError as exc:
            with log_path.open("a") as handle:
                handle.write(f"{exc}\n")
            raise StageFailed(spec.name, str(exc), log_path) from None
        with log_path.open("a") as handle:
            handle.write(f"job {self.namespace}/{name} applied from {manifest_file}\n")
            handle.flush()
            follower = subprocess.Popen(
                [
                    self.kubectl,
                    "-n",
                    self.namespace,
                    "logs",
                    "-f",
                    f"job/{name}",
                    "--all-containers",
                    "--pod-running-timeout=24h",
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
            try:
                problem = self._wait(name)
            finally:
                _stop(follower)
        if problem is not None:
            cli_reason, input_error = failure_reason(tail(log_path), "")
            reason = f"{problem}; {cli_reason}" if cli_reason and cli_reason not in problem else problem
            raise StageFailed(spec.name, f"job {self.namespace}/{name}: {reason}", log_path, input_error=input_error)

    def _wait(self, name: str) -> str | None:
        """Poll until the Job completes (None) or fails (the reason)."""
        while True:
            condition = job_condition(json.loads(self._kubectl("get", "job", name, "-o", "json")))
            pods = json.loads(self._kubectl("get", "pods", "-l", f"job-name={name}", "-o", "json"))
            if condition == "Complete":
                return None
            problem = pod_problem(pods)
            if condition == "Failed" or (problem and any(reason in problem for reason in FATAL_WAITING)):
                return problem or "the Job failed (no pod status; see `kubectl describe job`)"
            time.sleep(self.poll_seconds)


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    try:
        process.wait(timeout=grace)  # `logs -f` ends by itself when the container exits
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait(timeout=grace)
