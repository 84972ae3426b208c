"""Embedding models: timm backbones + a pooling / projection neck -> L2-normalised embeddings."""

from dml.models.backbone import backbone_out_channels, create_backbone
from dml.models.embedder import EmbeddingModel, build_embedding_model, load_weights_file, model_summary
from dml.models.erasing import BatchFeatureErasing
from dml.models.neck import EmbeddingNeck, split_embedding_dim
from dml.models.pooling import GeM, build_global_pool, parse_pooling
from dml.models.preprocessing import Preprocessing, resolve_preprocessing
from dml.models.weights import WeightsFileNotFoundError, read_state_dict

__all__ = [
    "BatchFeatureErasing",
    "EmbeddingModel",
    "EmbeddingNeck",
    "GeM",
    "Preprocessing",
    "WeightsFileNotFoundError",
    "backbone_out_channels",
    "build_embedding_model",
    "build_global_pool",
    "create_backbone",
    "load_weights_file",
    "model_summary",
    "parse_pooling",
    "read_state_dict",
    "resolve_preprocessing",
    "split_embedding_dim",
]
