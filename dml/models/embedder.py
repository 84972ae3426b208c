"""The embedding model: timm backbone + embedding neck, and its factory.

``build_embedding_model("resnet50", 512, "gem")`` gives a module mapping images
(N, C, H, W) to L2-normalised float embeddings (N, 512), carrying the ``preprocessing`` its
inputs need. In eval mode the forward pass has no data-dependent control flow, so it traces
and exports to ONNX with a dynamic batch dimension.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from dml.models.backbone import backbone_out_channels, create_backbone
from dml.models.erasing import BatchFeatureErasing
from dml.models.neck import EmbeddingNeck
from dml.models.preprocessing import Preprocessing, resolve_preprocessing
from dml.models.tokens import backbone_layout, class_token_count
from dml.models.weights import load_backbone_weights, load_matching_state_dict, read_state_dict

log = logging.getLogger(__name__)

MODEL_KEY_PREFIXES = ("backbone.", "neck.")


class EmbeddingModel(nn.Module):
    """Backbone feature map -> neck -> L2-normalised embedding.

    Attributes:
        backbone: timm module returning a feature map or tokens (see `dml.models.tokens`).
        neck: ``EmbeddingNeck`` pooling and projecting it.
        embedding_dim: size D of the output embedding.
        preprocessing: ``Preprocessing`` the inputs are expected to have had.
        backbone_name: timm name the backbone was built from (for model cards).
    """

    def __init__(
        self, backbone: nn.Module, neck: EmbeddingNeck, preprocessing: Preprocessing, backbone_name: str = ""
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.preprocessing = preprocessing
        self.backbone_name = backbone_name
        self.embedding_dim = neck.embedding_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) float -> embeddings (N, embedding_dim) with unit L2 norm.

        Raises ValueError for images of another shape (checked outside jit tracing).
        """
        channels = self.preprocessing.input_size[0]
        # Skipped under jit tracing (ONNX export), where shape entries are traced values.
        if not torch.jit.is_tracing() and (images.dim() != 4 or images.shape[1] != channels):
            raise ValueError(f"expected images of shape (N, {channels}, H, W), got {tuple(images.shape)}")
        return self.neck(self.backbone(images))


def build_embedding_model(
    backbone: str,
    embedding_dim: int = 512,
    pooling: str = "gem",
    in_chans: int = 3,
    pretrained_path: str | os.PathLike | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
    gem_p: float = 3.0,
    gem_learnable: bool = True,
    feature_bn: bool = False,
    dropout: float = 0.0,
    embedding_bn: bool = True,
    bfe: bool = False,
    bfe_height_ratio: float = 0.3,
    bfe_width_ratio: float = 1.0,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> EmbeddingModel:
    """Build an ``EmbeddingModel`` from a timm backbone name; never downloads weights.

    Args:
        backbone: timm model name, e.g. ``"resnet50"``, ``"efficientnet_b0"``,
            ``"mobilenetv3_large_100"``; built with ``pretrained=False``.
        embedding_dim: output size D.
        pooling: ``"avg"``, ``"max"``, ``"gem"`` (Radenovic et al.), ``"cls"`` (class token
            of a ViT-family backbone; the others then pool its patch tokens) or a ``+``-joined
            combination such as ``"avg+max+gem"`` (Jun et al. CGD; see ``dml.models.neck``).
        in_chans: 1 or 3 input channels.
        pretrained_path: optional local weights file (.pt/.pth/.bin/.ckpt state_dict or
            .safetensors). Keys all prefixed ``backbone.`` / ``neck.`` are read as a whole
            ``EmbeddingModel`` state_dict; anything else as timm backbone weights (classifier
            keys ignored, first conv adapted to ``in_chans``). Mismatches raise ValueError.
        input_size: spatial size recorded in ``preprocessing`` (int, (H, W) or (C, H, W));
            default: the timm pretrained config's size. Size-bound backbones (ViT family,
            CoAtNet, MaxViT, Swin) are built for it; the model accepts any size the backbone
            can handle (ViTs: any multiple of the patch size).
        gem_p, gem_learnable: GeM's initial exponent and whether it is trained.
        feature_bn, dropout, embedding_bn: neck options (BatchNorm1d on the pooled features,
            dropout before the projection, BatchNorm1d on the embedding).
        bfe, bfe_height_ratio, bfe_width_ratio: Batch Feature Erasing (Dai et al. 2019) on the
            feature map in training mode.
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. ``drop_path_rate``).
    """
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    trunk = create_backbone(
        backbone, in_chans=in_chans, timm_kwargs=backbone_kwargs, image_size=_spatial_size(input_size)
    )
    layout = backbone_layout(trunk)
    neck = EmbeddingNeck(
        in_channels=backbone_out_channels(trunk),
        embedding_dim=embedding_dim,
        pooling=pooling,
        feature_bn=feature_bn,
        dropout=dropout,
        embedding_bn=embedding_bn,
        erasing=BatchFeatureErasing(bfe_height_ratio, bfe_width_ratio) if bfe else None,
        gem_p=gem_p,
        gem_learnable=gem_learnable,
        layout=layout,
        prefix_tokens=int(getattr(trunk, "num_prefix_tokens", 0)) if layout == "tokens" else 0,
        has_class_token=bool(class_token_count(trunk)),
    )
    preprocessing = resolve_preprocessing(trunk, in_chans, input_size)
    model = EmbeddingModel(trunk, neck, preprocessing, backbone_name=backbone)
    if pretrained_path is not None:
        load_weights_file(model, pretrained_path)
    return model


def _spatial_size(input_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """(H, W) of an ``input_size`` given as int, (H, W) or (C, H, W); None stays None."""
    if input_size is None:
        return None
    if isinstance(input_size, int):
        return (input_size, input_size)
    return cast(tuple[int, int], tuple(int(v) for v in input_size)[-2:])


def load_weights_file(model: EmbeddingModel, path: str | os.PathLike) -> None:
    """Load a local weights file into ``model`` (whole-model or backbone-only; see the factory)."""
    state = read_state_dict(path)
    source = os.fspath(path)
    if state and all(key.startswith(MODEL_KEY_PREFIXES) for key in state):
        load_matching_state_dict(model, state, source, f"an EmbeddingModel({model.backbone_name})")
        log.info("loaded embedding-model weights from %s", source)
    else:
        load_backbone_weights(model.backbone, state, source)
        log.info("loaded %s backbone weights from %s", model.backbone_name, source)


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Facts about an ``EmbeddingModel`` (or a DDP wrapper of one) for model cards and logs.

    Returns a JSON-ready dict: backbone, pooling, embedding_dim, num_parameters,
    num_trainable_parameters, backbone_parameters, neck_parameters, preprocessing.

    Raises ValueError for a model that is not an ``EmbeddingModel``.
    """
    inner = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if not isinstance(inner, EmbeddingModel):
        raise ValueError(f"model_summary expects an EmbeddingModel, got {type(inner).__name__}")
    return {
        "backbone": inner.backbone_name,
        "pooling": inner.neck.pooling,
        "embedding_dim": inner.embedding_dim,
        "num_parameters": _count(inner.parameters()),
        "num_trainable_parameters": _count(p for p in inner.parameters() if p.requires_grad),
        "backbone_parameters": _count(inner.backbone.parameters()),
        "neck_parameters": _count(inner.neck.parameters()),
        "preprocessing": inner.preprocessing.to_dict(),
    }


def _count(parameters) -> int:
    return int(sum(p.numel() for p in parameters))
