"""Face verification sets in training and evaluation: .bin and pairs+folder give the same
numbers, embedding across two ranks equals one, a bad image stops every rank with one line
(no hang), training logs the sets and keeps the best model, the report shows them."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dml.config import DMLConfig, VerificationSetConfig, load_config
from dml.errors import ConfigError, DataError
from dml.eval.bin_reader import read_verification_bin, write_verification_bin
from dml.eval.face_verification import face_verification_metrics
from dml.eval.verification_sets import embed_verification_set, load_verification_set
from dml.models.model_file import build_model, load_final_model
from dml.train.metrics_log import read_metrics
from dml.train.run import run_train
from face_fixtures import make_pair_sets
from local_group import spawn_local_group, torchrun_dml
from test_bin_reader import RunsCommand
from train_fixtures import ROOT, tiny_shards, tiny_train_config, write_config

MODEL = {"backbone": "mobilenetv3_small_050", "embedding_dim": 16}


def small_model_and_data():
    config = DMLConfig.model_validate({"data": {"image_size": 32, "channels": 3}, "model": MODEL})
    torch.manual_seed(0)
    return build_model(config).eval(), config.data


def _embed_on_rank(info, paths: list[str]) -> list:
    """Each set's embeddings, or the DataError it raised, as one line."""
    model, data = small_model_and_data()
    out: list[Any] = []
    for path in paths:
        try:
            loaded = load_verification_set(VerificationSetConfig.model_validate(path))
            out.append(embed_verification_set(model, loaded, data, info.device, flip=True, batch_size=5).vectors)
        except DataError as exc:
            out.append(f"DataError: {exc}")
    return out


def test_bin_and_pairs_folder_are_the_same_set(tmp_path):
    bin_path, pairs, folder = make_pair_sets(tmp_path)
    model, data = small_model_and_data()
    from_bin = embed_verification_set(
        model, load_verification_set(VerificationSetConfig.model_validate(str(bin_path))), data, torch.device("cpu")
    )
    spec = VerificationSetConfig(path=str(pairs), folder=str(folder))
    from_folder = embed_verification_set(model, load_verification_set(spec), data, torch.device("cpu"))
    assert spec.set_name == "faces" and from_bin.name == "faces"
    np.testing.assert_allclose(from_bin.vectors, from_folder.vectors, atol=1e-6)
    assert from_bin.is_same.tolist() == from_folder.is_same.tolist()


@pytest.mark.dist
def test_two_ranks_embed_like_one_and_stop_together_on_a_bad_image(tmp_path):
    bin_path, _, _ = make_pair_sets(tmp_path)
    alone = _embed_on_rank(type("Info", (), {"device": torch.device("cpu")})(), [str(bin_path)])[0]
    content = read_verification_bin(bin_path)
    content.images[len(content.images) - 3] = b"\xff\xd8 not a jpeg"  # in rank 1's share
    bad = write_verification_bin(tmp_path / "bad.bin", content.images, content.is_same.tolist())
    (good_0, bad_0), (good_1, bad_1) = spawn_local_group(_embed_on_rank, 2, ([str(bin_path), str(bad)],))
    for vectors in (good_0, good_1):
        np.testing.assert_allclose(vectors, alone, atol=1e-5)
    bad_runs = [bad_0, bad_1]
    assert bad_runs[0] == bad_runs[1]  # rank 0 decoded fine, yet stops with rank 1's error
    assert bad_runs[0].startswith("DataError") and "image 37" in bad_runs[0] and "\n" not in bad_runs[0]


def test_face_recipe_config_loads():
    config = load_config(ROOT / "configs" / "face.yaml")
    assert config.prepare.source.kind == "recordio" and config.data.image_size == 112
    assert config.loss.kind == "arcface" and [s.set_name for s in config.train.verification_sets] == [
        "lfw",
        "cfp_fp",
        "agedb_30",
    ]
    assert config.train.resolved_best_metric == "ver_lfw_accuracy" and config.evaluate.verification_sets


def test_config_forms_and_errors(tmp_path):
    train = DMLConfig.model_validate(
        {"train": {"verification_sets": ["a/lfw.bin", {"path": "p.txt", "folder": "x/orl"}]}}
    ).train
    assert [s.set_name for s in train.verification_sets] == ["lfw", "orl"]
    assert train.resolved_best_metric == "ver_lfw_accuracy"
    for bad, message in [
        ({"verification_sets": ["pairs.txt"]}, "needs 'folder'"),
        ({"verification_sets": ["a/lfw.bin", "b/lfw.bin"]}, "share the name"),
        ({"verification_sets": ["lfw.bin"], "best_metric": "ver_lfw_acc"}, "not a logged metric"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from dml.config import validate_config

            validate_config({"train": bad})


def test_training_logs_sets_and_keeps_the_best_model(tmp_path):
    bin_path, pairs, folder = make_pair_sets(tmp_path)
    shards = tiny_shards(tmp_path)
    config = DMLConfig.model_validate(
        tiny_train_config(
            shards,
            tmp_path / "run",
            train={
                "epochs": 2,
                "eval_every": 2,
                "verification_sets": [str(bin_path), {"path": str(pairs), "folder": str(folder), "name": "folder"}],
            },
        )
    )
    result = run_train(config)
    evaluations = [r for r in read_metrics(tmp_path / "run") if "ver_faces_accuracy" in r]
    assert [r["step"] for r in evaluations if not r.get("final")] == list(range(2, result.steps + 1, 2))
    for record in evaluations:
        assert record["ver_faces_accuracy"] == record["ver_folder_accuracy"]  # the same pairs and images
        assert 0.0 <= record["ver_faces_accuracy"] <= 1.0 and "ver_faces_tar_at_far_1e-01" in record
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    values = [r["ver_faces_accuracy"] for r in evaluations]
    assert best["metric"] == "ver_faces_accuracy" and best["value"] == max(values)
    assert best["step"] == evaluations[values.index(max(values))]["step"]
    _model, payload = load_final_model(tmp_path / "run" / "best" / "model.pt")
    assert payload["best"]["value"] == best["value"]


@pytest.mark.dist
def test_two_process_training_evaluates_sets_on_every_rank(tmp_path):
    bin_path, _, _ = make_pair_sets(tmp_path)
    shards = tiny_shards(tmp_path)
    config = tiny_train_config(
        shards,
        tmp_path / "run",
        train={
            "epochs": 4,
            "max_steps": 4,
            "eval_every": 2,
            "verification_sets": [str(bin_path)],
            "verification_flip": True,
        },
    )
    cmd = torchrun_dml(2, "train", "--config", str(write_config(tmp_path / "c.yaml", config)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "ver_faces_accuracy" in r]
    assert steps == [2, 4, 4]  # eval_every 2 and the final evaluation
    assert (tmp_path / "run" / "best" / "model.pt").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("face_eval")
    bin_path, pairs, folder = make_pair_sets(root)
    shards = tiny_shards(root)
    run_train(DMLConfig.model_validate(tiny_train_config(shards, root / "run", train={"max_steps": 2})))
    return {"root": root, "bin": bin_path, "pairs": pairs, "folder": folder, "shards": shards}


def evaluate_config(trained: dict, output: str, sets: list) -> dict:
    return {
        "data": {"shard_dir": str(trained["shards"]), "num_workers": 0},
        "evaluate": {
            "model_path": str(trained["root"] / "run"),
            "output_dir": str(trained["root"] / output),
            "gallery_split": None,
            "fars": [0.1, 0.001],
            "flip": True,
            "verification_sets": sets,
        },
    }


def test_evaluate_reports_sets_and_recomputes_them_from_saved_embeddings(trained):
    from dml.eval.run import run_evaluate

    config = DMLConfig.model_validate(evaluate_config(trained, "eval", [str(trained["bin"])]))
    result = run_evaluate(config)
    report = json.loads(Path(result.report_path).read_text())
    faces = report["verification_sets"]["faces"]
    saved = np.load(trained["root"] / "eval" / "embeddings" / "verification_faces.npy")
    expected = face_verification_metrics(saved, read_verification_bin(trained["bin"]).is_same, fars=(0.1, 0.001))
    assert faces["accuracy"] == expected["accuracy"] and faces["fold_thresholds"] == expected["fold_thresholds"]
    assert report["headline"]["ver_faces_accuracy"] == faces["accuracy"]
    assert report["plots"]["verification_sets_roc"] == "verification_sets_roc.png"
    assert (trained["root"] / "eval" / "verification_sets_roc.png").stat().st_size > 10_000
    markdown = Path(result.markdown_path).read_text()
    assert "## Face verification sets" in markdown and "| `faces` | 20 (10 / 10) |" in markdown
    assert any("FAR 1e-03 not resolvable" in note for note in report["notes"])  # 10 different pairs
    again = run_evaluate(
        DMLConfig.model_validate(evaluate_config(trained, "eval2", [str(trained["bin"])])),
        embeddings_dir=result.embeddings_dir,
    )
    assert (
        json.loads(Path(again.report_path).read_text())["verification_sets"]["faces"]["accuracy"] == faces["accuracy"]
    )


def test_cli_evaluate_refuses_a_malicious_bin_with_one_line(trained, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "lfw.bin"
    evil.write_bytes(pickle.dumps(([RunsCommand(f"touch {marker}"), b"x"], [True]), protocol=4))
    config = write_config(tmp_path / "c.yaml", evaluate_config(trained, "evil", [str(evil)]))
    proc = subprocess.run(
        [sys.executable, "-m", "dml.cli", "evaluate", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert str(evil) in errors[0] and "refuses global posix.system" in errors[0]
    assert not marker.exists()


@pytest.mark.parametrize(
    "mode,values,saved_at",
    [("max", [0.5, 0.7, 0.6, 0.7, 0.9], [1, 2, 5]), ("min", [0.5, 0.7, 0.4, float("nan"), 0.4], [1, 3])],
)
def test_best_keeper_saves_on_strict_improvement_and_resumes(tmp_path, mode, values, saved_at):
    from dml.train.best import BestModelKeeper

    saved = []

    def save(model, path, extra):
        path.write_text(json.dumps(extra))
        saved.append(extra["best"]["step"])

    keeper = BestModelKeeper(tmp_path, "ver_x_eer", mode, save)
    for step, value in enumerate(values, start=1):
        keeper.update({"ver_x_eer": value}, step, torch.nn.Linear(1, 1))
    assert saved == saved_at
    again = BestModelKeeper(tmp_path, "ver_x_eer", mode, save)  # a resumed run starts from the best so far
    assert again.value == values[saved_at[-1] - 1]
    assert not again.update({"ver_x_eer": values[saved_at[-1] - 1]}, 99, torch.nn.Linear(1, 1))
    with pytest.raises(Exception, match="was not computed; this run logs: ver_x_accuracy"):
        again.update({"step": 3, "ver_x_accuracy": 1.0}, 100, torch.nn.Linear(1, 1))
