"""pipeline/: stamps and cache keys, config wiring, failure reasons, the launchers (torchrun on
2 real processes; the Kubernetes Job rendered and validated offline, no cluster), and the
deployment objects. Flows under a Prefect server are in test_pipeline_e2e.py."""

from __future__ import annotations

import logging
import os
import tempfile

# Prefect gets a throwaway home and no API URL before it is first imported (by pipeline.*).
os.environ.setdefault("DML_TEST_PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ["PREFECT_HOME"] = os.environ["DML_TEST_PREFECT_HOME"]
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import re
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import torch
import yaml

from data_fixtures import make_folder_tree
from dml.errors import ConfigError
from dml.train.checkpoint import list_checkpoints
from pipeline.config import PipelineRunConfig
from pipeline.errors import StageFailed
from pipeline.fingerprint import sections_digest, source_fingerprint
from pipeline.launchers import InProcessLauncher, KubernetesLauncher, TorchrunLauncher
from pipeline.launchers.kubernetes import job_condition, pod_problem
from pipeline.launchers.logs import failure_reason
from pipeline.stage_cache import claim_output_dir, read_stamp, write_stamp
from pipeline.stage_execution import execute_stage
from pipeline.stage_paths import evaluate_student_config, export_config, load_pipeline_config
from pipeline.stage_specs import TRAIN_SECTIONS, StageSpec
from train_fixtures import tiny_train_config, write_config

K8S_VERSION = "1.37.0"


def pipeline_config_dict(root: Path, launcher: str = "inprocess") -> dict:
    """A seconds-long chained run on a 6-class folder tree under ``root`` (written if absent)."""
    if not (root / "src").exists():
        make_folder_tree(root / "src", classes=6, per_class=12, bad=False)
    config = tiny_train_config(root / "shards", root / "teacher", train={"max_steps": 3})
    config.update(
        {
            "prepare": {
                "source": {"path": str(root / "src")},
                "output_dir": str(root / "shards"),
                "split": {"mode": "sample", "train_fraction": 0.75, "query_fraction": 1.0},
                "shards": {"max_samples": 9},
            },
            "evaluate": {"gallery_split": None, "plots": False, "grid_queries": 0, "max_verification_samples": 200},
            "distill": {"run_dir": str(root / "student"), "student": {"backbone": "mobilenetv3_small_050"}},
            "export": {"formats": ["onnx"], "parity_images": 8},
            "pipeline": {"launcher": launcher, "nproc_per_node": 2, "publish_dir": str(root / "publish")},
        }
    )
    return config


# ---------------------------------------------------------------------------------------------
# Stamps and cache keys


def test_stamp_decides_cached_resume_or_fresh_and_never_deletes(tmp_path):
    out = tmp_path / "run"
    assert claim_output_dir(out, "train", "k1", "model.pt") == ("fresh", None)
    write_stamp(out, "train", "k1", "running", {"manifest": "m"})
    assert claim_output_dir(out, "train", "k1", "model.pt")[0] == "resume"  # attempt died: same inputs
    (out / "model.pt").write_text("weights")
    write_stamp(out, "train", "k1", "done", {"manifest": "m"}, {"steps": 3})
    decision, stamp = claim_output_dir(out, "train", "k1", "model.pt")
    assert decision == "cached" and stamp["result"] == {"steps": 3}
    (out / "model.pt").unlink()
    assert claim_output_dir(out, "train", "k1", "model.pt")[0] == "resume"  # proof file gone: redo
    (out / "model.pt").write_text("weights")
    assert claim_output_dir(out, "train", "k2", "model.pt")[0] == "fresh"  # inputs changed
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.superseded-")]
    assert len(moved) == 1 and (moved[0] / "model.pt").read_text() == "weights"
    assert read_stamp(moved[0])["key"] == "k1" and not out.exists()
    write_stamp(out, "train", "k2", "running", {})  # k2 fails; going back to k1 restores it
    decision, stamp = claim_output_dir(out, "train", "k1", "model.pt")
    assert decision == "cached" and stamp["key"] == "k1" and (out / "model.pt").read_text() == "weights"
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.superseded-")]
    assert read_stamp(aside)["key"] == "k2"


def test_folder_without_stamp_is_kept_aside(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert claim_output_dir(out, "prepare", "k", "manifest.json")[0] == "fresh"
    assert [p.name.startswith("shards.superseded-") for p in tmp_path.iterdir()] == [True]


def test_cache_keys_follow_relevant_sections_only(tmp_path):
    base = pipeline_config_dict(tmp_path)
    config = PipelineRunConfig.model_validate(base)
    other_loss = PipelineRunConfig.model_validate({**base, "loss": {**base["loss"], "margin": 0.25}})
    other_launcher = PipelineRunConfig.model_validate(
        {**base, "pipeline": {**base["pipeline"], "launcher": "torchrun"}}
    )
    assert sections_digest(config, TRAIN_SECTIONS) != sections_digest(other_loss, TRAIN_SECTIONS)
    assert sections_digest(config, ["prepare"]) == sections_digest(other_loss, ["prepare"])
    assert sections_digest(config, TRAIN_SECTIONS) == sections_digest(other_launcher, TRAIN_SECTIONS)
    before = source_fingerprint(tmp_path / "src")
    image = next((tmp_path / "src" / "class_0").iterdir())
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert source_fingerprint(tmp_path / "src") != before
    with pytest.raises(ValueError, match="does not exist"):
        source_fingerprint(tmp_path / "missing")
    # A broken link (which prepare lists as broken_link) is fingerprinted, not a crash, and
    # pointing it somewhere changes the fingerprint.
    link = tmp_path / "src" / "class_0" / "dangling.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with_link = source_fingerprint(tmp_path / "src")
    assert source_fingerprint(tmp_path / "src") == with_link
    (tmp_path / "nowhere.png").write_bytes(b"x")
    assert source_fingerprint(tmp_path / "src") != with_link


# ---------------------------------------------------------------------------------------------
# Wiring


def test_pipeline_config_wires_stage_paths(tmp_path):
    data = pipeline_config_dict(tmp_path)
    data["data"]["shard_dir"] = str(tmp_path / "elsewhere")
    config = load_pipeline_config(write_config(tmp_path / "c.yaml", data))
    assert config.data.shard_dir == str(tmp_path / "shards")
    assert config.distill.teacher == str(tmp_path / "teacher")
    assert config.distill.student.embedding_dim == 16  # the teacher's
    student = evaluate_student_config(config)
    assert student.evaluate.model_path == str(tmp_path / "student" / "model.pt")
    assert student.evaluate.output_dir == str(tmp_path / "student" / "eval")
    assert export_config(config).export.output_dir == str(tmp_path / "student" / "export")
    with pytest.raises(ConfigError, match=r"train\.run_dir .* and distill\.run_dir .* must be separate"):
        load_pipeline_config(tmp_path / "c.yaml", [f"distill.run_dir={tmp_path / 'teacher' / 'student'}"])


@pytest.mark.parametrize("key, used", [("evaluate.output_dir", "eval"), ("export.output_dir", "export")])
def test_pipeline_says_it_does_not_use_a_given_output_dir(tmp_path, caplog, key, used):
    # the pipeline places evaluations and the export under the run folders; a user's own
    # output_dir was dropped without a word and the outputs looked missing
    write_config(tmp_path / "c.yaml", pipeline_config_dict(tmp_path))
    mine = tmp_path / "mine"
    with caplog.at_level(logging.WARNING, logger="pipeline.stage_paths"):
        load_pipeline_config(tmp_path / "c.yaml")  # defaults: nothing to say
        load_pipeline_config(tmp_path / "c.yaml", [f"{key}={tmp_path / 'student' / used}"])  # where it writes anyway
        assert "is not used" not in caplog.text
        config = load_pipeline_config(tmp_path / "c.yaml", [f"{key}={mine}", f"distill.teacher={mine}"])
    assert f"{key} {mine} is not used" in caplog.text
    assert f"distill.teacher {mine} is not used" in caplog.text
    assert str(tmp_path / "student") in export_config(config).export.output_dir


# ---------------------------------------------------------------------------------------------
# Failure reasons


TORCHRUN_FAILURE = """\
$ python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 --max-restarts 0 -m dml.cli train
22:23:44 INFO faiss.loader: Could not load library with AVX2 support due to:
ModuleNotFoundError("No module named 'faiss.swigfaiss_avx2'")
22:23:47 INFO dml.distributed: joined process group: rank 0 of 2, backend gloo, device cpu
dml train: error: split 'nosuch' not in manifest (has: query, train)
dml train: error: split 'nosuch' not in manifest (has: query, train)
E1123 22:23:53.588000 23553 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0
Traceback (most recent call last):
  File "torch/distributed/launcher/api.py", line 386, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
dml.cli FAILED
"""  # noqa: W291 - torchrun's ChildFailedError line ends in a space


def test_failure_reason_prefers_the_cli_error_then_the_exception():
    assert failure_reason(TORCHRUN_FAILURE, "exit 1") == ("split 'nosuch' not in manifest (has: query, train)", True)
    no_cli_line = TORCHRUN_FAILURE.replace("dml train: error:", "")
    assert failure_reason(no_cli_line, "exit code 1") == ("exit code 1", False)  # not the faiss log line
    crash = "Traceback (most recent call last):\n  File 'x'\nRuntimeError: CUDA out of memory\n"
    assert failure_reason(crash + "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n", "x") == (
        "RuntimeError: CUDA out of memory",
        False,
    )
    assert failure_reason("nothing useful\n", "exit code 9") == ("exit code 9", False)


def test_inprocess_failure_names_stage_reason_and_log(tmp_path):
    config = PipelineRunConfig.model_validate(pipeline_config_dict(tmp_path))
    with pytest.raises(StageFailed) as caught:
        execute_stage("train", config, InProcessLauncher())  # no shards yet
    assert caught.value.stage == "train" and "manifest" in caught.value.reason and caught.value.input_error
    execute_stage("prepare", config, InProcessLauncher())
    bad = PipelineRunConfig.model_validate(
        {**pipeline_config_dict(tmp_path), "data": {**pipeline_config_dict(tmp_path)["data"], "train_split": "nosuch"}}
    )
    with pytest.raises(StageFailed, match=r"stage 'train' failed: .*nosuch.* \(log: .*train\.log\)") as caught:
        execute_stage("train", bad, InProcessLauncher())
    log_text = Path(caught.value.log_path).read_text()
    assert "dml train: error:" in log_text and "nosuch" in log_text
    assert read_stamp(tmp_path / "shards")["status"] == "done"  # the stage before is intact
    assert read_stamp(tmp_path / "teacher")["status"] == "running"  # a retry resumes here


# ---------------------------------------------------------------------------------------------
# torchrun launcher (real processes)


@pytest.mark.dist
def test_torchrun_launcher_trains_on_two_processes_then_caches(tmp_path):
    config = load_pipeline_config(write_config(tmp_path / "c.yaml", pipeline_config_dict(tmp_path, "torchrun")))
    execute_stage("prepare", config, InProcessLauncher())
    launcher = TorchrunLauncher(nproc_per_node=2, max_restarts=0)
    outcome = execute_stage("train", config, launcher)
    assert outcome.status == "ran" and outcome.result["steps"] == 3
    saved = torch.load(list_checkpoints(tmp_path / "teacher")[-1] / "state.pt", weights_only=False)
    assert saved["world_size"] == 2
    log_text = (tmp_path / "teacher" / "logs" / "train.log").read_text()
    assert "torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2" in log_text
    assert yaml.safe_load((tmp_path / "teacher" / "logs" / "train.config.yaml").read_text())["loss"]["margin"] == 0.2
    mtime = (tmp_path / "teacher" / "model.pt").stat().st_mtime_ns
    again = execute_stage("train", config, launcher)
    assert again.status == "cached" and (tmp_path / "teacher" / "model.pt").stat().st_mtime_ns == mtime
    # A failing torchrun stage is parsed from the same log format (test above uses a real one).


STAGE_IN_CHILD = """
import sys
from pipeline.launchers import TorchrunLauncher
from pipeline.stage_execution import execute_stage
from pipeline.stage_paths import load_pipeline_config
execute_stage("train", load_pipeline_config(sys.argv[1]), TorchrunLauncher(nproc_per_node=2, max_restarts=0))
"""


@pytest.mark.dist
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_pipeline_leaves_no_torchrun_training(tmp_path):
    """SIGKILL to the process running the pipeline (OOM kill, scheduler) left torchrun and its
    workers training; torchrun now gets SIGTERM from the kernel and stops its workers."""
    import signal
    import subprocess

    from dml.train.metrics_log import read_metrics
    from processes import alive, children

    raw = pipeline_config_dict(tmp_path, "torchrun")
    raw["train"] = {**raw["train"], "max_steps": 100_000, "epochs": 100_000}
    path = write_config(tmp_path / "c.yaml", raw)
    execute_stage("prepare", load_pipeline_config(path), InProcessLauncher())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    pipeline = subprocess.Popen([sys.executable, "-c", STAGE_IN_CHILD, str(path)], env=env)
    try:
        deadline = time.monotonic() + 240
        while not any(r.get("step", 0) > 2 for r in read_metrics(tmp_path / "teacher")):
            assert pipeline.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        launched = [pid for pid in children(pipeline.pid) if alive(pid)]  # torchrun
        assert len(launched) == 1
        family = launched + [pid for pid in children(launched[0]) if alive(pid)]
        assert len(family) == 3  # torchrun and its 2 workers
    finally:
        pipeline.send_signal(signal.SIGKILL)
        pipeline.wait()
    deadline = time.monotonic() + 60  # torchrun gives its workers a grace period
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in family if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


# ---------------------------------------------------------------------------------------------
# Kubernetes launcher: rendered offline and validated against the Kubernetes schemas


def stage_spec(tmp_path: Path, name: str, command: str, distributed: bool) -> StageSpec:
    config = PipelineRunConfig.model_validate(pipeline_config_dict(tmp_path))
    return StageSpec(
        name,
        command,
        config,
        tmp_path / "teacher",
        "model.pt",
        {"manifest": "m" * 64},
        distributed=distributed,
        resumable=command in ("prepare", "train", "distill"),
    )


def test_kubernetes_job_for_a_distributed_stage_validates(tmp_path):
    spec = stage_spec(tmp_path, "train", "train", distributed=True)
    launcher = KubernetesLauncher(namespace="dml", image="registry.example/dml:0.1.0", nproc_per_node=4, max_restarts=2)
    config_map, job = launcher.manifests(spec, resume=True, suffix="ab12c")
    for obj in (config_map, job):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert re.fullmatch(r"dml-train-[0-9a-f]{8}-ab12c", job["metadata"]["name"])
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "torchrun",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "4",
        "--max-restarts",
        "2",
        "-m",
        "dml.cli",
        "train",
        "--config",
        "/etc/dml/config.yaml",
        "--resume",
    ]
    assert container["image"] == "registry.example/dml:0.1.0" and container["resources"]["requests"]["cpu"] == "4"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"dml-raw", "dml-shards", "dml-runs"}
    assert {v["name"]: v for v in pod["volumes"]}["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    shipped = PipelineRunConfig.model_validate(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert shipped == spec.config


def test_kubernetes_job_for_a_single_process_stage(tmp_path):
    spec = stage_spec(tmp_path, "export", "export", distributed=False)
    _, job = KubernetesLauncher(nproc_per_node=8).manifests(spec, resume=True, suffix="x1")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["dml", "export", "--config", "/etc/dml/config.yaml"]  # export does not resume
    assert container["resources"]["requests"]["cpu"] == "1"
    broken = dict(job, spec={**job["spec"], "backoffLimit": "zero"})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def pod_list(container_status: dict, phase: str = "Running") -> dict:
    return {
        "items": [
            {
                "metadata": {"name": "dml-train-1-abcde"},
                "status": {"phase": phase, "containerStatuses": [{"name": "stage", **container_status}]},
            }
        ]
    }


def test_kubernetes_status_parsing_names_the_pod_failure():
    oom = pod_list({"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}, "Failed")
    assert pod_problem(oom) == "pod dml-train-1-abcde: container stage OOMKilled (exit code 137)"
    pull = pod_list(
        {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}, "Pending"
    )
    assert pod_problem(pull) == "pod dml-train-1-abcde: ImagePullBackOff: Back-off pulling image"
    assert pod_problem(pod_list({"state": {"running": {}}})) is None
    assert job_condition({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == "Failed"
    assert job_condition({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == "Complete"
    assert job_condition({"status": {"active": 1}}) is None


# ---------------------------------------------------------------------------------------------
# Deployments (objects only; registering one is in test_pipeline_e2e.py)


def test_serve_deployment_has_the_nightly_cron(tmp_path):
    from pipeline.deployments import NIGHTLY_CRON, serve_deployment

    deployment = serve_deployment(tmp_path / "c.yaml", overrides=["train.max_steps=5"])
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == NIGHTLY_CRON == "0 2 * * *" and schedule.active
    assert deployment.concurrency_limit == 1  # a run due while one works is cancelled, not queued
    assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    [every] = serve_deployment(tmp_path / "c.yaml", interval=90).schedules
    assert every.schedule.interval.total_seconds() == 90
    assert deployment.parameters == {
        "config_path": str((tmp_path / "c.yaml").resolve()),
        "overrides": ["train.max_steps=5"],
        "only_if_data_changed": True,
    }
    assert deployment.flow_name == "dml-nightly-retrain"


class _NoPrefectAPI:
    """A client stand-in: the template must render without asking the API for blocks or variables."""

    def __getattr__(self, name):
        raise AssertionError(f"the work-pool template asked the Prefect API ({name})")


def test_kubernetes_worker_turns_the_work_pool_template_into_a_valid_flow_run_job():
    """The base job template and the deployment's job variables, through prefect-kubernetes'
    own job configuration (what `prefect worker start --type kubernetes` does per flow run),
    give a Job that validates against the Kubernetes schemas and mounts what k8s/base has."""
    import asyncio
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from k8s_render import find, render
    from pipeline.deployments import kubernetes_deployment, work_pool_base_job_template

    deployment = kubernetes_deployment("registry.example/dml:0.1.0")
    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(
            work_pool_base_job_template(), deployment.job_variables, client=_NoPrefectAPI()
        )
    )
    configuration.prepare_for_flow_run(flow_run=FlowRun(flow_id=uuid.uuid4(), name="nightly-run"))
    job = configuration.job_manifest
    pod = job["spec"]["template"]["spec"]
    # The worker insists on these two inside the pod spec (the API server drops them, warning).
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "x1"
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    [container] = pod["containers"]
    assert container["image"] == "registry.example/dml:0.1.0" and container["args"] == [
        "prefect",
        "flow-run",
        "execute",
    ]
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in container["env"]
    assert job["metadata"]["namespace"] == "dml" and job["spec"]["backoffLimit"] == 0
    base = render(Path(__file__).resolve().parents[1] / "k8s" / "base")
    find(base, "ServiceAccount", pod["serviceAccountName"])  # the worker's account: may create stage Jobs
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            find(base, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        else:
            find(base, "ConfigMap", volume["configMap"]["name"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/dml": "config", "/data/raw": "raw", "/data/shards": "shards", "/data/runs": "runs"}
    assert deployment.parameters["config_path"] == "/etc/dml/config.yaml"


# ---------------------------------------------------------------------------------------------
# Retry policy, nightly decision, CLI input errors (no Prefect server needed)


def test_input_errors_are_not_retried_other_failures_are():
    from prefect.states import Failed

    from pipeline.prefect_tasks import STAGE_RETRIES, retry_unless_input_error, run_stage

    assert run_stage.retries == STAGE_RETRIES >= 1
    assert run_stage.retry_condition_fn is retry_unless_input_error
    bad_input = Failed(data=StageFailed("train", "split 'x' not in manifest", "t.log", input_error=True))
    crash = Failed(data=StageFailed("train", "RuntimeError: NCCL timeout", "t.log"))
    assert not retry_unless_input_error(run_stage, None, bad_input)
    assert retry_unless_input_error(run_stage, None, crash)
    assert retry_unless_input_error(run_stage, None, Failed(data=OSError("disk full")))


def test_stage_reason_names_what_makes_a_stage_run_again(tmp_path):
    from pipeline.freshness import stage_reason

    config = PipelineRunConfig.model_validate(pipeline_config_dict(tmp_path))
    inputs = {"config": "c1", "manifest": "m1"}
    spec = StageSpec(
        "train", "train", config, tmp_path / "teacher", "model.pt", inputs, distributed=True, resumable=True
    )
    assert stage_reason(spec) == f"train: no finished run in {tmp_path / 'teacher'}"
    write_stamp(spec.output_dir, "train", spec.key, "running", inputs)
    assert stage_reason(spec) == f"train: the last attempt did not finish (it resumes in {tmp_path / 'teacher'})"
    write_stamp(spec.output_dir, "train", spec.key, "done", inputs)
    assert stage_reason(spec) == f"train: {tmp_path / 'teacher' / 'model.pt'} is missing"
    (spec.output_dir / "model.pt").write_bytes(b"weights")
    assert stage_reason(spec) is None
    for changed, words in (
        ({"manifest": "m2"}, "the data manifest"),
        ({"config": "c2"}, "its config"),
        ({"config": "c2", "manifest": "m2"}, "its config and the data manifest"),
    ):
        other = StageSpec(**{**spec.__dict__, "inputs": {**inputs, **changed}})
        assert stage_reason(other) == f"train: {words} changed"
    write_stamp(spec.output_dir, "distill", spec.key, "done", inputs)  # another stage's folder
    assert stage_reason(spec) == f"train: no finished run in {tmp_path / 'teacher'}"


def test_pipeline_command_rejects_bad_config_before_starting(tmp_path, capsys):
    from pipeline.cli import run_pipeline_command

    assert run_pipeline_command(tmp_path / "missing.yaml", []) == 2
    assert "dml pipeline: error: config file not found" in capsys.readouterr().err
    config = write_config(tmp_path / "c.yaml", pipeline_config_dict(tmp_path))
    assert run_pipeline_command(config, ["loss.margn=0.1"]) == 2
    assert "unknown config key 'loss.margn'; did you mean 'loss.margin'?" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("depth", [1, 3])
def test_pipeline_command_creates_a_missing_prefect_home_with_its_parents(tmp_path, monkeypatch, depth):
    # `make quickstart` in a fresh clone sets PREFECT_HOME=runs/.prefect before runs/ exists;
    # Prefect creates one level only and its server then cannot open its database.
    from pipeline.cli import ensure_prefect_home

    home = tmp_path.joinpath(*[f"level{i}" for i in range(depth)], ".prefect")
    monkeypatch.setenv("PREFECT_HOME", str(home))
    ensure_prefect_home()
    assert home.is_dir()
    ensure_prefect_home()  # an existing home is kept as it is
    assert home.is_dir()


def test_kubernetes_deployment_overrides_win_over_its_launcher_defaults():
    """Overrides now refuse a key given twice; the deployment's own launcher keys must then
    give way to the caller's instead of clashing with them."""
    from pipeline.deployments import kubernetes_deployment
    from pipeline.stage_paths import load_pipeline_config

    deployment = kubernetes_deployment("registry.example/dml:0.1.0", overrides=["pipeline.namespace=team-a"])
    overrides = deployment.parameters["overrides"]
    assert overrides.count("pipeline.namespace=team-a") == 1 and "pipeline.namespace=dml" not in overrides
    config = load_pipeline_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", overrides)
    assert config.pipeline.namespace == "team-a" and config.pipeline.launcher == "kubernetes"
