"""Loading model weights from a local file (never from a hub).

Accepted files: a ``state_dict`` saved with ``torch.save`` (``.pt``, ``.pth``, ``.bin``,
``.ckpt``; read with ``weights_only=True``), optionally wrapped in a checkpoint dict under
``"state_dict"``, ``"model"`` or ``"model_state_dict"``; or a ``.safetensors`` file when the
``safetensors`` package is installed. ``module.`` (DDP) and ``_orig_mod.`` (torch.compile)
key prefixes are stripped.

Matching is strict: any missing, unexpected or wrongly shaped key raises one ``ValueError``
line that gives their counts and a few examples.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
from timm.models import adapt_input_conv
from torch import nn

from dml.models.backbone import classifier_names, first_conv_names
from dml.models.tokens import backbone_layout

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
EXAMPLES_SHOWN = 3


class WeightsFileNotFoundError(FileNotFoundError, ValueError):
    """The named weights file does not exist (a ValueError too, like all bad input here)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` mapping from a local weights file onto the CPU.

    Raises WeightsFileNotFoundError for a missing file, ValueError for one that cannot be read as weights.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightsFileNotFoundError(f"weights file not found: {file}")
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        loaded = _read_safetensors(file)
    elif suffix in TORCH_SUFFIXES:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle / zip errors have long multi-line messages
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"could not read weights file {file}: {first_line}") from error
    else:
        raise ValueError(f"unsupported weights file {file}: expected one of {', '.join(TORCH_SUFFIXES)}, .safetensors")
    return _flatten_state_dict(loaded, file)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise ValueError(f"reading {file} needs the safetensors package, which is not installed") from error
    try:
        return load_file(str(file), device="cpu")
    except Exception as error:
        raise ValueError(f"could not read safetensors file {file}: {error}") from error


def _flatten_state_dict(loaded: object, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict):
        for key in WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"weights file {file} does not hold a state_dict of tensors")
    state = {}
    for key, tensor in loaded.items():
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = tensor
    return state


def load_matching_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str, target: str) -> None:
    """Load ``state`` into ``module`` strictly, or raise one ValueError line that counts the mismatches."""
    expected = module.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself; older checkpoints lack it.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"weights in {source} do not match {target}: "
            f"{len(missing)} missing keys{_examples(missing)}, "
            f"{len(unexpected)} unexpected keys{_examples(unexpected)}, "
            f"{len(wrong_shape)} keys with a different shape{_examples(wrong_shape)}"
        )
    module.load_state_dict(state, strict=True)


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load timm-style backbone weights, e.g. an offline copy of a timm pretrained checkpoint.

    Classifier weights (timm's ``pretrained_cfg["classifier"]``) are dropped, since the backbone
    has no classifier. If the backbone has 1 input channel and the file's first conv has 3 (or
    the reverse), that conv is adapted with timm's ``adapt_input_conv`` (channel sum / repeat).
    ViT-family files first pass through the model module's own timm ``checkpoint_filter_fn``,
    which resamples position embeddings to this backbone's image size (a 518 px DINOv2 file
    into a 224 px model) and converts the original DINOv2 / CLIP / EVA layouts.
    """
    state = dict(state)
    if backbone_layout(backbone) == "tokens":
        convert = getattr(importlib.import_module(type(backbone).__module__), "checkpoint_filter_fn", None)
        if convert is not None:
            state = dict(convert(state, backbone))
    head_prefixes = tuple(f"{name}." for name in classifier_names(backbone))
    expected = backbone.state_dict()
    dropped = [k for k in state if head_prefixes and k.startswith(head_prefixes) and k not in expected]
    for key in dropped:
        del state[key]
    if dropped:
        log.info("ignored %d classifier keys in %s", len(dropped), source)
    for conv_name in first_conv_names(backbone):
        key = f"{conv_name}.weight"
        if key in state and key in expected and state[key].shape != expected[key].shape:
            wanted, found = expected[key].shape, state[key].shape
            if wanted[0] == found[0] and wanted[2:] == found[2:]:
                state[key] = adapt_input_conv(wanted[1], state[key], base_chans=found[1])
                log.info("adapted %s from %d to %d input channels", key, found[1], wanted[1])
    load_matching_state_dict(backbone, state, source, "the backbone")


def _examples(keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:EXAMPLES_SHOWN])
    more = ", ..." if len(keys) > EXAMPLES_SHOWN else ""
    return f" ({shown}{more})"
