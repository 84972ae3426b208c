"""timm backbones used as feature-map extractors.

A backbone is any timm model created with ``pretrained=False`` (this package never downloads
weights), ``num_classes=0`` and ``global_pool=""``: its ``forward`` then returns the unpooled
feature map (N, C, H, W) and the embedding neck does the pooling. For ResNet, EfficientNet,
DenseNet, Inception-v3 and MobileNetV2 the map is the last stage's output. For MobileNetV3 / V4,
timm's ``conv_head`` (a 1x1 conv + activation normally run after pooling) is kept and applied
per position, so every backbone parameter takes part in the loss (DDP needs that) and C is
``head_hidden_size``.

Backbones whose unpooled output is not NCHW (ViT-family tokens (N, T, C), Swin's NHWC map)
are brought to a map by the neck (`dml.models.tokens`). Models whose layers depend on the
input size (ViTs, CoAtNet, MaxViT, Swin) are built for the configured ``image_size`` (timm's
``img_size``); ViT-family models also get ``dynamic_img_size=True``, so they accept other
sizes too (position embeddings interpolated), as far as the patch size divides them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
from torch import nn

# Arguments this module sets itself; passing them through backbone_kwargs would break the
# "feature map, no downloads" contract.
RESERVED_TIMM_ARGS = frozenset({"pretrained", "num_classes", "global_pool", "in_chans", "features_only"})
SUPPORTED_IN_CHANS = (1, 3)


def create_backbone(
    name: str,
    in_chans: int = 3,
    timm_kwargs: Mapping[str, Any] | None = None,
    image_size: tuple[int, int] | None = None,
) -> nn.Module:
    """Create timm model ``name`` as a randomly initialised feature-map extractor.

    Args:
        name: a timm model name, optionally with a pretrained tag (``"resnet50.a1_in1k"``);
            the tag only selects the preprocessing config, weights are never fetched.
        in_chans: 1 (grey) or 3 (RGB) input channels, passed to timm as ``in_chans``.
        timm_kwargs: extra ``timm.create_model`` arguments such as ``drop_path_rate``.
        image_size: (H, W) the model is built for, passed as ``img_size`` (with
            ``dynamic_img_size=True``) to models that take it; ignored by the others.

    Returns the timm module; ``forward`` maps (N, in_chans, H, W) to (N, C, h, w), with
    C = ``backbone_out_channels(model)`` (or to tokens / NHWC, see `dml.models.tokens`).

    Raises ValueError for an unknown name, ``in_chans`` other than 1 or 3, or backbone_kwargs that set what dml
    fixes.
    """
    if in_chans not in SUPPORTED_IN_CHANS:
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r}; see timm.list_models() for valid names")
    extra = dict(timm_kwargs or {})
    clashing = sorted(RESERVED_TIMM_ARGS & extra.keys())
    if clashing:
        raise ValueError(f"backbone_kwargs may not set {', '.join(clashing)}; they are fixed by dml.models")
    sizing: dict[str, Any] = {} if image_size is None else {"dynamic_img_size": True, "img_size": tuple(image_size)}
    sizing = {k: v for k, v in sizing.items() if k not in extra}
    while True:
        try:
            return timm.create_model(
                name, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans, **sizing, **extra
            )
        except TypeError as exc:  # a constructor without this size argument (CNNs): drop it, retry
            refused = [key for key in sizing if f"'{key}'" in str(exc)]
            if not refused:
                raise
            sizing.pop(refused[0])


def backbone_out_channels(backbone: nn.Module) -> int:
    """Channels C of the unpooled feature map a timm backbone returns from ``forward``.

    timm's ``head_hidden_size`` covers models with a conv head after the last stage
    (MobileNetV3 / V4); otherwise ``num_features`` is the last stage's width.

    Raises ValueError for a module that reports no feature count (not a timm backbone).
    """
    channels = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)
    if not channels:
        raise ValueError(f"{type(backbone).__name__} does not report num_features; not a timm backbone?")
    return int(channels)


def first_conv_names(backbone: nn.Module) -> tuple[str, ...]:
    """Module names of the input convolution(s) from timm's pretrained_cfg (may be empty)."""
    return _as_names(getattr(backbone, "pretrained_cfg", {}).get("first_conv"))


def classifier_names(backbone: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s) from timm's pretrained_cfg (may be empty)."""
    return _as_names(getattr(backbone, "pretrained_cfg", {}).get("classifier"))


def _as_names(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)
