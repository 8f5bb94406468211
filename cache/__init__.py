"""The feature cache: the only code that knows the HDF5 layout (see :mod:`cache.schema`)."""

from .reader import CacheSplit, FeatureCache
from .schema import FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS, CacheError
from .writer import PARTIAL_SUFFIX, CacheWriter

__all__ = [
    "CacheError",
    "CacheSplit",
    "CacheWriter",
    "FeatureCache",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PARTIAL_SUFFIX",
    "READABLE_VERSIONS",
]
