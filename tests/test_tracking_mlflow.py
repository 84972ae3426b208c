"""MLflow tracking against a real tracking server (and the local SQLite default): a parent run
per pipeline with a child per stage, parameters, metrics with steps, artifacts, the
registered student, and an unreachable tracker that loses nothing and syncs later."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dml.config import DMLConfig
from dml.errors import ConfigError
from dml.tracking import require
from dml.tracking.mlflow_run import read_tracking_file
from dml.train.metrics_log import read_metrics
from tracking_fixtures import free_port, mlflow_server
from train_fixtures import tiny_shards, tiny_train_config

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


def chain_config(root: Path, shards: Path, uri: str | None, experiment: str) -> DMLConfig:
    base = tiny_train_config(shards, root / "teacher", train={"max_steps": 3, "checkpoint_every": 100})
    base["distill"] = {
        "teacher": str(root / "teacher"),
        "run_dir": str(root / "student"),
        "student": {"backbone": "mobilenetv3_small_050"},
    }
    base["evaluate"] = {
        "model_path": str(root / "teacher"),
        "output_dir": str(root / "teacher" / "eval"),
        "gallery_split": None,
        "grid_queries": 0,
    }
    base["export"] = {
        "model_path": str(root / "student"),
        "output_dir": str(root / "student" / "export"),
        "formats": ["onnx"],
        "parity_images": 4,
    }
    base["tracking"] = {"mlflow": {"enabled": True, "uri": uri, "experiment": experiment}}
    return DMLConfig.model_validate(base)


def metric_steps(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_pipeline_stages_are_children_of_one_run_on_a_real_server(tmp_path, server):
    from dml.distill.run import run_distill
    from dml.eval.run import run_evaluate
    from dml.export.run import run_export
    from dml.tracking.pipeline_run import pipeline_run
    from dml.train.run import run_train

    config = chain_config(tmp_path, tiny_shards(tmp_path), server, "chain")
    with pipeline_run(config) as staged:
        parent = staged.tracking.mlflow.parent_run_id
        run_train(staged)
        run_evaluate(staged)
        run_distill(staged)
        run_export(staged)
    client = mlflow.MlflowClient(server)
    runs = {
        r.data.tags["dml.stage"]: r for r in client.search_runs([client.get_experiment_by_name("chain").experiment_id])
    }
    assert set(runs) == {"pipeline", "train", "evaluate", "distill", "export"}
    assert runs["pipeline"].info.run_id == parent and runs["pipeline"].info.status == "FINISHED"
    for stage in ("train", "evaluate", "distill", "export"):
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent and runs[stage].info.status == "FINISHED"
    train = runs["train"]
    assert train.data.params["train.max_steps"] == "3" and train.data.params["loss.kind"] == "arcface"
    records = [r for r in read_metrics(tmp_path / "teacher") if "loss_main" in r]
    assert metric_steps(client, train.info.run_id, "loss_main") == [
        (r["step"], pytest.approx(r["loss_main"])) for r in records
    ]
    assert {m.step for m in client.get_metric_history(train.info.run_id, "images_per_s")} == {1, 2, 3}
    assert {a.path for a in client.list_artifacts(train.info.run_id)} >= {
        "config.yaml",
        "metrics.jsonl",
        "train_result.json",
    }
    downloaded = client.download_artifacts(train.info.run_id, "metrics.jsonl", str(tmp_path / "dl"))
    assert Path(downloaded).read_text() == (tmp_path / "teacher" / "metrics.jsonl").read_text()
    report = json.loads((tmp_path / "teacher" / "eval" / "report.json").read_text())
    assert runs["evaluate"].data.metrics["map_at_r"] == pytest.approx(report["headline"]["map_at_r"])
    assert {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id, "report")} >= {
        "report/report.json",
        "report/report.md",
    }
    assert "plots/embedding_map.png" in {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id, "plots")}
    assert {a.path for a in client.list_artifacts(runs["export"].info.run_id, "model")} == {
        "model/model.onnx",
        "model/model_card.json",
    }
    [version] = client.search_model_versions("name = 'dml-student'")
    assert version.run_id == runs["export"].info.run_id
    assert version.tags["dml.teacher_run_id"] == train.info.run_id
    assert version.tags["dml.student_run_id"] == runs["distill"].info.run_id
    assert version.source.endswith("/model/model.onnx")
    assert read_tracking_file(tmp_path / "teacher") == {
        "stage": "train",
        "uri": server,
        "synced": True,
        "run_id": train.info.run_id,
        "error": None,
    }


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_unreachable_tracker_keeps_the_run_and_sync_uploads_it_later(tmp_path, server, caplog, capsys):
    from dml.cli import main
    from dml.train.run import run_train

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = chain_config(tmp_path, tiny_shards(tmp_path), dead, "late")
    with caplog.at_level(logging.WARNING, logger="dml.tracking"):
        result = run_train(config)
    assert result.steps == 3 and Path(result.model_path).is_file()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("dml.tracking")]
    assert len(warnings) == 1 and "dml track sync" in warnings[0].getMessage()
    state = read_tracking_file(tmp_path / "teacher")
    assert state["synced"] is False and state["uri"] == dead and state["run_id"] is None
    assert main(["track", "sync", str(tmp_path / "teacher"), "--uri", server]) == 0
    run_id = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    client = mlflow.MlflowClient(server)
    records = [r for r in read_metrics(tmp_path / "teacher") if "loss_main" in r]
    assert metric_steps(client, run_id, "loss_main") == [(r["step"], pytest.approx(r["loss_main"])) for r in records]
    assert client.get_run(run_id).data.params["train.run_dir"] == str(tmp_path / "teacher")
    assert read_tracking_file(tmp_path / "teacher")["synced"] is True
    from dml.eval.run import run_evaluate

    evaluated = run_evaluate(config)  # the evaluation folder syncs the same way
    assert read_tracking_file(tmp_path / "teacher" / "eval")["synced"] is False
    assert main(["track", "sync", str(tmp_path / "teacher" / "eval"), "--uri", server]) == 0
    eval_run = client.get_run(capsys.readouterr().out.strip().rsplit(" ", 1)[-1])
    assert eval_run.data.metrics["map_at_r"] == pytest.approx(evaluated.metrics["map_at_r"])
    assert "report.json" in {a.path for a in client.list_artifacts(eval_run.info.run_id)}


def test_default_store_is_sqlite_beside_the_run_folders(tmp_path, monkeypatch):
    from dml.train.run import run_train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = chain_config(tmp_path, tiny_shards(tmp_path), None, "local")
    run_train(config)
    database = tmp_path / "mlflow.db"
    assert database.is_file()
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    [run] = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    assert [step for step, _ in metric_steps(client, run.info.run_id, "loss_main")] == [1, 2, 3]
    assert (tmp_path / "mlartifacts").is_dir() and "metrics.jsonl" in {
        a.path for a in client.list_artifacts(run.info.run_id)
    }


def test_tracking_off_unless_enabled_or_a_uri_is_given(monkeypatch):
    from dml.tracking.mlflow_store import mlflow_enabled

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not mlflow_enabled(DMLConfig())
    assert mlflow_enabled(DMLConfig.model_validate({"tracking": {"mlflow": {"uri": "http://h:5000"}}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://h:5000")
    assert mlflow_enabled(DMLConfig())
    assert not mlflow_enabled(DMLConfig.model_validate({"tracking": {"mlflow": {"enabled": False}}}))


def test_missing_tracking_package_is_one_line_naming_the_extra():
    with pytest.raises(ConfigError) as error:
        require("dml_no_such_tracking_package", "tracking.mlflow")
    message = str(error.value)
    assert "\n" not in message and "tracking.mlflow" in message and "dml-pipeline[tracking]" in message
