"""Typed configuration: pydantic v2 models, YAML loading and dotted `key=value` overrides.

Every stage reads its own section of one `DMLConfig`. Unknown keys are errors that name the
key and the closest valid spelling, so a typo never silently falls back to a default; so are
unknown names in name-valued keys (kinds, optimizers, poolings, timm backbones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dml.config_errors import describe_error
from dml.config_reranking import RerankingConfig
from dml.config_verification import VerificationSetConfig, check_best_metric, check_verification_sets
from dml.errors import ConfigError
from dml.names import check_backbone
from dml.registries import MARGINS, MINERS, PAIR_LOSSES, POOLINGS, SOURCES, RegisteredName, parse_pooling
from dml.value_rules import MARGIN_RANGES, check_combined_margins, check_fars, check_ks, check_margin

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(StrictModel):
    """Where raw labelled images come from."""

    # A registered source kind (`dml.registries.SOURCES`), or "auto" to guess it from the path.
    kind: Annotated[str, RegisteredName(SOURCES, extra=("auto",))] = "auto"
    path: str = FASHION_MNIST_DIR
    # Optional display names for integer labels (IDX / npz sources): index -> name.
    class_names: list[str] | None = None


class SplitConfig(StrictModel):
    """How samples are divided into train / query / gallery.

    - ``class``: zero-shot; ``train_fraction`` of the classes train, the rest are held out.
    - ``sample``: every class appears in train and held-out; ``train_fraction`` of each class's
      samples train.
    - ``source``: the source's own split column/file decides: ``train``, ``query`` and
      ``gallery`` are kept as given, ``test`` is held out (drawn into query/gallery below);
      a row with no or another value is rejected with its reason.
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


class AlignConfig(StrictModel):
    """Face alignment in `dml prepare` (`dml.data.face_align`; marks from the table's columns).

    ``landmarks``: warp the five landmarks onto the ArcFace template scaled to ``size``;
    ``box``: crop the box's square, widened by ``margin`` (fraction of its longer side, each
    side), resized to ``size``. Aligned crops are re-encoded (``image.reencode_format``).
    """

    mode: Literal["none", "box", "landmarks"] = "none"
    size: int = Field(112, ge=8)
    margin: float = Field(0.0, ge=0.0, le=2.0)


class ImageConfig(StrictModel):
    """Image encoding in the shards."""

    # Longest side allowed; larger images are downscaled and re-encoded. None keeps sizes.
    max_side: int | None = Field(None, ge=8)
    # Encoding for images that must be re-encoded (arrays, PGM/BMP/..., or oversize).
    reencode_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    align: AlignConfig = AlignConfig()


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
    # Evaluation and export: keep this central fraction of each side before resizing (None: all).
    center_crop: float | None = Field(None, gt=0.0, le=1.0)
    # P x K sampling for pair losses: P classes with K samples each per rank and batch.
    pk_classes: int | None = Field(None, ge=2)
    pk_samples: int = Field(4, ge=2)
    # A shard that ends early, a member that cannot be read or decoded, a sample missing a
    # part: "stop" with one line naming shard, key and reason, or "skip" it with a warning
    # and count it (metrics.jsonl, evaluation report). See `dml.data.reading`.
    bad_samples: Literal["stop", "skip"] = "stop"

    @model_validator(mode="after")
    def _mean_std_match_channels(self) -> DataConfig:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) not in (1, self.channels):
                raise ValueError(f"{name} has {len(value)} values; expected 1 or {self.channels}")
        return self


CHECK_BACKBONES = "check_backbones"  # validation-context key: False skips the timm name check


class ModelConfig(StrictModel):
    """The embedding model: a timm backbone and the embedding neck (`dml.models`)."""

    backbone: str = "resnet18"
    embedding_dim: int = Field(128, ge=2)
    # Registered poolings (`dml.registries.POOLINGS`), one or several joined by '+' (avg+max+gem).
    pooling: Annotated[str, RegisteredName(POOLINGS, check=parse_pooling)] = "gem"
    pretrained_path: str | None = None
    embedding_bn: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bfe: bool = False

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str, info: ValidationInfo) -> str:
        # Checking imports timm (and torch); a caller that builds no model may skip it.
        if (info.context or {}).get(CHECK_BACKBONES, True):
            check_backbone(value)
        return value


PER_CLASS_MARGIN_LOSSES = ("arcface", "cosface")


class DynamicMarginConfig(StrictModel):
    """Per-class margins from the training split's class counts (`dml.losses.dynamic_margins`):
    the most frequent class gets ``m_min``, the rarest ``m_max``, ``m ~ n ** -power`` between."""

    m_min: float = Field(0.05, ge=0.0)
    m_max: float = Field(0.5, ge=0.0)
    power: float = Field(0.25, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> DynamicMarginConfig:
        if self.m_min > self.m_max:
            raise ValueError(f"m_min ({self.m_min}) must be <= m_max ({self.m_max})")
        return self


class LossConfig(StrictModel):
    """The training objective: a margin head (partial FC) or a pair loss, plus centre loss.

    ``kind`` is a registered margin (`dml.registries.MARGINS`, trained through partial FC) or
    pair loss (`PAIR_LOSSES`); ``miner`` a registered miner (`MINERS`) for a pair loss that takes
    what it mines (pairs or triplets), or "none"; a triplet miner replaces ``mining``.
    """

    kind: Annotated[str, RegisteredName(MARGINS, PAIR_LOSSES)] = "arcface"
    scale: float = Field(30.0, gt=0.0)
    margin: float = 0.3
    combined_margins: tuple[float, float, float] = (1.0, 0.3, 0.2)
    sample_rate: float = Field(1.0, gt=0.0, le=1.0)
    head_optimizer: Literal["sgd", "adamw"] = "sgd"
    head_lr: float | None = None  # None: the backbone's lr
    triplet_margin: float = 0.1
    mining: Literal["all", "hard", "semihard", "easy", "batch_hard"] = "semihard"
    pos_margin: float = 0.0
    neg_margin: float = 0.5
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.5
    miner: Annotated[str, RegisteredName(MINERS, extra=("none",))] = "none"
    miner_epsilon: float = Field(0.1, ge=0.0)  # multisimilarity miner's slack on the similarity
    miner_cutoff: float = Field(0.5, ge=0.0)  # distance_weighted: distances clamped below at this
    miner_nonzero_cutoff: float = Field(1.4, gt=0.0)  # distance_weighted: farther negatives unused
    center_weight: float = Field(0.0, ge=0.0)
    sub_centers: int = Field(1, ge=1)  # centres per class of the margin head (sub-center ArcFace)
    dynamic_margin: DynamicMarginConfig | None = None  # per-class margins replacing `margin`

    @property
    def is_pair_loss(self) -> bool:
        """True for a pair loss (triplet, contrastive, multi-similarity), False for a margin head."""
        return self.kind in PAIR_LOSSES

    @model_validator(mode="after")
    def _miner_fits(self) -> LossConfig:
        if self.miner == "none":
            return self
        if not self.is_pair_loss:
            raise ValueError(
                f"loss.miner '{self.miner}' needs a pair loss, loss.kind is '{self.kind}' "
                f"(pair losses: {', '.join(PAIR_LOSSES.names())})"
            )
        yields, takes = MINERS.entry(self.miner).fits, PAIR_LOSSES.entry(self.kind).fits
        if yields != takes:
            fitting = [n for n in PAIR_LOSSES.names() if PAIR_LOSSES.entry(n).fits == yields]
            raise ValueError(
                f"loss.miner '{self.miner}' mines {yields} but loss.kind '{self.kind}' takes {takes} "
                f"(use it with: {', '.join(fitting)})"
            )
        if self.miner == "distance_weighted" and self.miner_cutoff >= self.miner_nonzero_cutoff:
            raise ValueError(
                f"loss.miner_cutoff ({self.miner_cutoff}) must be below loss.miner_nonzero_cutoff "
                f"({self.miner_nonzero_cutoff})"
            )
        return self

    @model_validator(mode="after")
    def _margin_head_options(self) -> LossConfig:
        if self.dynamic_margin is not None and self.kind not in PER_CLASS_MARGIN_LOSSES:
            raise ValueError(f"loss.dynamic_margin needs loss.kind arcface or cosface, got '{self.kind}'")
        if self.sub_centers > 1 and self.is_pair_loss:
            raise ValueError(f"loss.sub_centers needs a margin head, loss.kind is '{self.kind}'")
        return self

    @model_validator(mode="after")
    def _margins_in_range(self) -> LossConfig:
        # the margin classes' own rules (`dml.value_rules`), so training never refuses them later
        if self.is_pair_loss:
            return self
        rule = MARGINS.entry(self.kind).target.rpartition(":")[2]
        checks: list[tuple[str, Any, tuple[Any, ...]]] = []
        if rule in MARGIN_RANGES:
            checks.append(("loss.margin", check_margin, (rule, self.margin)))
            if self.dynamic_margin is not None:
                for key in ("m_min", "m_max"):
                    value = getattr(self.dynamic_margin, key)
                    checks.append((f"loss.dynamic_margin.{key}", check_margin, (rule, value)))
        if rule == "CombinedMargin":
            checks.append(("loss.combined_margins", check_combined_margins, self.combined_margins))
        for key, check, args in checks:
            try:
                check(*args)
            except ValueError as exc:
                raise ValueError(f"{key} for loss.kind '{self.kind}': {exc}") from None
        return self


class OptimizerConfig(StrictModel):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    grad_clip: float | None = Field(5.0, gt=0.0)
    # Fine-tuning (dml.train.param_groups): layer-wise LR decay of the backbone (None: off)
    # and optimizer steps during which the backbone stays frozen while neck and head train.
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    freeze_backbone_steps: int = Field(0, ge=0)


class ScheduleConfig(StrictModel):
    """LR per optimizer step: linear warm-up, then cosine / polynomial / cyclic / constant."""

    kind: Literal["cosine", "poly", "cyclic", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    power: float = Field(2.0, gt=0.0)
    cycle_steps: int = Field(200, ge=2)


class SWAConfig(StrictModel):
    """Stochastic weight averaging over the last part of training (Izmailov et al. 2018)."""

    enabled: bool = False
    start_fraction: float = Field(0.75, ge=0.0, lt=1.0)
    bn_update_batches: int = Field(20, ge=0)


class TrainConfig(StrictModel):
    """`dml train`: the run folder, backend, length, precision, checkpoints and logging."""

    run_dir: str = "runs/teacher"
    backend: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; stops early when reached
    grad_accum: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    checkpoint_every: int = Field(200, ge=1)
    keep_last: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)
    eval_split: str = "query"
    eval_gallery_split: str | None = None
    tensorboard: bool = False
    # Face verification sets scored every eval_every steps and at the end (10-fold accuracy, ...).
    verification_sets: list[VerificationSetConfig] = []
    verification_flip: bool = False  # flip test-time augmentation for the verification sets
    # Keep <run_dir>/best/model.pt by this logged metric (e.g. ver_lfw_accuracy, eval_map_at_r);
    # None: the first verification set's accuracy when there are sets, else no best model.
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"

    @model_validator(mode="after")
    def _best_metric_known(self) -> TrainConfig:
        check_verification_sets(self.verification_sets)
        check_best_metric(self.best_metric, self.verification_sets)
        return self

    @property
    def resolved_best_metric(self) -> str | None:
        """``best_metric``, or the first verification set's accuracy when unset and sets are configured."""
        if self.best_metric is None and self.verification_sets:
            return f"ver_{self.verification_sets[0].set_name}_accuracy"
        return self.best_metric


class EvalConfig(StrictModel):
    """`dml evaluate`: which model, which splits, which metrics, where the report goes."""

    model_path: str = "runs/teacher/model.pt"  # a model.pt, or a run folder holding one
    output_dir: str = "runs/teacher/eval"
    query_split: str = "query"
    gallery_split: str | None = "gallery"  # None: leave-one-out over the query split
    flip: bool = False  # flip test-time augmentation
    ks: tuple[int, ...] = (1, 5, 10)
    index: Literal["flat", "ivfpq"] = "flat"
    fars: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    pairs_file: str | None = None  # LFW-style pairs file; None: all pairs of the query split
    max_verification_samples: int = Field(20000, ge=2)
    plots: bool = True
    grid_queries: int = Field(8, ge=0)
    # 2-D maps of the embedding space in the report (dml.eval.maps), on one seeded sample.
    maps: tuple[Literal["pca", "umap", "tsne"], ...] = ("pca",)
    map_samples: int = Field(3000, ge=10)
    # Face verification sets (.bin or pairs file + folder), scored with the 10-fold protocol.
    verification_sets: list[VerificationSetConfig] = []
    # Retrieval post-processing (DBA, alpha-QE, k-reciprocal), reported beside the plain search.
    reranking: RerankingConfig = RerankingConfig()

    @field_validator("ks")
    @classmethod
    def _ks_positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        check_ks(value)  # `dml.eval.metrics.retrieval_metrics` refuses the same
        return value

    @field_validator("fars")
    @classmethod
    def _fars_rates(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        check_fars(value)  # `dml.eval.verification.verification_metrics` refuses the same
        return value

    @model_validator(mode="after")
    def _unique_sets(self) -> EvalConfig:
        check_verification_sets(self.verification_sets)
        return self


class StudentConfig(ModelConfig):
    """The student model. ``embedding_dim`` None means the teacher's: the student is trained
    in the teacher's embedding space, so a different value is an error at start."""

    backbone: str = "mobilenetv3_large_100"
    embedding_dim: int | None = Field(None, ge=2)  # type: ignore[assignment]  # None: the teacher's


class DistillConfig(StrictModel):
    """`dml distill`: a teacher run folder and the student, trained by the same trainer."""

    teacher: str = "runs/teacher"
    student: StudentConfig = StudentConfig()
    run_dir: str = "runs/student"
    absolute_weight: float = Field(1.0, ge=0.0)
    absolute_kind: Literal["l2", "cosine"] = "cosine"
    relative_weight: float = Field(0.0, ge=0.0)
    rkd_distance_weight: float = Field(0.0, ge=0.0)
    rkd_angle_weight: float = Field(0.0, ge=0.0)
    label_weight: float = Field(0.0, ge=0.0)
    init_head_from_teacher: bool = False
    freeze_head: bool = False
    teacher_embeddings: Literal["on_the_fly", "cached"] = "cached"


class ExportConfig(StrictModel):
    """`dml export`: formats, parity target, optional int8."""

    model_path: str = "runs/student/model.pt"
    output_dir: str = "runs/student/export"
    report_path: str | None = None  # `dml evaluate`'s report.json of this model: its headline goes on the card
    formats: tuple[Literal["onnx", "torchscript"], ...] = ("onnx", "torchscript")
    opset: int = Field(17, ge=17)
    min_cosine: float = Field(0.9999, gt=0.0, le=1.0)
    parity_split: str = "query"
    parity_images: int = Field(64, ge=1)
    int8: bool = False
    int8_min_cosine: float = Field(0.98, gt=0.0, le=1.0)  # int8 vs fp32 ONNX, per image
    calibration_images: int = Field(256, ge=1)
    # Bake the preprocessing into the graph (`dml.export.PixelInputModel`): the exported model
    # takes decoded, resized uint8 pixels (N, H, W, C) instead of normalised float (N, C, H, W).
    preprocessing_in_graph: bool = False


class MLflowConfig(StrictModel):
    """MLflow tracking (`dml.tracking`). ``enabled`` None: on when ``uri`` or the standard
    MLFLOW_TRACKING_URI is set. No uri anywhere: a SQLite store beside the run folders."""

    enabled: bool | None = None
    uri: str | None = None
    experiment: str = "dml"
    parent_run_id: str | None = None  # set by `dml pipeline run`: stages become its children
    registered_model: str | None = "dml-student"  # export registers the student here; None: not


class TrackingConfig(StrictModel):
    """Experiment trackers every stage logs to (rank 0 only); metrics.jsonl is always written."""

    mlflow: MLflowConfig = MLflowConfig()
    tensorboard: bool = False  # training scalars and the evaluation embedding projector


class DMLConfig(StrictModel):
    """The whole run: one section per stage."""

    seed: int = 0
    prepare: PrepareConfig = PrepareConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    swa: SWAConfig = SWAConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    distill: DistillConfig = DistillConfig()
    export: ExportConfig = ExportConfig()
    # `dml pipeline`'s settings: carried along unread here, checked by the pipeline package
    # (pipeline.config.PipelineConfig), so one file serves every command.
    pipeline: dict[str, Any] = Field(default_factory=dict)
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> DMLConfig:
        if self.loss.sample_rate < 1.0 and self.train.grad_accum > 1:
            raise ValueError(
                "loss.sample_rate < 1 cannot be combined with train.grad_accum > 1: "
                "each micro-batch samples different class centres"
            )
        if self.loss.is_pair_loss and self.data.pk_classes is None:
            raise ValueError(f"loss.kind '{self.loss.kind}' needs P x K batches: set data.pk_classes")
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages
# Own helpers, not jsonargparse/tyro/typer: those parse `--data.batch_size 32` flags, not the bare
# `data.batch_size=32` tokens anywhere on the line that the CLI promises, nor `extends:` chains.


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed value); values are parsed as YAML.

    Raises ConfigError for text that is not ``key=value``.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. data.batch_size=32)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every dotted override applied (nested dicts created).

    Raises ConfigError for a key given twice (as a YAML file's duplicate keys are): the last
    one silently winning hid the other.
    """
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    given: dict[str, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        dotted = ".".join(path)
        if dotted in given:
            raise ConfigError(f"override key '{dotted}' is given twice ('{given[dotted]}' and '{text}'); give it once")
        given[dotted] = text
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result


def validate_config(data: dict[str, Any], model: type[BaseModel] = DMLConfig, check_backbones: bool = True) -> Any:
    """Validate a plain dict into ``model``; errors become one `ConfigError` naming the keys.

    ``check_backbones=False`` skips looking backbone names up in timm (which imports torch).
    """
    try:
        return model.model_validate(data, context={CHECK_BACKBONES: check_backbones})
    except ValidationError as exc:
        messages = [describe_error(e, model) for e in exc.errors()]
        raise ConfigError("; ".join(messages)) from None


EXTENDS_KEY = "extends"  # a config file may name a base file (relative to itself) it overrides


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``: nested mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the
    last value, so a repeated ``model:`` section silently dropped the first one's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping of ``node`` as a dict. Raises yaml's ConstructorError (with the key's
        line and column) for a key it holds twice."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: the problem and where it is (line and column, 1-based)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem or exc.context}"
    return str(exc).splitlines()[0]


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in a YAML config file, with its ``extends`` chain of base files resolved.

    Raises ConfigError for a missing or non-YAML file, a non-mapping, a bad or cyclic ``extends``.
    """
    path = Path(path)
    if not path.is_file():
        where = f" (extended by {_chain[-1]})" if _chain else ""
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder{where}; give a YAML file, e.g. {path / 'train.yaml'}")
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in _chain:
        raise ConfigError(f"config file {path} extends itself through: {' -> '.join(map(str, _chain))}")
    try:
        # bytes: PyYAML decodes UTF-8/16 itself and names bad bytes (read_text raised UnicodeDecodeError)
        data = yaml.load(path.read_bytes(), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop(EXTENDS_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: '{EXTENDS_KEY}' must be a file path, got {base!r}")
    return merge_config(read_config_file(path.parent / base, (*_chain, path.resolve())), data)


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    check_backbones: bool = True,
    model: type[DMLConfig] = DMLConfig,
) -> Any:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.

    A file may start from another one with ``extends: base.yaml`` (a path relative to the
    file): its own keys are laid over the base's, nested sections merging key by key.
    Raises `ConfigError` (one line) on unknown keys, bad values and unknown names;
    ``check_backbones=False`` leaves timm backbone names unchecked (no torch import).
    Returns a ``model`` (`DMLConfig` or a subclass with more checked sections).
    """
    data = {} if path is None else read_config_file(path)
    try:
        return validate_config(apply_overrides(data, overrides or []), model, check_backbones=check_backbones)
    except ConfigError as exc:
        if path is None:
            raise
        # name the file: a schema error alone did not say which config (or base) held the key
        raise ConfigError(f"{path}{' (with overrides)' if overrides else ''}: {exc}") from None


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML next to a stage's outputs."""
    from dml.files import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # disk full: an error naming the file, no half-written config
        tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
