"""`run_evaluate`: report contents, agreement with the metric functions on the saved
embeddings, re-evaluation without the model, pairs files, plots, errors, and two ranks."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import make_folder_tree
from dml.config import DataConfig, DMLConfig
from dml.config_reranking import RerankingConfig
from dml.data.manifest import manifest_digest
from dml.data.shards import write_shards
from dml.errors import DMLError
from dml.eval.embed import Embeddings, extract_embeddings
from dml.eval.metrics import retrieval_metrics
from dml.eval.query_expansion import alpha_query_expansion, database_side_augmentation
from dml.eval.reranking import nearest_neighbour_gap
from dml.eval.run import run_evaluate
from dml.eval.shard_lookup import read_sample_metadata
from dml.eval.verification import cmc_curve, verification_metrics
from dml.files import sha256_file
from dml.models.model_file import build_model, load_final_model, save_final_model
from local_group import spawn_local_group

FARS = (1e-1, 1e-2, 1e-4)
KS = (1, 3, 5)
CLASSES, PER_CLASS = 5, 10  # 4 train, 3 query, 3 gallery per class


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """Shards with query and gallery splits, and a saved resnet18 model (32x32, D=16)."""
    root = tmp_path_factory.mktemp("evaluate")
    make_folder_tree(root / "src", classes=CLASSES, per_class=PER_CLASS, bad=False)
    shards = root / "shards"
    write_shards(
        DMLConfig.model_validate(
            {
                "prepare": {
                    "source": {"path": str(root / "src")},
                    "output_dir": str(shards),
                    "split": {"mode": "sample", "train_fraction": 0.4, "query_fraction": 0.5},
                    "shards": {"max_samples": 8},
                }
            }
        ).prepare
    )
    train_config = DMLConfig.model_validate(
        {
            "data": {"shard_dir": str(shards), "image_size": 32, "channels": 3, "mean": (0.4,), "std": (0.3,)},
            "model": {"backbone": "resnet18", "embedding_dim": 16},
        }
    )
    torch.manual_seed(0)
    run_dir = root / "run"
    run_dir.mkdir()
    save_final_model(build_model(train_config), train_config, run_dir / "model.pt", manifest_digest(shards))
    return {"root": root, "shards": shards, "run_dir": run_dir}


def eval_config(workspace: dict, output: str, **evaluate) -> DMLConfig:
    """A run config whose data section differs from the model's (image_size 16, default
    normalisation): evaluation must use the model's own data config."""
    return DMLConfig.model_validate(
        {
            "seed": 0,
            "data": {"shard_dir": str(workspace["shards"]), "image_size": 16, "num_workers": 0, "batch_size": 7},
            "evaluate": {
                "model_path": str(workspace["run_dir"]),
                "output_dir": str(workspace["root"] / output),
                "ks": KS,
                "fars": FARS,
                "grid_queries": 4,
                **evaluate,
            },
        }
    )


@pytest.fixture(scope="module")
def first_run(workspace):
    config = eval_config(workspace, "eval")
    result = run_evaluate(config)
    report = json.loads(Path(result.report_path).read_text())
    return config, result, report


def saved(result, split: str) -> Embeddings:
    return Embeddings.load(Path(result.embeddings_dir), split)


def test_report_has_every_section_and_sane_values(workspace, first_run):
    _config, result, report = first_run
    for key in (
        "headline",
        "retrieval",
        "verification",
        "identification",
        "per_class",
        "config",
        "model",
        "data",
        "num_queries",
        "num_excluded_queries",
        "started_at",
        "finished_at",
        "plots",
        "notes",
    ):
        assert key in report, key
    assert report["model"]["sha256"] == sha256_file(workspace["run_dir"] / "model.pt")
    assert report["data"]["manifest_sha256"] == manifest_digest(workspace["shards"])
    assert report["config"]["evaluate"]["fars"] == list(FARS)
    assert report["counts"] == {
        "num_query": CLASSES * 3,
        "num_gallery": CLASSES * 3,
        "manifest_query": CLASSES * 3,
        "manifest_gallery": CLASSES * 3,
        "skipped_query": 0,
        "skipped_gallery": 0,
    }
    assert report["num_queries"] == CLASSES * 3 and report["num_excluded_queries"] == 0
    headline = report["headline"]
    assert set(headline) == {
        "precision_at_1",
        "map_at_r",
        "r_precision",
        "global_average_precision",
        "recall_at_1",
        "recall_at_3",
        "recall_at_5",
        "tar_at_far_1e-01",
        "tar_at_far_1e-02",
        "tar_at_far_1e-04",
        "roc_auc",
        "eer",
        "cmc_rank_1",
    }
    assert all(0.0 <= v <= 1.0 for v in headline.values() if v is not None)
    assert headline["recall_at_1"] <= headline["recall_at_3"] <= headline["recall_at_5"]
    assert result.metrics == headline
    # 15 query samples, 3 per class: 15 same and 90 different pairs -> FAR 1e-2 is not resolvable.
    verification = report["verification"]
    assert (verification["num_positive_pairs"], verification["num_negative_pairs"]) == (15, 90)
    assert headline["tar_at_far_1e-02"] is None and headline["tar_at_far_1e-01"] is not None
    assert any(n.startswith("FAR 1e-02 not resolvable") for n in report["notes"])
    curve = verification["curve"]
    assert curve["far"] == sorted(curve["far"]) and min(curve["far"]) >= 1 / 90
    assert np.all(np.diff(curve["tar"]) >= 0)
    assert report["retrieval"]["recall_curve"]["k"] == [1, 2, 3, 4, 5]


def test_metrics_equal_the_metric_functions_on_the_saved_embeddings(first_run):
    _config, result, report = first_run
    query, gallery = saved(result, "query"), saved(result, "gallery")
    assert len(query.keys) == len(query.labels) == query.vectors.shape[0] == CLASSES * 3
    direct = retrieval_metrics(query.vectors, query.labels, gallery.vectors, gallery.labels, ks=KS)
    direct["global_average_precision"] = nearest_neighbour_gap(
        query.vectors, query.labels, gallery.vectors, gallery.labels
    )
    reported = {k: v for k, v in report["retrieval"].items() if k != "recall_curve"}
    assert reported == pytest.approx(direct, abs=1e-12)
    assert report["reranking"] == {}  # none configured
    verification = verification_metrics(query.vectors, query.labels, fars=FARS)
    assert report["verification"]["tar_at_far"] == verification["tar_at_far"]
    assert report["verification"]["roc_auc"] == pytest.approx(verification["roc_auc"], abs=1e-12)
    assert report["verification"]["eer"] == pytest.approx(verification["eer"], abs=1e-12)
    cmc = cmc_curve(query.vectors, query.labels, gallery.vectors, gallery.labels, max_rank=10)
    assert report["identification"]["cmc"] == pytest.approx(cmc["cmc"], abs=1e-12)
    per_class = (Path(result.output_dir) / "per_class.csv").read_text().splitlines()
    assert len(per_class) == 1 + CLASSES and per_class[0].startswith("label,class_name,num_queries")


def test_embeddings_use_the_models_own_data_config(workspace, first_run):
    _, result, _ = first_run
    model, payload = load_final_model(workspace["run_dir"])
    own = DataConfig.model_validate({**payload["data"], "num_workers": 0})
    expected = extract_embeddings(model, own, "query", torch.device("cpu"))
    query = saved(result, "query")
    assert query.keys == expected.keys
    np.testing.assert_allclose(query.vectors, expected.vectors, atol=1e-5)
    other = extract_embeddings(
        model,
        DataConfig(shard_dir=str(workspace["shards"]), image_size=16, num_workers=0),
        "query",
        torch.device("cpu"),
    )
    assert not np.allclose(query.vectors, other.vectors, atol=1e-3)


def test_pictures_exist_and_markdown_has_the_headline_table(first_run):
    _, result, report = first_run
    assert set(result.plots) == {"tar_at_far", "recall_at_k", "retrieval_grid", "embedding_map"}
    for path in result.plots.values():
        assert Path(path).stat().st_size > 2000
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 250
    markdown = Path(result.markdown_path).read_text()
    headline = report["headline"]
    assert "| metric | value |" in markdown
    assert f"| P@1 | {headline['precision_at_1']:.4f} |" in markdown
    assert f"| MAP@R | {headline['map_at_r']:.4f} |" in markdown
    assert f"| R@5 | {headline['recall_at_5']:.4f} |" in markdown
    assert "| TAR@FAR=1e-02 | n/a |" in markdown
    assert f"| EER | {headline['eer']:.4f} |" in markdown
    for file in report["plots"].values():
        assert f"]({file})" in markdown


def test_rerun_from_saved_embeddings_needs_no_model(workspace, first_run, caplog):
    config, result, report = first_run
    again = config.model_copy(deep=True)
    again.evaluate.model_path = str(workspace["root"] / "no-such-model.pt")
    again.evaluate.output_dir = str(workspace["root"] / "eval-again")
    again.evaluate.plots = False
    with caplog.at_level(logging.INFO, logger="dml.eval"):
        second = run_evaluate(again, embeddings_dir=result.embeddings_dir)
    assert second.metrics == result.metrics
    rerun = json.loads(Path(second.report_path).read_text())
    assert rerun["retrieval"] == report["retrieval"] and rerun["verification"] == report["verification"]
    assert rerun["model"]["sha256"] == report["model"]["sha256"]
    assert second.plots == {} and not list(Path(second.output_dir).glob("*.png"))
    assert sum("plots skipped" in r.getMessage() for r in caplog.records) == 1
    assert not (Path(second.output_dir) / "embeddings").exists()


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("nan", "holds NaN or infinite values in 1 rows"),
        ("3d", "must be a non-empty 2-D float array"),
        ("object_labels", "cannot be read: Object arrays cannot be loaded"),
        ("2d_labels", "must be a 1-D integer or string array"),
    ],
)
def test_damaged_saved_embeddings_are_one_line_naming_the_folder(workspace, first_run, tmp_path, damage, problem):
    # each was a bare ValueError traceback (exit 1)
    config, result, _ = first_run
    folder = tmp_path / "embeddings"
    shutil.copytree(result.embeddings_dir, folder)
    vectors, labels = np.load(folder / "query.npy"), np.load(folder / "query_labels.npy")
    if damage == "nan":
        vectors[3, 0] = np.nan
    elif damage == "3d":
        vectors = vectors[:, :, None]
    elif damage == "object_labels":
        labels = labels.astype(object)
    else:
        labels = labels[:, None]
    np.save(folder / "query.npy", vectors)
    np.save(folder / "query_labels.npy", labels, allow_pickle=True)
    again = config.model_copy(deep=True)
    again.evaluate.output_dir = str(tmp_path / "out")
    with pytest.raises(DMLError, match=problem) as caught:
        run_evaluate(again, embeddings_dir=str(folder))
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


def test_leave_one_out_with_capped_verification(workspace, first_run, caplog):
    config, result, _ = first_run
    loo = config.model_copy(deep=True)
    loo.evaluate.gallery_split = None
    loo.evaluate.max_verification_samples = 8
    loo.evaluate.index = "ivfpq"  # far too few embeddings to train: searched exactly, with a note
    loo.evaluate.output_dir = str(workspace["root"] / "eval-loo")
    with caplog.at_level(logging.INFO, logger="dml.eval"):
        out = run_evaluate(loo, embeddings_dir=result.embeddings_dir)
    report = json.loads(Path(out.report_path).read_text())
    query = saved(result, "query")
    direct = retrieval_metrics(query.vectors, query.labels, ks=KS)
    direct["global_average_precision"] = nearest_neighbour_gap(query.vectors, query.labels, None, None)
    assert {k: v for k, v in report["retrieval"].items() if k != "recall_curve"} == pytest.approx(direct, abs=1e-12)
    assert report["identification"] is None and "cmc_rank_1" not in report["headline"]
    rows = np.sort(np.random.default_rng(0).choice(len(query.keys), 8, replace=False))
    capped = verification_metrics(query.vectors[rows], query.labels[rows], fars=FARS)
    verification = report["verification"]
    assert verification["num_samples"] == 8
    assert verification["num_positive_pairs"] + verification["num_negative_pairs"] == 28
    assert verification["roc_auc"] == pytest.approx(capped["roc_auc"], abs=1e-12)
    assert any("verification uses 8 of 15" in r.getMessage() for r in caplog.records)
    assert any("verification uses 8 of 15" in note for note in report["notes"])
    assert any("index=ivfpq needs" in note and "flat" in note for note in report["notes"])


def test_reranking_is_reported_beside_the_plain_search(workspace, first_run):
    config, result, report = first_run
    rerank = config.model_copy(deep=True)
    rerank.evaluate.reranking = RerankingConfig(methods=("dba", "alpha_qe"), dba={"k": 2}, alpha_qe={"k": 2})
    rerank.evaluate.output_dir = str(workspace["root"] / "eval-rerank")
    rerank.evaluate.plots = False
    out = run_evaluate(rerank, embeddings_dir=result.embeddings_dir)
    reranked = json.loads(Path(out.report_path).read_text())
    assert reranked["retrieval"] == report["retrieval"]  # the plain numbers stay as they were
    assert list(reranked["reranking"]) == ["dba", "alpha_qe", "dba+alpha_qe"]
    query, gallery = saved(result, "query"), saved(result, "gallery")
    expanded = alpha_query_expansion(query.vectors, database_side_augmentation(gallery.vectors, 2, 3.0), 2, 3.0)
    direct = retrieval_metrics(
        expanded, query.labels, database_side_augmentation(gallery.vectors, 2, 3.0), gallery.labels, ks=KS
    )
    assert reranked["reranking"]["dba+alpha_qe"]["map_at_r"] == pytest.approx(direct["map_at_r"], abs=1e-12)
    assert reranked["headline"]["map_at_r_dba+alpha_qe"] == pytest.approx(direct["map_at_r"], abs=1e-12)
    assert "MAP@R after dba+alpha_qe" in Path(out.markdown_path).read_text()


def _pairs_lines(workspace, query_keys: list[str]) -> tuple[list[str], list[tuple[int, int, bool]]]:
    """LFW-style lines over query images (file 'class_c/img_00i.png' is image i of class_c)."""
    meta = read_sample_metadata(workspace["shards"], ["query"])
    named = [
        (meta[k]["label"], int(Path(meta[k]["source"]).stem.split("_")[1]), row) for row, k in enumerate(query_keys)
    ]
    by_class: dict[str, list[tuple[int, int]]] = {}
    for label, number, row in named:
        by_class.setdefault(label, []).append((number, row))
    lines, expected = ["2 3"], []
    labels = sorted(by_class)
    for a, b in zip(labels, labels[1:] + labels[:1], strict=True):
        (n1, r1), (n2, r2) = by_class[a][0], by_class[a][1]
        lines.append(f"{a} {n1} {n2}")
        expected.append((r1, r2, True))
        (m, s) = by_class[b][2]
        lines.append(f"{a} {n1} {b} {m}")
        expected.append((r1, s, False))
    return lines, expected


def test_pairs_file_protocol(workspace, first_run):
    config, result, _ = first_run
    query = saved(result, "query")
    lines, expected = _pairs_lines(workspace, query.keys)
    pairs_file = workspace["root"] / "pairs.txt"
    pairs_file.write_text("\n".join(lines) + "\n")
    with_pairs = config.model_copy(deep=True)
    with_pairs.evaluate.pairs_file = str(pairs_file)
    with_pairs.evaluate.output_dir = str(workspace["root"] / "eval-pairs")
    with_pairs.evaluate.plots = False
    out = run_evaluate(with_pairs, embeddings_dir=result.embeddings_dir)
    verification = json.loads(Path(out.report_path).read_text())["verification"]
    rows = np.array([(a, b) for a, b, _ in expected])
    is_same = np.array([s for _, _, s in expected])
    direct = verification_metrics(query.vectors, pairs=rows, is_same=is_same, fars=FARS)
    assert verification["source"].startswith("pairs file")
    assert (verification["num_positive_pairs"], verification["num_negative_pairs"]) == (CLASSES, CLASSES)
    assert verification["roc_auc"] == pytest.approx(direct["roc_auc"], abs=1e-12)
    assert verification["eer"] == pytest.approx(direct["eer"], abs=1e-12)
    pairs_file.write_text("class_0 1 999\n")
    with pytest.raises(DMLError, match=r"pairs file .*\('class_0', 999\).* no embedding"):
        run_evaluate(with_pairs, embeddings_dir=result.embeddings_dir)


def _one_line_error(config: DMLConfig, match: str, **kwargs) -> None:
    with pytest.raises(DMLError, match=match) as caught:
        run_evaluate(config, **kwargs)
    assert "\n" not in str(caught.value)


def test_bad_input_is_a_one_line_error(workspace, first_run):
    config, result, _ = first_run
    missing_model = config.model_copy(deep=True)
    missing_model.evaluate.model_path = str(workspace["root"] / "nothing" / "model.pt")
    _one_line_error(missing_model, r"no trained model at .*nothing/model.pt")
    missing_split = config.model_copy(deep=True)
    missing_split.evaluate.gallery_split = "galery"
    _one_line_error(missing_split, r"gallery split 'galery' not in the shards \(has: gallery, query, train\)")
    # a manifest whose split lists no samples
    empty_dir = workspace["root"] / "empty-split"
    empty_dir.mkdir(exist_ok=True)
    manifest = json.loads((workspace["shards"] / "manifest.json").read_text())
    manifest["splits"]["query"] = {"count": 0, "class_counts": {}, "shards": [], "num_classes": 0}
    (empty_dir / "manifest.json").write_text(json.dumps(manifest))
    empty = config.model_copy(deep=True)
    empty.data.shard_dir = str(empty_dir)
    _one_line_error(empty, r"query split 'query' has 0 samples")
    no_shards = config.model_copy(deep=True)
    no_shards.data.shard_dir = str(workspace["root"] / "no-shards")
    _one_line_error(no_shards, r"no manifest.json in")
    _one_line_error(config, r"embeddings directory not found", embeddings_dir=workspace["root"] / "nope")
    partial = workspace["root"] / "partial-embeddings"
    shutil.copytree(result.embeddings_dir, partial, dirs_exist_ok=True)
    (partial / "gallery.npy").unlink()
    _one_line_error(config, r"no saved embeddings for split 'gallery' .*missing gallery.npy", embeddings_dir=partial)


def two_rank_evaluate(info, config_json: str) -> dict:
    result = run_evaluate(DMLConfig.model_validate_json(config_json))
    return {"metrics": result.metrics, "embeddings_dir": result.embeddings_dir}


@pytest.mark.dist
def test_two_ranks_give_the_single_process_result(workspace, first_run):
    config, result, _ = first_run
    dist_config = config.model_copy(deep=True)
    dist_config.evaluate.output_dir = str(workspace["root"] / "eval-2ranks")
    dist_config.evaluate.plots = False
    rank0, rank1 = spawn_local_group(two_rank_evaluate, 2, args=(dist_config.model_dump_json(),))
    assert rank1["metrics"] == {}
    assert rank0["metrics"] == pytest.approx(result.metrics, abs=1e-5)
    for split in ("query", "gallery"):
        mine, single = Embeddings.load(Path(rank0["embeddings_dir"]), split), saved(result, split)
        assert mine.keys == single.keys
        np.testing.assert_allclose(mine.vectors, single.vectors, atol=1e-5)


@pytest.mark.parametrize("plots, leave_one_out", [(False, False), (True, False), (True, True)])
def test_saved_embeddings_with_string_labels_give_a_report(workspace, first_run, tmp_path, plots, leave_one_out):
    """String labels are accepted by the loader; the per-class table then crashed on int(label)
    after the metrics were computed, and no report was written."""
    config, result, report = first_run
    folder = tmp_path / "embeddings"
    shutil.copytree(result.embeddings_dir, folder)
    for labels_file in folder.glob("*_labels.npy"):
        np.save(labels_file, np.array([f"c{label}" for label in np.load(labels_file)]))
    again = config.model_copy(deep=True)
    again.evaluate.output_dir = str(tmp_path / "out")
    again.evaluate.plots = plots
    if leave_one_out:
        again.evaluate.gallery_split = None
    second = run_evaluate(again, embeddings_dir=str(folder))
    written = json.loads(Path(second.report_path).read_text())
    if not leave_one_out:
        assert written["retrieval"] == report["retrieval"]  # same grouping, other names
    rows = list(csv.DictReader((Path(second.output_dir) / "per_class.csv").open()))
    assert rows and all(row["class_name"].startswith("c") for row in rows)
