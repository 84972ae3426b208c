"""ViT-family and hybrid backbones: the neck pools tokens (class token, mean / GeM over patch
tokens), any input size the backbone allows, weights from a local file at another size."""

from __future__ import annotations

import pytest
import torch

from dml.config import DMLConfig
from dml.models import build_embedding_model
from dml.models.pooling import GeM
from dml.models.tokens import backbone_layout, build_descriptor_pool

SMALL_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}
# (timm name, what it stands for, kwargs shrinking it, build size, another size it accepts)
BACKBONES = [
    ("deit_tiny_patch16_224", "ViT / DeiT", SMALL_VIT, 32, (48, 64)),
    ("vit_small_patch14_reg4_dinov2", "DINOv2 architecture (4 register tokens)", SMALL_VIT, 28, (42, 28)),
    ("vit_base_patch32_clip_224", "CLIP architecture (pre-norm, quick GELU)", SMALL_VIT, 64, (96, 32)),
    ("test_maxvit", "MaxViT hybrid (NCHW map)", {}, 64, (128, 128)),
]
POOLINGS = ["cls", "gem", "cls+avg+gem", "avg"]


@pytest.mark.parametrize("name, what, kwargs, size, other", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_backbone_trains_through_the_neck_at_its_sizes(name, what, kwargs, size, other):
    torch.manual_seed(0)
    pooling = POOLINGS[[b[0] for b in BACKBONES].index(name)]
    model = build_embedding_model(name, 12, pooling, input_size=size, backbone_kwargs=kwargs)
    embeddings = model(torch.randn(3, 3, size, size))
    assert embeddings.shape == (3, 12)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    embeddings[:, 0].sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    if other is not None:
        model.eval()
        assert model(torch.randn(2, 3, *other)).shape == (2, 12)


def test_token_pools_read_the_class_token_and_only_the_patch_tokens():
    tokens = torch.randn(4, 2 + 9, 6)  # 2 prefix tokens (class + register), 9 patches
    as_map = tokens.transpose(1, 2).unsqueeze(3)
    cls = build_descriptor_pool("cls", "tokens", prefix_tokens=2, has_class_token=True)
    mean = build_descriptor_pool("avg", "tokens", prefix_tokens=2)
    gem = build_descriptor_pool("gem", "tokens", prefix_tokens=2, gem_p=3.0)
    assert torch.equal(cls(as_map), tokens[:, 0])
    assert torch.allclose(mean(as_map), tokens[:, 2:].mean(dim=1))
    patches = tokens[:, 2:].clamp_min(1e-6)
    assert torch.allclose(gem(as_map), patches.pow(3).mean(dim=1).pow(1 / 3), atol=1e-6)
    assert torch.allclose(gem(as_map), GeM(3.0)(tokens[:, 2:].transpose(1, 2).unsqueeze(3)))


def test_real_vit_prefix_tokens_are_left_out_of_patch_pooling():
    model = build_embedding_model("vit_small_patch14_reg4_dinov2", 8, "avg", input_size=28, backbone_kwargs=SMALL_VIT)
    assert model.neck.branches[0].pool.prefix == 5 == model.backbone.num_prefix_tokens
    tokens = model.backbone(torch.randn(2, 3, 28, 28))
    assert tokens.shape == (2, 5 + 4, 32)
    pooled = model.neck.branches[0].pool(model.neck.to_map(tokens))
    assert torch.allclose(pooled, tokens[:, 5:].mean(dim=1))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: build_embedding_model("resnet18", 8, "cls"), "pooling 'cls' needs a backbone with a class token"),
        (
            lambda: build_embedding_model(
                "deit_tiny_patch16_224", 8, "cls", input_size=32, backbone_kwargs={**SMALL_VIT, "class_token": False}
            ),
            "got a ViT built without a class token",
        ),
        (
            lambda: build_embedding_model(
                "deit_tiny_patch16_224", 8, "gem", input_size=32, bfe=True, backbone_kwargs=SMALL_VIT
            ),
            "bfe\\) needs a feature-map backbone",
        ),
    ],
)
def test_token_options_that_cannot_work_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_layouts_of_real_backbones():
    assert backbone_layout(build_embedding_model("test_vit", 8, "avg", input_size=32).backbone) == "tokens"
    assert backbone_layout(build_embedding_model("test_coatnet", 8, "avg", input_size=64).backbone) == "nchw"
    assert DMLConfig.model_validate({"model": {"backbone": "vit_small_patch14_dinov2", "pooling": "cls+gem"}})


def test_local_vit_weights_load_at_another_image_size(tmp_path):
    """timm's own checkpoint filter resamples the position embeddings (14x14 grid -> 3x3)."""
    source = build_embedding_model("deit_tiny_patch16_224", 8, "cls", input_size=224, backbone_kwargs=SMALL_VIT)
    torch.save(source.backbone.state_dict(), tmp_path / "vit.pth")
    target = build_embedding_model(
        "deit_tiny_patch16_224",
        8,
        "cls",
        input_size=48,
        backbone_kwargs=SMALL_VIT,
        pretrained_path=tmp_path / "vit.pth",
    )
    assert target.backbone.pos_embed.shape == (1, 1 + 9, 32)
    assert torch.equal(target.backbone.cls_token, source.backbone.cls_token)
    assert torch.equal(target.backbone.blocks[0].attn.qkv.weight, source.backbone.blocks[0].attn.qkv.weight)
