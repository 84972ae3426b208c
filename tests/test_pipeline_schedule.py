"""Scheduled retrains against a real Prefect server: `prefect server start` on a loopback port
(SQLite under a temp PREFECT_HOME), `dml pipeline deploy` onto a process work pool with a
15-second interval, a real `prefect worker`, then `dml pipeline runs` and `dml pipeline serve`.

Checked through Prefect's client: the first scheduled run retrains and leaves its artifacts;
the next one, on unchanged data, completes as "Skipped" with the reason; after a new raw
image a run retrains; a stage that fails (kubectl against an unreachable cluster) fails the
run with the stage, the reason and the log path, after the configured retries; runs never
overlap. The tests share the server and run in file order. Every process they start is
stopped at the end (`live_prefect.ProcessTree`), also when a test fails.
"""

from __future__ import annotations

from test_pipeline import pipeline_config_dict  # first: sets PREFECT_HOME before prefect loads

# isort: split

import contextlib
import itertools
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
from prefect.exceptions import ObjectNotFound

from data_fixtures import image_bytes
from live_prefect import PREFECT, LiveServer, ProcessTree, free_port, run_cli, start_server
from pipeline.prefect_artifacts import DECISION_KEY, FAILURE_KEY, HEADLINE_KEY, METRICS_KEY
from pipeline.schedules import DEPLOYMENT, FLOW_NAME
from pipeline.stage_cache import read_stamp
from train_fixtures import write_config

pytestmark = pytest.mark.prefect_server

POOL = "dml-local"
INTERVAL = 15
FINISHED = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]
NEVER = "0 0 1 1 *"  # a deployment whose runs the test starts itself


@pytest.fixture(scope="module")
def processes():
    tree = ProcessTree()
    yield tree
    tree.stop_all()


@pytest.fixture(scope="module")
def server(processes, tmp_path_factory) -> LiveServer:
    return start_server(processes, tmp_path_factory.mktemp("prefect-server"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nightly")
    return root, write_config(root / "pipeline.yaml", pipeline_config_dict(root))


def unreachable_kubeconfig(path: Path) -> Path:
    """A kubeconfig whose API server is a closed loopback port (and a token, so kubectl
    never asks for credentials)."""
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: gone, cluster: {{server: "https://127.0.0.1:{free_port()}"}}}}]
users: [{{name: gone, user: {{token: none}}}}]
contexts: [{{name: gone, context: {{cluster: gone, user: gone}}}}]
current-context: gone
""")
    return path


@pytest.fixture(scope="module")
def deployed(server, workspace, processes):
    """`dml pipeline deploy` (creates the process pool), then a worker polling it."""
    root, config = workspace
    done = run_cli(
        ["pipeline", "deploy", "--config", str(config), "--work-pool", POOL, "--interval", str(INTERVAL)],
        server.env,
        cwd=root,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with server.client() as client:
        deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT}")
    env = {
        **server.env,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "KUBECONFIG": str(unreachable_kubeconfig(root.parent / f"{root.name}-kubeconfig")),
    }
    processes.start([PREFECT, "worker", "start", "--pool", POOL, "--type", "process"], env, root / "worker.log")
    return deployment, done.stdout


def runs_of(server: LiveServer, deployment_id) -> list[FlowRun]:
    """Runs of a deployment that are not waiting for their time, oldest first."""
    with server.client() as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED]))
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )


def wait_for_run(
    server, processes, deployment_id, started_after: datetime | None = None, timeout: float = 480.0
) -> FlowRun:
    """The first finished (not cancelled) run of the deployment that started after ``started_after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in runs_of(server, deployment_id):
            started = run.start_time
            later = started_after is None or (started is not None and started > started_after)
            if run.state_type in FINISHED and later:
                return run
        time.sleep(2)
    raise AssertionError(f"no finished run of {deployment_id} in {timeout:.0f} s\n{processes.tails()}")


def artifacts_of(server: LiveServer, run: FlowRun) -> dict[str, object]:
    # Plain HTTP: prefect 3.8.8's read_artifacts sends null filters its server rejects (422).
    body = {"artifacts": {"flow_run_id": {"any_": [str(run.id)]}}, "sort": "CREATED_DESC", "limit": 50, "offset": 0}
    response = httpx.post(f"{server.url}/artifacts/filter", json=body, timeout=30)
    response.raise_for_status()
    found: dict[str, object] = {}
    for artifact in response.json():
        data = artifact["data"]
        found.setdefault(artifact["key"], json.loads(data) if artifact["type"] == "table" else data)
    return found


def describe(run: FlowRun, processes: ProcessTree) -> str:
    return f"run {run.name}: {run.state_name} {run.state.message if run.state else None!r}\n{processes.tails()}"


@pytest.fixture(scope="module")
def first_run(server, processes, deployed, workspace):
    run = wait_for_run(server, processes, deployed[0].id)
    root = workspace[0]
    return run, {name: (root / name / "model.pt").stat().st_mtime_ns for name in ("teacher", "student")}


@pytest.fixture(scope="module")
def skipped_run(server, processes, deployed, first_run):
    return wait_for_run(server, processes, deployed[0].id, started_after=first_run[0].end_time, timeout=240)


@pytest.fixture(scope="module")
def new_data_run(server, processes, deployed, workspace, skipped_run):
    root = workspace[0]
    before = read_stamp(root / "teacher")
    changed_at = datetime.now(timezone.utc)
    (root / "src" / "class_0" / "img_new.png").write_bytes(image_bytes(4242))
    return wait_for_run(server, processes, deployed[0].id, started_after=changed_at), before


def test_deploy_registers_one_run_at_a_time_on_a_process_pool(server, workspace, deployed):
    root, config = workspace
    deployment, out = deployed
    assert f"on work pool {POOL} (process), every {INTERVAL} s, one run at a time" in out
    assert f"prefect worker start --pool {POOL}" in out
    with server.client() as client:
        assert client.read_work_pool(POOL).type == "process"
    assert deployment.entrypoint == "pipeline.flows.nightly_retrain"
    assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [INTERVAL]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert deployment.parameters == {"config_path": str(config), "overrides": [], "only_if_data_changed": True}
    assert deployment.job_variables["working_dir"] == str(root)
    assert "PREFECT_API_URL" not in os.environ  # the server's URL went to the children only


def test_first_scheduled_run_retrains_and_publishes_its_artifacts(server, processes, workspace, first_run):
    root = workspace[0]
    run = first_run[0]
    assert run.state_type == StateType.COMPLETED and run.state_name == "Completed", describe(run, processes)
    assert run.state.message == f"retrained: train: no finished run in {root / 'teacher'}"
    artifacts = artifacts_of(server, run)
    assert {METRICS_KEY, HEADLINE_KEY, DECISION_KEY, "dml-student-report", "dml-model-card"} <= set(artifacts)
    assert artifacts[DECISION_KEY].startswith("## Retrained")
    release = (root / "publish" / "latest.txt").read_text().strip()
    for row in artifacts[HEADLINE_KEY]:
        assert row["report"] == str(root / "publish" / release / f"{row['model']}_report.json")
        headline = json.loads(Path(row["report"]).read_text())["headline"]
        assert (row["map_at_r"], row["precision_at_1"]) == (headline["map_at_r"], headline["precision_at_1"])
    assert [row["model"] for row in artifacts[HEADLINE_KEY]] == ["teacher", "student"]


def test_next_run_on_unchanged_data_is_recorded_as_skipped(server, processes, workspace, first_run, skipped_run):
    root = workspace[0]
    run = skipped_run
    assert run.state_type == StateType.COMPLETED and run.state_name == "Skipped", describe(run, processes)
    manifest = read_stamp(root / "shards")["result"]["manifest_sha256"]
    assert run.state.message == (
        f"skipped: data manifest {manifest[:12]} and config unchanged, every stage's outputs are current"
    )
    artifacts = artifacts_of(server, run)
    assert artifacts[DECISION_KEY].startswith("## Skipped") and HEADLINE_KEY not in artifacts
    assert {name: (root / name / "model.pt").stat().st_mtime_ns for name in ("teacher", "student")} == first_run[1]


def test_a_new_raw_image_retrains(server, processes, workspace, new_data_run):
    root = workspace[0]
    run, before = new_data_run
    assert run.state_type == StateType.COMPLETED and run.state_name == "Completed", describe(run, processes)
    assert run.state.message == "retrained: train: the data manifest changed"
    after = read_stamp(root / "teacher")
    assert after["inputs"]["manifest"] == read_stamp(root / "shards")["result"]["manifest_sha256"]
    assert after["inputs"]["manifest"] != before["inputs"]["manifest"]
    assert after["result"]["model_sha256"] != before["result"]["model_sha256"]
    assert read_stamp(root / "shards")["result"]["counts"] != {}  # prepared again, with the new image


def test_runs_never_overlap_and_dml_pipeline_runs_lists_them(server, processes, workspace, deployed, new_data_run):
    root = workspace[0]
    runs = runs_of(server, deployed[0].id)
    worked = [run for run in runs if run.start_time is not None and run.state_type != StateType.CANCELLED]
    for earlier, later in itertools.pairwise(worked):
        assert earlier.end_time is None or earlier.end_time <= later.start_time, (earlier.name, later.name)
    for run in runs:
        if run.state_type == StateType.CANCELLED:
            assert "concurrency limit" in run.state.message.lower(), run.state.message
    done = run_cli(["pipeline", "runs", "--limit", "200"], server.env, cwd=root)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    retrained = next(i for i, line in enumerate(lines) if new_data_run[0].name in line)
    assert "Completed" in lines[retrained] and "retrained: train: the data manifest changed" in lines[retrained]
    release = (root / "publish" / "latest.txt").read_text().strip()
    for offset, model in ((1, "teacher"), (2, "student")):
        report = root / "publish" / release / f"{model}_report.json"
        headline = json.loads(report.read_text())["headline"]
        assert lines[retrained + offset] == (
            f"    {model}: map_at_r={headline['map_at_r']:.4f} "
            f"precision_at_1={headline['precision_at_1']:.4f}  report: {report}"
        )
    assert any("Skipped" in line and "skipped: data manifest" in line for line in lines)


def test_cluster_deploy_creates_the_kubernetes_pool_with_the_base_job_template(server, tmp_path_factory):
    from pipeline.deployments import (
        NIGHTLY_CRON,
        POD_CONFIG,
        work_pool_base_job_template,
    )

    config = Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "gpu-prod" / "run-config.yaml"
    done = run_cli(
        [
            "pipeline",
            "deploy",
            "--config",
            str(config),
            "--work-pool",
            "dml-k8s",
            "--image",
            "registry.example/dml:0.1.0",
        ],
        server.env,
        cwd=tmp_path_factory.mktemp("cluster"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on work pool dml-k8s (kubernetes), cron '0 2 * * *' (UTC), one run at a time" in done.stdout
    assert "kubectl apply -k k8s/overlays/gpu-prod (or cpu-dev), with WORK_POOL=dml-k8s" in done.stdout
    with server.client() as client:
        pool = client.read_work_pool("dml-k8s")
        deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT}-k8s")
    assert pool.type == "kubernetes" and pool.base_job_template == work_pool_base_job_template()
    assert [s.schedule.cron for s in deployment.schedules] == [NIGHTLY_CRON]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.job_variables["image"] == "registry.example/dml:0.1.0"
    assert deployment.parameters["config_path"] == POD_CONFIG
    assert deployment.parameters["overrides"][:2] == [
        "pipeline.launcher=kubernetes",
        "pipeline.image=registry.example/dml:0.1.0",
    ]


def test_failing_stage_fails_the_run_with_stage_reason_log_after_retries(server, processes, deployed, tmp_path_factory):
    with server.client() as client:
        client.pause_deployment(deployed[0].id)  # the nightly deployment rests from here on
    root = tmp_path_factory.mktemp("failing")
    config = write_config(root / "pipeline.yaml", pipeline_config_dict(root))
    overrides = ["pipeline.launcher=kubernetes", "pipeline.stage_retries=1", "pipeline.retry_delay_seconds=1"]
    done = run_cli(
        [
            "pipeline",
            "deploy",
            "--config",
            str(config),
            "--work-pool",
            POOL,
            "--cron",
            NEVER,
            "--name",
            "dml-failing",
            *overrides,
        ],
        server.env,
        cwd=root,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with server.client() as client:
        deployment = client.read_deployment_by_name(f"{FLOW_NAME}/dml-failing")
        client.create_flow_run_from_deployment(deployment.id)
    run = wait_for_run(server, processes, deployment.id, timeout=300)
    log_path = root / "shards" / "logs" / "prepare.log"
    assert run.state_type == StateType.FAILED, describe(run, processes)
    assert "stage 'prepare' failed: kubectl apply -f failed" in run.state.message
    assert f"(log: {log_path})" in run.state.message
    log = log_path.read_text()
    assert log.count("===== ") == 2 and "kubectl apply -f failed" in log  # one attempt + 1 retry, each logged
    with server.client() as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=50,
        )
    assert [(task.name, task.state_name, task.run_count) for task in tasks] == [("prepare", "Failed", 2)]
    failure = artifacts_of(server, run)[FAILURE_KEY]
    assert "Stage `prepare` failed" in failure and str(log_path) in failure


def test_serve_runs_the_schedule_from_this_machine(server, processes, workspace, new_data_run):
    root, config = workspace
    serve = processes.start(
        [
            sys.executable,
            "-m",
            "dml.cli",
            "pipeline",
            "serve",
            "--config",
            str(config),
            "--interval",
            "5",
            "--name",
            "dml-served",
        ],
        server.env,
        root / "serve.log",
        cwd=root,
    )
    deadline = time.monotonic() + 240
    deployment = None
    while deployment is None:
        assert serve.poll() is None and time.monotonic() < deadline, processes.tails()
        time.sleep(2)
        with server.client() as client, contextlib.suppress(ObjectNotFound):
            deployment = client.read_deployment_by_name(f"{FLOW_NAME}/dml-served")
    run = wait_for_run(server, processes, deployment.id, timeout=240)
    assert run.state_name == "Skipped", describe(run, processes)  # the worker's last run trained on this data
    processes.stop(serve)
    assert serve.poll() is not None
    assert "serving dml-nightly-retrain/dml-served from this process, every 5 s" in (root / "serve.log").read_text()
