"""k8s/: render every kustomization offline and check the manifests.

No cluster needed: tests/k8s_render.py renders (and, where kubectl is installed, must render
exactly as `kubectl kustomize` does, so it cannot drift from kustomize), kubernetes-validate
checks core kinds against the Kubernetes 1.37 schemas in strict mode (unknown fields fail),
and the kubeflow-trainer-api models check the TrainJob. The rest checks that the pieces fit:
partitions, rendezvous, volumes, config paths, resources, RBAC.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

from dml.cli import build_parser
from dml.config import validate_config
from dml.prepare import parse_partition
from k8s_render import (
    CLUSTER_SCOPED_KINDS,
    containers,
    expand,
    find,
    object_id,
    pods,
    quantity,
    render,
    split_image,
    strategic_merge,
)
from pipeline.config import PipelineRunConfig

K8S = Path(__file__).resolve().parents[1] / "k8s"
K8S_VERSION = "1.37.0"
CORE_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1"}
TRAINJOB_API_VERSION = "trainer.kubeflow.org/v1alpha1"
OVERLAYS = ["overlays/cpu-dev", "overlays/gpu-prod", "overlays/gpu-prod-torchrun"]
KUSTOMIZATIONS = ["base", "train-torchrun", *OVERLAYS]
GPU_OVERLAYS = ["overlays/gpu-prod", "overlays/gpu-prod-torchrun"]
STAGES = {"prepare", "train", "distill", "evaluate", "export", "pipeline"}  # DESIGN.md's CLI
NCCL_KEYS = {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE"}
GPU = "nvidia.com/gpu"


@functools.cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(K8S / name))


def rendered(name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(name)))


def dml_argv(container: dict) -> list[str] | None:
    """The `dml` arguments a container runs (directly or via torchrun -m dml.cli), else None."""
    command = [expand(container, part) for part in container.get("command", []) + container.get("args", [])]
    if command[:1] == ["dml"]:
        return command[1:]
    if command[:1] == ["torchrun"] and "dml.cli" in command:
        return command[command.index("dml.cli") + 1 :]
    return None


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def run_config(objects: list[dict]) -> Any:
    """The run config in ConfigMap dml-run-config, validated by dml's own config models."""
    config_map = find(objects, "ConfigMap", "dml-run-config")
    return validate_config(yaml.safe_load(config_map["data"]["config.yaml"]), PipelineRunConfig)


def mount_of(pod: dict, container: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) that holds ``path`` in ``container`` (the longest mount prefix)."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume of container {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    return mount, next(v for v in pod["volumes"] if v["name"] == mount["name"])


# ---------------------------------------------------------------------------------------------
# Rendering and schema validation


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders_into_the_dml_namespace(name):
    objects = rendered(name)
    assert objects
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        assert namespace == (None if obj["kind"] in CLUSTER_SCOPED_KINDS else "dml"), obj["metadata"]


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed: the renderer is not compared with `kubectl kustomize` on this machine",
)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_output_equals_kubectl_kustomize(name):
    """Offline (`kubectl kustomize` reads only the folder): same objects, same content, same list order."""
    done = subprocess.run([KUBECTL, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {name} failed: {done.stderr.strip()}"
    theirs = {object_id(obj): obj for obj in yaml.safe_load_all(done.stdout) if obj}
    ours = {object_id(obj): obj for obj in rendered(name)}
    assert sorted(ours) == sorted(theirs)
    for key, obj in theirs.items():
        assert ours[key] == obj, f"{name}: {'/'.join(key)} differs from kubectl kustomize"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_core_objects_validate_strictly(name):
    for obj in rendered(name):
        if obj["apiVersion"] in CORE_API_VERSIONS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        else:  # nothing may go unchecked: the only other kind is validated below
            assert (obj["apiVersion"], obj["kind"]) == (TRAINJOB_API_VERSION, "TrainJob")


def unknown_fields(data: Any, known: Any, path: str = "") -> list[str]:
    """Paths present in ``data`` but dropped by the model round trip (fields it does not know)."""
    if isinstance(data, dict):
        return [
            p
            for key, value in data.items()
            for p in (
                [f"{path}.{key}"]
                if not isinstance(known, dict) or key not in known
                else unknown_fields(value, known[key], f"{path}.{key}")
            )
        ]
    if isinstance(data, list):
        return [p for i, item in enumerate(data) for p in unknown_fields(item, known[i], f"{path}[{i}]")]
    return []


def validate_trainjob(obj: dict) -> None:
    """Types via the pydantic models; unknown fields via the round trip (the models ignore them)."""
    model = TrainerV1alpha1TrainJob.from_dict(obj)
    dropped = unknown_fields(obj, model.to_dict())
    if dropped:
        raise ValueError(f"TrainJob fields unknown to kubeflow-trainer-api: {', '.join(dropped)}")


def test_trainjob_validates_against_kubeflow_trainer_models():
    trainjob = find(rendered("overlays/gpu-prod"), "TrainJob", "dml-train")
    validate_trainjob(trainjob)
    assert trainjob["apiVersion"] == TRAINJOB_API_VERSION
    ref = trainjob["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"]) == ("ClusterTrainingRuntime", "torch-distributed")
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] >= 1
    assert trainer["numProcPerNode"] == int(trainer["resourcesPerNode"]["limits"][GPU])  # 1 per GPU


def test_validators_reject_wrong_fields(tmp_path):
    job = find(rendered("overlays/cpu-dev"), "Job", "dml-prepare")
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {"cpu": "1"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="'resource' was unexpected"):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    trainjob = find(rendered("overlays/gpu-prod"), "TrainJob", "dml-train")
    trainjob["spec"]["trainer"]["numProcsPerNode"] = 8
    with pytest.raises(ValueError, match=r"\.spec\.trainer\.numProcsPerNode"):
        validate_trainjob(trainjob)
    trainjob["spec"]["trainer"].pop("numProcsPerNode")
    trainjob["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValueError):  # pydantic's ValidationError: numNodes must be an int
        validate_trainjob(trainjob)
    (tmp_path / "kustomization.yaml").write_text("commonLabels: {a: b}\n")
    with pytest.raises(ValueError, match="not supported by the test renderer: commonLabels"):
        render(tmp_path)


def test_renderer_merges_like_strategic_merge_patch():
    base = {
        "containers": [
            {
                "name": "a",
                "image": "x",
                "env": [{"name": "A", "value": "1"}],
                "volumeMounts": [{"name": "v", "mountPath": "/m"}],
                "args": ["p", "q"],
            }
        ]
    }
    patch = {
        "containers": [
            {
                "name": "a",
                "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "3"}],
                "volumeMounts": [{"name": "w", "mountPath": "/m"}],
                "args": ["r"],
                "image": None,
            }
        ]
    }
    merged = strategic_merge(base, patch)["containers"]
    # the patch's items first, then the base's others: kubectl kustomize (kustomize v5.5.0) orders them so
    assert merged == [
        {
            "name": "a",
            "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "3"}],
            "volumeMounts": [{"name": "w", "mountPath": "/m"}],
            "args": ["r"],
        }
    ]
    assert split_image("localhost:5000/dml:dev@sha256:ab") == ("localhost:5000/dml", "dev", "sha256:ab")
    assert split_image("localhost:5000/dml") == ("localhost:5000/dml", None, None)


# ---------------------------------------------------------------------------------------------
# Resources, GPUs, security


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(name):
    for owner, pod in pods(rendered(name)):
        for container in containers(pod):
            where = f"{owner['kind']}/{owner['metadata']['name']}/{container['name']}"
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits), where
            for resource, request in requests.items():
                assert quantity(request) <= quantity(limits[resource]), f"{where}: {resource} request > limit"
            if GPU in requests or GPU in limits:  # extended resources: request must equal limit
                assert requests.get(GPU) == limits.get(GPU), where


def gpu_limits(objects: list[dict]) -> dict[str, int]:
    return {
        owner["metadata"]["name"]: int(c["resources"]["limits"][GPU])
        for owner, pod in pods(objects)
        for c in containers(pod)
        if GPU in c["resources"]["limits"]
    }


def test_only_gpu_prod_asks_for_gpus():
    assert gpu_limits(rendered("base")) == {} and gpu_limits(rendered("train-torchrun")) == {}
    assert gpu_limits(rendered("overlays/cpu-dev")) == {}
    for name in GPU_OVERLAYS:
        limits = gpu_limits(rendered(name))
        assert limits.get("dml-train", 0) > 0 and limits.get("dml-evaluate", 0) > 0, (name, limits)
        assert "dml-prepare" not in limits


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_gpu_training_sets_nccl_environment(name):
    (train,) = [
        c for owner, pod in pods(rendered(name)) if owner["metadata"]["name"] == "dml-train" for c in containers(pod)
    ]
    env = {e["name"]: e.get("value") for e in train["env"]}
    assert set(env) >= NCCL_KEYS, env
    assert env["NCCL_IB_DISABLE"] in ("0", "1") and env["NCCL_DEBUG"] in ("WARN", "INFO", "VERSION")


def test_gpu_prod_variants_train_with_the_same_shape():
    trainer = find(rendered("overlays/gpu-prod"), "TrainJob", "dml-train")["spec"]["trainer"]
    job = find(rendered("overlays/gpu-prod-torchrun"), "Job", "dml-train")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["DML_NNODES"]) == trainer["numNodes"] == job["spec"]["completions"]
    assert int(env["DML_NPROC_PER_NODE"]) == trainer["numProcPerNode"]
    assert container["resources"] == trainer["resourcesPerNode"]
    assert {k: env[k] for k in NCCL_KEYS} == {e["name"]: e["value"] for e in trainer["env"] if e["name"] in NCCL_KEYS}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_run_as_non_root(name):
    for owner, pod in pods(rendered(name)):
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) > 0, owner["metadata"]
        for container in containers(pod):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name", OVERLAYS)
def test_data_loader_pods_mount_memory_dev_shm(name):
    for owner, pod in pods(rendered(name)):
        for container in containers(pod):
            if dml_argv(container) is None or dml_argv(container)[0] not in ("prepare", "train", "evaluate"):
                continue
            if "--merge" in dml_argv(container):
                continue
            mount, volume = mount_of(pod, container, "/dev/shm")
            assert mount["mountPath"] == "/dev/shm" and volume["emptyDir"]["medium"] == "Memory"
            limit = quantity(container["resources"]["limits"]["memory"])
            assert quantity(volume["emptyDir"].get("sizeLimit", limit)) <= limit, owner["metadata"]["name"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_dml_images_are_one_pinned_reference(name):
    images = {c["image"] for _, pod in pods(rendered(name)) for c in containers(pod)}
    dml_images = {i for i in images if not i.startswith("prefecthq/")}
    assert len(dml_images) == 1, dml_images
    for image in images:
        _, tag, digest = split_image(image)
        assert (tag or digest) and tag != "latest", image
    assert split_image(dml_images.pop())[1] == ("dev" if name.endswith("cpu-dev") else "0.1.0")


# ---------------------------------------------------------------------------------------------
# Stages fit together


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_prepare_partitions_match_job_completions(name):
    job = find(rendered(name), "Job", "dml-prepare")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] <= spec["completions"]
    container = spec["template"]["spec"]["containers"][0]
    argv = dml_argv(container)
    assert argv[0] == "prepare" and "$(JOB_COMPLETION_INDEX)/" in flag(container["command"], "--partition")
    for index in range(spec["completions"]):
        partition = expand(container, flag(argv, "--partition"), JOB_COMPLETION_INDEX=str(index))
        assert parse_partition(partition) == (index, spec["completions"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_merge_and_train_read_what_prepare_wrote(name):
    objects = rendered(name)
    config = run_config(objects)
    merge = find(objects, "Job", "dml-prepare-merge")["spec"]["template"]["spec"]["containers"][0]
    assert flag(dml_argv(merge), "--merge") == config.prepare.output_dir
    assert config.data.shard_dir == config.prepare.output_dir


@pytest.mark.parametrize("name", OVERLAYS)
def test_config_paths_lie_on_the_right_volumes(name):
    objects = rendered(name)
    config = run_config(objects)
    claim = {
        "prepare": {config.prepare.source.path: ("dml-raw", True), config.prepare.output_dir: ("dml-shards", False)},
        "train": {config.data.shard_dir: ("dml-shards", None), config.train.run_dir: ("dml-runs", False)},
        "evaluate": {config.data.shard_dir: ("dml-shards", None), config.train.run_dir: ("dml-runs", False)},
    }
    seen = set()
    for _, pod in pods(objects):
        for container in containers(pod):
            argv = dml_argv(container)
            if argv is None or argv[0] not in claim or "--merge" in argv:
                continue
            seen.add(argv[0])
            mount, volume = mount_of(pod, container, flag(argv, "--config"))
            assert volume["configMap"]["name"] == "dml-run-config"
            assert Path(flag(argv, "--config")).name == "config.yaml"
            for path, (pvc, read_only) in claim[argv[0]].items():
                mount, volume = mount_of(pod, container, path)
                assert volume["persistentVolumeClaim"]["claimName"] == pvc, (argv[0], path)
                if read_only is not None:
                    assert bool(mount.get("readOnly")) is read_only, (argv[0], path)
    assert seen == set(claim)


@pytest.mark.parametrize("name", OVERLAYS)
def test_worker_counts_fit_cpu_limits(name):
    objects = rendered(name)
    config = run_config(objects)
    for _, pod in pods(objects):
        container = pod["containers"][0]
        argv = dml_argv(container) or [""]
        cpus = quantity(container["resources"]["limits"]["cpu"])
        if argv[0] == "prepare" and "--partition" in argv:
            assert config.prepare.workers <= cpus
        if argv[0] == "train":
            nproc = int(container["resources"]["limits"].get(GPU, 0)) or 1
            assert config.data.num_workers * nproc <= cpus


@pytest.mark.parametrize("name", OVERLAYS)
def test_dml_commands_parse_with_the_cli(name):
    parser = build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)
    commands = [dml_argv(c) for _, pod in pods(rendered(name)) for c in containers(pod)]
    commands = [argv for argv in commands if argv is not None]
    assert {argv[0] for argv in commands} >= {"prepare", "train", "evaluate"}
    for argv in commands:
        assert argv[0] in STAGES, argv
        if argv[0] in registered:  # stages not implemented yet are checked once they are
            parser.parse_args([part.replace("$(JOB_COMPLETION_INDEX)", "0") for part in argv])


@pytest.mark.parametrize("name", ["overlays/cpu-dev", "overlays/gpu-prod-torchrun"])
def test_torchrun_job_rendezvous_on_index_zero(name):
    objects = rendered(name)
    job = find(objects, "Job", "dml-train")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    service = find(objects, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    container = pod["containers"][0]
    command = [expand(container, part) for part in container["command"]]
    assert command[0] == "torchrun" and flag(command, "--rdzv_backend") == "c10d"
    host, port = flag(command, "--rdzv_endpoint").split(":")
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in container["ports"]}
    assert spec["completionMode"] == "Indexed"
    assert int(flag(command, "--nnodes")) == spec["completions"] == spec["parallelism"]
    nproc = int(flag(command, "--nproc_per_node"))
    gpus = int(container["resources"]["limits"].get(GPU, 0))
    assert nproc == gpus if gpus else nproc * spec["completions"] == 2  # cpu-dev: 2 gloo processes


@pytest.mark.parametrize("name", OVERLAYS)
def test_referenced_volumes_and_config_maps_exist(name):
    objects = rendered(name)
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    for _, pod in pods(objects):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
        for container in containers(pod):
            assert {m["name"] for m in container.get("volumeMounts", [])} <= set(volumes)
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in config_maps[ref["name"]], ref
                if "secretKeyRef" in source:  # no Secret is shipped: the pod must start without it
                    assert source["secretKeyRef"].get("optional") is True


@pytest.mark.parametrize("name", OVERLAYS)
def test_stage_jobs_are_created_suspended(name):
    # `kubectl apply -k` must not start prepare, merge, training and evaluation at once.
    for obj in rendered(name):
        if obj["kind"] in ("Job", "TrainJob"):
            assert obj["spec"]["suspend"] is True, obj["metadata"]["name"]


def test_prefect_worker_may_run_flow_jobs():
    objects = rendered("base")
    rules = find(objects, "Role", "prefect-worker")["rules"]

    def allowed(group: str, resource: str) -> set[str]:
        return {v for r in rules if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}

    assert {"create", "get", "list", "watch", "delete"} <= allowed("batch", "jobs")
    assert {"get", "list", "watch"} <= allowed("", "pods") and {"get"} <= allowed("", "pods/log")
    deployment = find(objects, "Deployment", "prefect-worker")
    pod = deployment["spec"]["template"]["spec"]
    binding = find(objects, "RoleBinding", "prefect-worker")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "prefect-worker"}
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "dml"} in binding["subjects"]
    find(objects, "ServiceAccount", pod["serviceAccountName"])
    command = pod["containers"][0]["command"]
    assert command[:3] == ["prefect", "worker", "start"] and flag(command, "--type") == "kubernetes"
    # The installed Prefect's own option names (read, not imported: importing Prefect is slow).
    source = (Path(importlib.util.find_spec("prefect").origin).parent / "cli" / "worker.py").read_text()
    for option in (part for part in command if part.startswith("--")):
        assert f'"{option}"' in source, f"prefect worker start has no option {option}"
