"""Typed configuration: pydantic v2 models, YAML loading and dotted `key=value` overrides.

Every stage reads its own section of one `DMLConfig`. Unknown keys are errors that name the
key and the closest valid spelling, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dml.errors import ConfigError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(StrictModel):
    """Where raw labelled images come from."""

    kind: Literal["auto", "folder", "csv", "parquet", "idx", "omniglot"] = "auto"
    path: str = FASHION_MNIST_DIR
    # Optional display names for integer labels (IDX / npz sources): index -> name.
    class_names: list[str] | None = None


class SplitConfig(StrictModel):
    """How samples are divided into train / query / gallery.

    - ``class``: zero-shot; ``train_fraction`` of the classes train, the rest are held out.
    - ``sample``: every class appears in train and held-out; ``train_fraction`` of each class's
      samples train.
    - ``source``: the source's own split column/file decides what trains ("train"); everything
      else is held out.
    Held-out samples are split per class into query and gallery by ``query_fraction``; with
    ``query_fraction = 1`` everything goes to ``query`` and evaluation is leave-one-out.
    """

    mode: Literal["class", "sample", "source"] = "class"
    train_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # Class mode only: name the training classes instead of drawing train_fraction of them.
    train_classes: list[str] | None = None
    query_fraction: float = Field(0.5, gt=0.0, le=1.0)
    seed: int = 0


class ShardConfig(StrictModel):
    """Shard size limits: a shard closes at whichever limit it reaches first."""

    max_samples: int = Field(5000, ge=1)
    # Estimated from the source sizes before encoding, so the plan is deterministic.
    max_bytes: int = Field(512 * 1024**2, ge=1024)


class ImageConfig(StrictModel):
    """Image encoding in the shards."""

    # Longest side allowed; larger images are downscaled and re-encoded. None keeps sizes.
    max_side: int | None = Field(None, ge=8)
    # Encoding for images that must be re-encoded (arrays, PGM/BMP/..., or oversize).
    reencode_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)


class PrepareConfig(StrictModel):
    """`dml prepare`: raw images -> WebDataset shards + manifest.json."""

    source: SourceConfig = SourceConfig()
    split: SplitConfig = SplitConfig()
    shards: ShardConfig = ShardConfig()
    image: ImageConfig = ImageConfig()
    output_dir: str = "runs/shards"
    workers: int = Field(1, ge=1)
    # Optional cap for quick runs: keep at most this many samples per class (None = all).
    max_per_class: int | None = Field(None, ge=1)


class AugmentConfig(StrictModel):
    """Training-time augmentation applied after decoding (grey and RGB alike)."""

    horizontal_flip: bool = True
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.7, 1.0)
    rotation_degrees: float = Field(0.0, ge=0.0, le=180.0)
    color_jitter: float = Field(0.0, ge=0.0, le=1.0)


class DataConfig(StrictModel):
    """Reading shards for training and evaluation (`dml.data.loader`)."""

    shard_dir: str = "runs/shards"
    train_split: str = "train"
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(1, ge=0)
    shuffle_buffer: int = Field(2000, ge=0)
    image_size: int = Field(32, ge=8)
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    augment: AugmentConfig = AugmentConfig()
    # P x K sampling for pair losses: P classes with K samples each per rank and batch.
    pk_classes: int | None = Field(None, ge=2)
    pk_samples: int = Field(4, ge=2)

    @model_validator(mode="after")
    def _mean_std_match_channels(self) -> "DataConfig":
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) not in (1, self.channels):
                raise ValueError(f"{name} has {len(value)} values; expected 1 or {self.channels}")
        return self


class DMLConfig(StrictModel):
    """The whole run: one section per stage."""

    seed: int = 0
    prepare: PrepareConfig = PrepareConfig()
    data: DataConfig = DataConfig()


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed value); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. data.batch_size=32)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every dotted override applied (nested dicts created)."""
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the nested model reached by ``loc`` (empty when it is not a model)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
        return f"unknown config key '{dotted}'{hint} (valid here: {', '.join(valid)})"
    return f"config key '{dotted}': {error['msg']} (got {error.get('input')!r})"


def validate_config(data: dict[str, Any], model: type[BaseModel] = DMLConfig) -> Any:
    """Validate a plain dict into ``model``; errors become one `ConfigError` naming the keys."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        messages = [_describe(e, model) for e in exc.errors()]
        raise ConfigError("; ".join(messages)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> DMLConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return validate_config(apply_overrides(data, overrides or []))


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML next to a stage's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
