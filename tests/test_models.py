"""Tests for dml.models: backbones, pooling, neck, BFE, weights files, preprocessing, ONNX export."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dml.data.transforms import RESIZE_INTERPOLATION
from dml.models import (
    BatchFeatureErasing,
    EmbeddingNeck,
    GeM,
    Preprocessing,
    WeightsFileNotFoundError,
    backbone_out_channels,
    build_embedding_model,
    build_global_pool,
    model_summary,
    parse_pooling,
    resolve_preprocessing,
    split_embedding_dim,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (timm name, smallest convenient square input, default input size, normalisation mean);
# Inception-v3 needs at least 75 px and was trained at 299 with mean 0.5.
BACKBONE_FAMILIES = [
    ("resnet18", 32, 224, IMAGENET_MEAN),
    ("resnet50", 32, 224, IMAGENET_MEAN),
    ("efficientnet_b0", 32, 224, IMAGENET_MEAN),
    ("densenet121", 32, 224, IMAGENET_MEAN),
    ("inception_v3", 75, 299, (0.5, 0.5, 0.5)),
    ("mobilenetv2_100", 32, 224, IMAGENET_MEAN),
    ("mobilenetv3_large_100", 32, 224, IMAGENET_MEAN),
    ("mobilenetv4_conv_small", 32, 224, IMAGENET_MEAN),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_unit_rows(embeddings: torch.Tensor) -> None:
    assert torch.isfinite(embeddings).all()
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(len(embeddings)), atol=1e-5)


@pytest.mark.parametrize(("name", "size", "default_size", "mean"), BACKBONE_FAMILIES)
def test_backbone_families_give_unit_embeddings(name: str, size: int, default_size: int, mean: tuple) -> None:
    model = build_embedding_model(name, embedding_dim=32, pooling="gem").eval()
    with torch.no_grad():
        feature_map = model.backbone(torch.randn(2, 3, size, size))
        embeddings = model(torch.randn(2, 3, size, size))
    assert feature_map.dim() == 4 and feature_map.shape[1] == backbone_out_channels(model.backbone)
    assert embeddings.shape == (2, 32) and embeddings.dtype == torch.float32
    assert model.embedding_dim == 32
    assert_unit_rows(embeddings)
    assert model.preprocessing.input_size == (3, default_size, default_size)
    assert model.preprocessing.mean == pytest.approx(mean)


def test_every_parameter_gets_a_gradient() -> None:
    # DDP fails on unused parameters; MobileNetV3's conv_head is the case that needs care.
    model = build_embedding_model("mobilenetv3_small_100", 16, "avg+max+gem", feature_bn=True).train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert without_grad == []


def test_simple_poolings_match_reductions() -> None:
    features = torch.randn(3, 5, 4, 6)
    assert torch.allclose(build_global_pool("avg")(features), features.mean(dim=(2, 3)))
    assert torch.equal(build_global_pool("max")(features), features.flatten(2).max(dim=2).values)


def test_gem_with_p_one_equals_average_and_large_p_approaches_max() -> None:
    features = torch.rand(3, 5, 4, 4) + 0.01
    assert torch.allclose(GeM(p=1.0)(features), features.mean(dim=(2, 3)), atol=1e-6)
    maximum = features.amax(dim=(2, 3))
    large_p = GeM(p=100.0)(features)
    # (mean x^p)^(1/p) lies in [max * (1/HW)^(1/p), max]; HW = 16 here.
    assert (large_p <= maximum + 1e-5).all() and (large_p >= maximum * 16 ** (-1 / 100) - 1e-5).all()
    three = GeM(p=3.0)(features)
    assert torch.allclose(three, features.pow(3).mean(dim=(2, 3)).pow(1 / 3), atol=1e-6)


def test_gem_exponent_is_learnable_or_fixed() -> None:
    learnable = GeM(p=3.0)
    learnable(torch.rand(2, 3, 4, 4)).sum().backward()
    assert isinstance(learnable.p, torch.nn.Parameter) and learnable.p.grad is not None
    assert learnable.p.grad.abs().item() > 0
    fixed = GeM(p=3.0, learnable=False)
    assert list(fixed.parameters()) == [] and "p" in dict(fixed.named_buffers())
    with pytest.raises(ValueError, match="positive"):
        GeM(p=0.0)


def test_parse_pooling_accepts_combinations_and_rejects_bad_specs() -> None:
    assert parse_pooling("gem") == ["gem"]
    assert parse_pooling("AVG + max+gem") == ["avg", "max", "gem"]
    for bad, message in [("avg+foo", "unknown pooling 'foo'"), ("gem+gem", "repeats"), ("", "non-empty")]:
        with pytest.raises(ValueError, match=message):
            parse_pooling(bad)


def test_single_pooling_neck_is_pool_project_normalise() -> None:
    neck = EmbeddingNeck(in_channels=8, embedding_dim=4, pooling="avg", embedding_bn=False).eval()
    features = torch.randn(3, 8, 5, 5)
    projection: Any = neck.branches[0].projection
    expected = F.normalize(projection(features.mean(dim=(2, 3))), dim=1)
    assert torch.allclose(neck(features), expected, atol=1e-6)


@pytest.mark.parametrize("pooling", ["avg", "max", "gem", "avg+max+gem", "gem+max"])
def test_neck_pooling_variants(pooling: str) -> None:
    neck = EmbeddingNeck(16, 10, pooling=pooling, feature_bn=True, dropout=0.2).train()
    features = torch.relu(torch.randn(4, 16, 3, 3))
    embeddings = neck(features)
    assert embeddings.shape == (4, 10)
    assert_unit_rows(embeddings)
    assert_unit_rows(neck.eval()(features))


def test_combined_descriptors_are_normalised_parts_concatenated() -> None:
    assert split_embedding_dim(512, 3) == [171, 171, 170]
    neck = EmbeddingNeck(16, 11, pooling="avg+max+gem", embedding_bn=False).eval()
    embeddings = neck(torch.relu(torch.randn(4, 16, 3, 3)))
    parts = torch.split(embeddings, [4, 4, 3], dim=1)
    # Each part has unit norm before the final normalisation, hence 1/sqrt(3) after it.
    for part in parts:
        assert torch.allclose(part.norm(dim=1), torch.full((4,), 3**-0.5), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be split"):
        EmbeddingNeck(16, 2, pooling="avg+max+gem")


def test_neck_rejects_wrong_feature_shape() -> None:
    neck = EmbeddingNeck(16, 8)
    with pytest.raises(ValueError, match=r"expects a feature map \(N, 16, H, W\)"):
        neck(torch.randn(2, 12, 3, 3))


def test_batch_feature_erasing_zeroes_one_shared_rectangle_in_train() -> None:
    erasing = BatchFeatureErasing(height_ratio=0.3, width_ratio=0.5).train()
    positions = set()
    for _ in range(20):
        out = erasing(torch.ones(3, 2, 10, 6))
        zero = out == 0
        assert torch.equal(zero, zero[:1, :1].expand_as(zero))  # same region for all images and channels
        rows, cols = zero[0, 0].nonzero(as_tuple=True)
        assert len(rows) == 3 * 3  # round(0.3 * 10) rows x round(0.5 * 6) columns
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (3, 3)
        assert torch.equal(out[~zero], torch.ones(int((~zero).sum())))
        positions.add((int(rows.min()), int(cols.min())))
    assert len(positions) > 1  # the rectangle moves between steps


def test_batch_feature_erasing_is_identity_in_eval() -> None:
    features = torch.randn(3, 2, 10, 6)
    assert torch.equal(BatchFeatureErasing(0.5, 1.0).eval()(features), features)
    torch.manual_seed(1)
    with_bfe = build_embedding_model("resnet10t", 16, bfe=True).eval()
    torch.manual_seed(1)
    without_bfe = build_embedding_model("resnet10t", 16, bfe=False).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(with_bfe(images), without_bfe(images))
    with pytest.raises(ValueError, match="height_ratio"):
        BatchFeatureErasing(height_ratio=0.0)


def test_single_channel_input() -> None:
    model = build_embedding_model("resnet10t", 16, in_chans=1).eval()
    backbone: Any = model.backbone
    assert backbone.conv1[0].in_channels == 1
    assert_unit_rows(model(torch.randn(2, 1, 32, 32)))
    assert model.preprocessing.input_size == (1, 176, 176)  # resnet10t's timm default size
    assert model.preprocessing.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    assert model.preprocessing.std == pytest.approx((sum(IMAGENET_STD) / 3,))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, H, W\)"):
        model(torch.randn(2, 3, 32, 32))


def test_preprocessing_comes_from_timm_config_and_can_be_overridden() -> None:
    # mean / std / size from timm; the resize filter is the pipeline's own (timm's pretrained
    # default for this backbone is bicubic, which no transform of the pipeline uses)
    model = build_embedding_model("mobilenetv3_small_100", 16, input_size=(112, 96))
    assert model.preprocessing == Preprocessing((3, 112, 96), IMAGENET_MEAN, IMAGENET_STD, RESIZE_INTERPOLATION)
    assert RESIZE_INTERPOLATION == "bilinear"
    backbone = model.backbone
    assert resolve_preprocessing(backbone, 3).input_size == (3, 224, 224)
    assert resolve_preprocessing(backbone, 3, input_size=64).input_size == (3, 64, 64)
    grey = resolve_preprocessing(backbone, 1, input_size=(1, 48, 48))
    assert json.loads(json.dumps(grey.to_dict())) == {
        "input_size": [1, 48, 48],
        "mean": [pytest.approx(sum(IMAGENET_MEAN) / 3)],
        "std": [pytest.approx(sum(IMAGENET_STD) / 3)],
        "interpolation": "bilinear",
    }
    with pytest.raises(ValueError, match="has 1 channels but in_chans is 3"):
        resolve_preprocessing(backbone, 3, input_size=(1, 64, 64))
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        Preprocessing((3, 8, 8), (0.5,), (0.5,))


def test_model_summary_counts_parameters() -> None:
    model = build_embedding_model("mobilenetv3_small_100", 24, "avg+gem")
    summary = model_summary(model)
    total = sum(p.numel() for p in model.parameters())
    assert summary["num_parameters"] == total == summary["backbone_parameters"] + summary["neck_parameters"]
    assert summary["num_trainable_parameters"] == total
    assert summary["embedding_dim"] == 24 and summary["backbone"] == "mobilenetv3_small_100"
    assert summary["pooling"] == "avg+gem"
    assert summary["preprocessing"]["input_size"] == [3, 224, 224]
    json.dumps(summary)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_round_trip(tmp_path, suffix: str) -> None:
    source = build_embedding_model("resnet10t", 16, "avg+gem").train()
    source(torch.randn(4, 3, 32, 32))  # move BatchNorm running stats away from their defaults
    source.eval()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(123)  # a different random init, so equality proves the file was loaded
    rebuilt = build_embedding_model("resnet10t", 16, "avg+gem", pretrained_path=path).eval()
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(rebuilt(images), source(images))


def test_backbone_only_weights_drop_classifier_and_adapt_first_conv(tmp_path) -> None:
    timm_style = build_embedding_model("resnet10t", 16).backbone.state_dict()
    timm_style["fc.weight"], timm_style["fc.bias"] = torch.randn(10, 512), torch.randn(10)
    path = tmp_path / "resnet10t_timm.pth"
    torch.save({"state_dict": timm_style}, path)
    rgb = build_embedding_model("resnet10t", 16, pretrained_path=path)
    rgb_backbone: Any = rgb.backbone
    assert torch.equal(rgb_backbone.layer4[0].conv2.weight, timm_style["layer4.0.conv2.weight"])
    grey = build_embedding_model("resnet10t", 16, in_chans=1, pretrained_path=path)
    # resnet10t's first conv (timm pretrained_cfg "first_conv") is conv1.0; RGB filters are summed.
    grey_backbone: Any = grey.backbone
    assert torch.allclose(grey_backbone.conv1[0].weight, timm_style["conv1.0.weight"].sum(dim=1, keepdim=True))


def test_mismatched_weights_report_counts(tmp_path) -> None:
    path = tmp_path / "resnet10t.pt"
    torch.save(build_embedding_model("resnet10t", 16).backbone.state_dict(), path)
    deeper_keys = set(build_embedding_model("resnet14t", 16).backbone.state_dict())
    file_keys = set(torch.load(path))
    missing = len({k for k in deeper_keys - file_keys if not k.endswith("num_batches_tracked")})
    with pytest.raises(ValueError, match=rf"do not match the backbone: {missing} missing keys") as info:
        build_embedding_model("resnet14t", 16, pretrained_path=path)
    assert missing > 0 and "0 unexpected keys" in str(info.value) and "\n" not in str(info.value)

    full = tmp_path / "full.pt"
    torch.save(build_embedding_model("resnet10t", 16).state_dict(), full)
    # A different embedding_dim changes the projection (weight, bias) and the embedding
    # BatchNorm (weight, bias, running_mean, running_var): 6 tensors.
    with pytest.raises(ValueError, match=r"0 missing keys, 0 unexpected keys, 6 keys with a different shape"):
        build_embedding_model("resnet10t", 32, pretrained_path=full)


def test_missing_weights_file_is_a_one_line_error(tmp_path) -> None:
    path = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(WeightsFileNotFoundError) as info:
        build_embedding_model("resnet10t", 16, pretrained_path=path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    assert str(info.value) == f"weights file not found: {path}"
    with pytest.raises(ValueError, match="unsupported weights file"):
        (tmp_path / "weights.txt").write_text("x")
        build_embedding_model("resnet10t", 16, pretrained_path=tmp_path / "weights.txt")


def test_bad_arguments_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet_does_not_exist'"):
        build_embedding_model("resnet_does_not_exist")
    with pytest.raises(ValueError, match="in_chans must be 1 or 3"):
        build_embedding_model("resnet18", in_chans=2)
    with pytest.raises(ValueError, match="may not set pretrained"):
        build_embedding_model("resnet18", backbone_kwargs={"pretrained": True})
    with pytest.raises(ValueError, match="embedding_dim must be a positive int"):
        build_embedding_model("resnet18", embedding_dim=0)


def test_onnx_export_matches_pytorch(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    model = build_embedding_model("mobilenetv3_small_100", 32, "avg+max+gem", feature_bn=True, bfe=True)
    model.train()
    model(torch.randn(4, 3, 64, 64))  # non-trivial BatchNorm statistics
    model.eval()
    path = tmp_path / "model.onnx"
    # The legacy (TorchScript) exporter: the dynamo exporter needs onnxscript, not installed here.
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 64, 64),),
        str(path),
        opset_version=17,
        input_names=["images"],
        output_names=["embeddings"],
        dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
        dynamo=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 64, 64)  # a batch size other than the traced one
    (exported,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images).numpy()
    assert exported.shape == (5, 32)
    assert abs(exported - expected).max() < 1e-4
