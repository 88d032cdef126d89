"""Models: timm and torchvision backbones with the paper's embedding head and their preprocessing, frozen teachers,
safetensors and ONNX export.

Importing this package registers the small CNNs (`rct_cnn4`, `rct_cnn3_small`) with timm.
"""

from rct_dist.models.embedding import (
    EmbeddingHead,
    EmbeddingModel,
    RawFeatureModel,
    build_model,
    build_raw_features,
)
from rct_dist.models.export import (
    export_model,
    export_onnx,
    load_as_timm,
    load_exported,
    read_onnx_contract,
)
from rct_dist.models.preprocess import Preprocess
from rct_dist.models.small_cnn import SmallCNN
from rct_dist.models.teacher import FrozenTeacher

__all__ = [
    "EmbeddingHead",
    "EmbeddingModel",
    "FrozenTeacher",
    "Preprocess",
    "RawFeatureModel",
    "SmallCNN",
    "build_model",
    "build_raw_features",
    "export_model",
    "export_onnx",
    "load_as_timm",
    "load_exported",
    "read_onnx_contract",
]
