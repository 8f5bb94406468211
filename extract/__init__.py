"""The extract stage: datasets, the frozen backbone, and writing the feature cache through :mod:`cache`."""

from .backbone import DEFAULT_BACKBONE, BackboneError, TokenEncoder, create_backbone
from .datasets import DATASETS, DatasetError, DatasetSource, ImageReadError, build_dataset
from .run import PRECISIONS, ExtractionError, extract_features

__all__ = [
    "BackboneError",
    "DATASETS",
    "DEFAULT_BACKBONE",
    "DatasetError",
    "DatasetSource",
    "ExtractionError",
    "ImageReadError",
    "PRECISIONS",
    "TokenEncoder",
    "build_dataset",
    "create_backbone",
    "extract_features",
]
