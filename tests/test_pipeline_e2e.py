"""The chained Prefect flow end to end on tiny data, under one throwaway Prefect server
(`prefect_test_harness`, SQLite, its own PREFECT_HOME): a full run, a cached re-run, a
failing stage, a changed input, the nightly skip, and registering the Kubernetes work-pool
deployment. The tests share one workspace and run in file order (each builds on the last).
"""

from __future__ import annotations

from test_pipeline import pipeline_config_dict  # first: sets PREFECT_HOME before prefect loads

# isort: split

import json
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from pipeline.cli import run_pipeline_command
from pipeline.flows import dml_pipeline, nightly_retrain
from pipeline.freshness import stale_reason
from pipeline.prefect_artifacts import DECISION_KEY, FAILURE_KEY, METRICS_KEY
from pipeline.stage_cache import read_stamp, write_stamp
from pipeline.stage_paths import load_pipeline_config
from train_fixtures import write_config

STAGES = ["prepare", "train", "evaluate_teacher", "distill", "evaluate_student", "export"]
FAILING = ["distill.student.embedding_dim=8"]  # the teacher embeds in 16 dims: distill refuses
CHANGED = ["loss.margin=0.25"]


@pytest.fixture(scope="session")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=240):
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("pipeline")
    return root, write_config(root / "pipeline.yaml", pipeline_config_dict(root))


@pytest.fixture(scope="module")
def first_run(workspace):
    _root, config_path = workspace
    state = dml_pipeline(str(config_path), [], return_state=True)
    return state.result(), state


def task_states(flow_state) -> dict[str, list]:
    """Task run name -> its task runs (name, state name, run count) of one flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.name, []).append((run.state.name if run.state else None, run.run_count))
    return found


def latest_flow_run_state(name: str):
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[name])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
    return run.state


def artifact(key: str) -> str:
    # Plain HTTP: prefect 3.8.8's own read_artifacts sends null filters its server rejects (422).
    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1, "offset": 0}
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    response.raise_for_status()
    [found] = response.json()
    return found["data"]


def mtimes(root: Path) -> dict[str, int]:
    files = [
        "shards/manifest.json",
        "teacher/model.pt",
        "teacher/eval/report.json",
        "student/model.pt",
        "student/eval/report.json",
        "student/export/model_card.json",
    ]
    return {name: (root / name).stat().st_mtime_ns for name in files}


def test_chained_flow_end_to_end(workspace, first_run):
    root, _ = workspace
    summary, state = first_run
    assert state.is_completed()
    assert {name: info["status"] for name, info in summary["stages"].items()} == dict.fromkeys(STAGES, "ran")
    for role in ("teacher", "student"):
        metrics = summary[role]["metrics"]
        assert 0.0 <= metrics["map_at_r"] <= 1.0 and 0.0 <= metrics["precision_at_1"] <= 1.0
        assert json.loads(Path(summary[role]["report_path"]).read_text())["headline"] == metrics
    assert summary["teacher"]["report_path"] == str(root / "teacher" / "eval" / "report.json")
    card = json.loads((root / "student" / "export" / "model_card.json").read_text())
    assert card["source"]["model_path"] == str(root / "student" / "model.pt")
    assert card["metrics"] == summary["student"]["metrics"]  # export read the student's report
    release = (root / "publish" / "latest.txt").read_text().strip()
    assert sorted(p.name for p in (root / "publish" / release).iterdir()) == [
        "model.onnx",
        "model_card.json",
        "student_report.json",
        "student_report.md",
        "teacher_report.json",
        "teacher_report.md",
    ]
    assert {name for name, runs in task_states(state).items() if runs == [("Completed", 1)]} >= set(STAGES)
    table = artifact(METRICS_KEY)
    teacher, student = summary["teacher"]["metrics"], summary["student"]["metrics"]
    assert f"| MAP@R | {teacher['map_at_r']:.4f} | {student['map_at_r']:.4f} |" in table
    assert f"| P@1 | {teacher['precision_at_1']:.4f} | {student['precision_at_1']:.4f} |" in table
    assert (root / "publish" / release / "model_card.json").resolve().as_uri() in artifact("dml-model-card")


def test_second_run_skips_every_stage(workspace, first_run, capsys):
    root, config_path = workspace
    before = mtimes(root)
    assert run_pipeline_command(config_path, []) == 0
    out = capsys.readouterr().out
    assert "train: cached" in out and f"report: {root / 'student' / 'eval' / 'report.json'}" in out
    teacher, student = first_run[0]["teacher"]["metrics"], first_run[0]["student"]["metrics"]
    assert (
        f"teacher map_at_r={teacher['map_at_r']:.4f} precision_at_1={teacher['precision_at_1']:.4f}; "
        f"student map_at_r={student['map_at_r']:.4f}"
    ) in out
    assert mtimes(root) == before  # nothing was rewritten
    states = task_states(latest_flow_run_state("dml-pipeline"))
    assert all(states[stage] == [("Cached", 1)] for stage in STAGES)


def test_failing_stage_reports_stage_reason_and_log_and_keeps_outputs(workspace, first_run, capsys):
    root, config_path = workspace
    before = mtimes(root)
    assert run_pipeline_command(config_path, FAILING) == 2  # a refused input: exit 2, not retried
    err = capsys.readouterr().err
    log_path = root / "student" / "logs" / "distill.log"
    assert "stage 'distill' failed: distill.student.embedding_dim is 8" in err and f"(log: {log_path})" in err
    assert "dml distill: error: distill.student.embedding_dim is 8" in log_path.read_text()
    [kept] = [p for p in root.iterdir() if p.name.startswith("student.superseded-")]  # renamed, not deleted
    assert (kept / "model.pt").stat().st_mtime_ns == before["student/model.pt"]
    for name in ("shards/manifest.json", "teacher/model.pt", "teacher/eval/report.json"):
        assert (root / name).stat().st_mtime_ns == before[name]
    states = task_states(latest_flow_run_state("dml-pipeline"))
    assert states["distill"] == [("Failed", 1)]  # an input error is not retried
    assert "evaluate_student" not in states
    failure = artifact(FAILURE_KEY)
    assert "Stage `distill` failed" in failure and str(log_path) in failure and str(root / "teacher") in failure
    assert run_pipeline_command(config_path, []) == 0  # back to the good config: the student is restored
    assert "distill: cached" in capsys.readouterr().out and mtimes(root) == before


def test_changed_loss_redoes_train_and_everything_downstream(workspace, first_run):
    root, config_path = workspace
    old_teacher = read_stamp(root / "teacher")
    summary = dml_pipeline(str(config_path), CHANGED)
    statuses = {name: info["status"] for name, info in summary["stages"].items()}
    assert statuses == {"prepare": "cached", **dict.fromkeys(STAGES[1:], "ran")}
    new_teacher = read_stamp(root / "teacher")
    assert new_teacher["inputs"]["manifest"] == old_teacher["inputs"]["manifest"]
    assert new_teacher["inputs"]["config"] != old_teacher["inputs"]["config"]
    assert new_teacher["result"]["model_sha256"] != old_teacher["result"]["model_sha256"]
    assert read_stamp(root / "student")["inputs"]["teacher"] == new_teacher["result"]["model_sha256"]
    [kept] = [p for p in root.iterdir() if p.name.startswith("teacher.superseded-")]
    assert read_stamp(kept)["key"] == old_teacher["key"] and (kept / "model.pt").is_file()
    assert len(list((root / "publish").glob("*/model_card.json"))) == 2  # both releases kept


def test_nightly_retrain_skips_when_nothing_changed_and_resumes_after_a_crash(workspace, first_run):
    root, config_path = workspace
    config = load_pipeline_config(config_path, CHANGED)
    assert stale_reason(config) is None  # the last run (CHANGED) left every stage current
    assert stale_reason(load_pipeline_config(config_path, [])) == "train: its config changed"
    before = mtimes(root)
    state = nightly_retrain(str(config_path), CHANGED, return_state=True)
    manifest = read_stamp(root / "shards")["result"]["manifest_sha256"]
    assert state.is_completed() and state.name == "Skipped"
    assert (
        state.message
        == f"skipped: data manifest {manifest[:12]} and config unchanged, every stage's outputs are current"
    )
    assert state.result()["retrained"] is False and mtimes(root) == before
    assert artifact(DECISION_KEY).startswith("## Skipped")
    # A crash in the middle of distillation: the student's stamp still says "running".
    student = read_stamp(root / "student")
    write_stamp(root / "student", "distill", student["key"], "running", student["inputs"])
    assert stale_reason(config) == f"distill: the last attempt did not finish (it resumes in {root / 'student'})"
    result = nightly_retrain(str(config_path), CHANGED)
    assert result["retrained"] is True and result["reason"].startswith("distill: the last attempt did not finish")
    statuses = {name: info["status"] for name, info in result["stages"].items()}
    assert statuses["train"] == "cached" and statuses["distill"] == "ran"
    assert read_stamp(root / "student")["status"] == "done" and stale_reason(config) is None


def test_kubernetes_work_pool_deployment_is_registered(prefect_server):
    from pipeline.deployments import (
        NIGHTLY_CRON,
        kubernetes_deployment,
        work_pool_base_job_template,
    )

    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name="dml-k8s", type="kubernetes", base_job_template=work_pool_base_job_template())
        )
        deployment_id = kubernetes_deployment("registry.example/dml:0.1.0").apply()
        deployment = client.read_deployment(deployment_id)
        pool = client.read_work_pool("dml-k8s")
    assert pool.type == "kubernetes"
    assert deployment.work_pool_name == "dml-k8s" and deployment.entrypoint == "pipeline.flows.nightly_retrain"
    assert [s.schedule.cron for s in deployment.schedules] == [NIGHTLY_CRON]
    assert deployment.job_variables["image"] == "registry.example/dml:0.1.0"
    assert deployment.job_variables["service_account_name"] == "prefect-worker"
    assert deployment.parameters["config_path"] == "/etc/dml/config.yaml"
    assert "pipeline.launcher=kubernetes" in deployment.parameters["overrides"]
