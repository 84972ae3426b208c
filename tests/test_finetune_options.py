"""Fine-tuning options of the backbone optimizer: layer-wise LR decay and the frozen warm-up."""

from __future__ import annotations

import re

import pytest
import torch

from dml.config import DMLConfig
from dml.errors import ConfigError
from dml.models import build_embedding_model
from dml.models.model_file import build_model
from dml.train.checkpoint import list_checkpoints
from dml.train.engine import DDPEngine
from dml.train.param_groups import backbone_param_groups, freeze_backbone
from dml.train.run import run_train, seed_everything
from train_fixtures import tiny_shards, tiny_train_config

VIT = {"backbone": "test_vit", "pooling": "cls+gem", "embedding_dim": 16}


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_layer_decay_gives_each_vit_block_its_lr(name):
    model = build_embedding_model("test_vit", 16, "cls+gem", input_size=32)
    config = DMLConfig.model_validate(
        {"optimizer": {"name": name, "lr": 0.1, "layer_decay": 0.5, "weight_decay": 0.01}}
    ).optimizer
    optimizer = torch.optim.SGD(backbone_param_groups(model, config))
    groups, depth = group_of(optimizer), len(model.backbone.blocks)
    assert len(groups) == sum(1 for _ in model.parameters())  # every parameter, once
    for param_name, param in model.named_parameters():
        group = groups[id(param)]
        block = re.match(r"backbone\.blocks\.(\d+)\.", param_name)
        if block:
            expected = 0.1 * 0.5 ** (depth - 1 - int(block.group(1)))
        elif param_name.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed")):
            expected = 0.1 * 0.5**depth
        else:  # the final norm and the neck learn at the full rate
            expected = 0.1
        assert group["lr"] == pytest.approx(expected), param_name
        if param_name.startswith("backbone."):
            no_decay = param.ndim == 1 or param_name.endswith(("cls_token", "pos_embed"))
            assert group["weight_decay"] == (0.0 if no_decay else 0.01), param_name


def test_without_layer_decay_one_group_at_the_configured_lr():
    model = build_embedding_model("resnet18", 8, "gem", input_size=32)
    groups = backbone_param_groups(model, DMLConfig().optimizer)
    assert len(groups) == 1 and groups[0]["lr"] == DMLConfig().optimizer.lr
    assert len(groups[0]["params"]) == sum(1 for _ in model.parameters())


def test_frozen_warm_up_keeps_the_backbone_and_its_optimizer_state_untouched():
    config = DMLConfig.model_validate(
        {
            "model": VIT,
            "data": {"image_size": 32},
            "optimizer": {"name": "adamw", "lr": 0.01, "freeze_backbone_steps": 2},
        }
    )
    torch.manual_seed(0)
    engine = DDPEngine(build_model(config), config, torch.device("cpu"))
    freeze = freeze_backbone(engine, config.optimizer)
    backbone, neck = engine.model.backbone, engine.model.neck
    initial = {k: v.clone() for k, v in backbone.state_dict().items()}
    for step in range(3):
        neck_before = [p.detach().clone() for p in neck.parameters()]
        engine.forward(torch.randn(4, 3, 32, 32)).pow(3).sum().backward()
        assert all(p.grad is not None for p in backbone.parameters())  # computed, then dropped
        frozen = freeze.frozen
        engine.step()
        engine.zero_grad()
        assert any(not torch.equal(a, b) for a, b in zip(neck_before, neck.parameters(), strict=True))
        unchanged = all(torch.equal(v, backbone.state_dict()[k]) for k, v in initial.items())
        state_of_backbone = [engine.optimizer.state.get(p) for p in backbone.parameters()]
        if step < 2:
            assert frozen and unchanged and not any(state_of_backbone), step
        else:
            assert not frozen and not unchanged and all(state_of_backbone)


def test_run_with_layer_decay_and_frozen_warm_up_from_config(tmp_path):
    shards = tiny_shards(tmp_path)
    config = DMLConfig.model_validate(
        tiny_train_config(
            shards,
            tmp_path / "run",
            model=VIT,
            optimizer={"layer_decay": 0.75, "freeze_backbone_steps": 2},
            loss={"sub_centers": 2},
            train={"checkpoint_every": 2, "keep_last": 5},
        )
    )
    run_train(config)
    seed_everything(config.seed)
    initial = build_model(config).backbone.state_dict()
    at_step_two = torch.load(list_checkpoints(tmp_path / "run")[0] / "state.pt", weights_only=False)["model"]
    assert list_checkpoints(tmp_path / "run")[0].name.endswith("00000002")
    for key, value in initial.items():
        assert torch.equal(at_step_two[f"backbone.{key}"], value), key
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["state_dict"]
    assert not torch.equal(final["backbone.blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])


def test_frozen_warm_up_is_refused_on_deepspeed():
    config = DMLConfig.model_validate({"optimizer": {"freeze_backbone_steps": 3}})

    class Engine:
        name = "deepspeed"

    with pytest.raises(ConfigError, match=r"not supported with train\.backend deepspeed"):
        freeze_backbone(Engine(), config.optimizer)
