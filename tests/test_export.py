"""Export: ONNX / TorchScript parity on real shard images, model card, failure hygiene, int8, latency."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_fixtures import make_folder_tree
from dml.config import DataConfig, DMLConfig
from dml.data.loader import EvalLoader
from dml.data.shards import write_shards
from dml.eval.metrics import retrieval_metrics
from dml.export import (
    CARD_NAME,
    ExportParityError,
    ModelCardError,
    collect_images,
    export_model,
    load_model_card,
    load_torchscript,
    onnx_cpu_latency,
    onnx_embeddings,
    open_onnx_session,
    validate_model_card,
    verify_card_files,
)
from dml.models import EmbeddingModel, build_embedding_model

SIZE = 32


def tiny_model(backbone: str = "resnet18", seed: int = 0) -> EmbeddingModel:
    torch.manual_seed(seed)
    return build_embedding_model(backbone, 64, "gem", in_chans=1, input_size=SIZE).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Normalised grey 32x32 images from a real shard set: query split (parity / eval), train (calibration)."""
    root = tmp_path_factory.mktemp("export_data")
    make_folder_tree(root / "src", classes=6, per_class=8, bad=False)
    prepare = DMLConfig.model_validate(
        {
            "prepare": {
                "source": {"path": str(root / "src")},
                "output_dir": str(root / "shards"),
                "split": {"mode": "sample", "train_fraction": 0.5, "query_fraction": 1.0},
                "shards": {"max_samples": 10},
            }
        }
    ).prepare
    write_shards(prepare)
    pre = tiny_model().preprocessing
    config = DataConfig(
        shard_dir=str(root / "shards"), image_size=SIZE, channels=1, num_workers=0, mean=pre.mean, std=pre.std
    )
    query, query_labels = collect_images(EvalLoader(config, "query", batch_size=8))
    train, _ = collect_images(EvalLoader(config, "train", batch_size=8))
    return {"query": query, "query_labels": query_labels, "train": train}


@pytest.fixture(scope="module")
def exported(images, tmp_path_factory):
    model = tiny_model()
    out = tmp_path_factory.mktemp("export") / "resnet18"
    result = export_model(
        model,
        out,
        images["query"],
        formats=("onnx", "torchscript"),
        opset=17,
        int8=True,
        calibration_images=images["train"],
        eval_images=images["query"],
        eval_labels=images["query_labels"],
        source={"teacher": "runs/teacher/best.pt"},
        metrics={"map_at_r": 0.5, "precision_at_1": 0.75},
    )
    return model, result


def test_onnx_and_torchscript_pass_parity_and_card_is_complete(exported, images):
    _, result = exported
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["model.int8.onnx", "model.onnx", "model.pt", CARD_NAME]
    card = load_model_card(result.card_path)  # validates every required field
    verify_card_files(card, result.out_dir)
    assert card == json.loads(result.card_path.read_text())
    n = images["query"].shape[0]
    for key in ("onnx", "torchscript"):
        entry = card["parity"][key]
        assert entry["passed"] and entry["num_images"] == n
        assert entry["min_cosine"] >= 0.9999 and entry["max_abs_diff"] < 1e-3
    assert card["model"]["backbone"] == "resnet18" and card["model"]["embedding_dim"] == 64
    assert card["model"]["num_parameters"] == sum(p.numel() for p in exported[0].parameters())
    assert card["input"] == {"name": "images", "dtype": "float32", "layout": "NCHW", "shape": ["batch", 1, SIZE, SIZE]}
    assert card["preprocessing"]["in_graph"] is False and card["preprocessing"]["channel_order"] == "grey (L)"
    assert card["preprocessing"]["mean"] == list(exported[0].preprocessing.mean)
    assert card["export"]["opset"] == 17 and card["source"] == {"teacher": "runs/teacher/best.pt"}
    assert card["metrics"]["map_at_r"] == 0.5 and card["versions"]["onnxruntime"]
    assert {f["format"] for f in card["files"]} == {"onnx", "torchscript", "onnx_int8"}


def test_dynamic_batch_in_both_runtimes(exported, images):
    model, result = exported
    session = open_onnx_session(result.files["onnx"])
    scripted = load_torchscript(result.files["torchscript"])
    for batch in (1, 5):
        x = images["query"][-batch:]  # not the tracing example's images
        with torch.no_grad():
            expected = model(x).numpy()
        ort_out = onnx_embeddings(session, x)
        assert ort_out.shape == (batch, 64)
        np.testing.assert_allclose(ort_out, expected, atol=1e-4)
        with torch.no_grad():
            np.testing.assert_allclose(scripted(x).numpy(), expected, atol=1e-5)


def test_int8_model_is_close_and_map_drop_recorded(exported, images):
    _, result = exported
    query, labels = images["query"], images["query_labels"]
    fp32 = onnx_embeddings(open_onnx_session(result.files["onnx"]), query)
    int8 = onnx_embeddings(open_onnx_session(result.files["onnx_int8"]), query)
    assert (fp32 * int8).sum(axis=1).min() > 0.9
    assert not np.array_equal(fp32, int8)  # it really is a different (quantized) model
    section = result.card["int8"]
    assert section["per_channel"] is True and section["num_calibration_images"] == images["train"].shape[0]
    expected_drop = retrieval_metrics(fp32, labels)["map_at_r"] - retrieval_metrics(int8, labels)["map_at_r"]
    assert section["retrieval"]["map_at_r_drop"] == pytest.approx(expected_drop, abs=1e-6)
    assert section["retrieval"]["num_queries"] == query.shape[0]
    assert section["parity"]["min_cosine"] == pytest.approx(float((fp32 * int8).sum(axis=1).min()), abs=1e-4)


class BranchOnBrightness(EmbeddingModel):
    """Python control flow on data: tracing freezes the branch its example batch took."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = super().forward(images)
        if float(images.mean()) > 0.0:
            return -embeddings
        return embeddings


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the warning is the point of the model
def test_export_whose_trace_differs_from_eager_fails_and_leaves_no_model(images, tmp_path):
    base = tiny_model()
    model = BranchOnBrightness(base.backbone, base.neck, base.preprocessing, "resnet18").eval()
    parity = images["query"][:8].clone()
    parity[:2] = parity[:2].abs() + 1.0  # the tracing example is bright: the trace keeps the flip
    parity[2:] = -parity[2:].abs() - 1.0  # the whole batch is dark: eager does not flip
    out = tmp_path / "broken"
    for formats in (("torchscript",), ("onnx",)):
        with pytest.raises(ExportParityError, match=rf"{formats[0]} export .*min cosine -(1\.0|0\.99)"):
            export_model(model, out, parity, formats=formats)
        assert list(out.iterdir()) == []  # no final names, no temporaries


def test_preprocessing_in_graph_takes_uint8_pixels(images, tmp_path):
    model = tiny_model("mobilenetv3_large_100", seed=1)
    result = export_model(
        model, tmp_path / "pixels", images["query"][:6], formats=("onnx",), preprocessing_in_graph=True
    )
    assert result.card["input"]["dtype"] == "uint8" and result.card["input"]["layout"] == "NHWC"
    assert result.parity["onnx"]["min_cosine"] >= 0.9999
    pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 1), dtype=np.uint8)
    got = open_onnx_session(result.files["onnx"]).run(None, {"images": pixels})[0]
    mean, std = model.preprocessing.mean[0], model.preprocessing.std[0]
    normalised = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        np.testing.assert_allclose(got, model(normalised).numpy(), atol=1e-4)


def test_latency_helper_returns_positive_medians(exported):
    latency = onnx_cpu_latency(exported[1].files["onnx"], batch_sizes=(1, 64), runs=3, warmup=1)
    assert set(latency) == {1, 64} and all(value > 0 for value in latency.values())


def test_card_validation_names_missing_fields(exported):
    card = json.loads(exported[1].card_path.read_text())
    validate_model_card(card)
    del card["preprocessing"]["std"]
    card["files"][0]["sha256"] = "abc"
    del card["parity"]["torchscript"]
    with pytest.raises(ModelCardError, match=r"missing preprocessing\.std.*sha256.*missing parity\.torchscript"):
        validate_model_card(card)


def test_tampered_file_fails_verification(exported, tmp_path):
    card = json.loads(exported[1].card_path.read_text())
    (tmp_path / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(ModelCardError, match=r"model\.onnx does not match the sha256"):
        verify_card_files(card, tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"opset": 13}, "opset must be"),
        ({"min_cosine": 1.5}, "min_cosine must be"),
        ({"formats": ("onnx", "tflite")}, "formats must be"),
        ({"int8": True}, "calibration_images"),
        ({"int8": True, "formats": ("torchscript",)}, "needs the 'onnx' format"),
        ({"int8_min_cosine": 2.0}, "int8_min_cosine must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(images, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_model(tiny_model(), tmp_path / "bad", images["query"][:4], **kwargs)
    assert not (tmp_path / "bad" / "model.onnx").exists()
