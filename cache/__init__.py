"""The feature cache: the only code that knows the HDF5 layout (see :mod:`cache.schema`)."""

from .chunks import (
    LOCK_SUFFIX,
    PARTIAL_SUFFIX,
    CacheLock,
    ChunkStore,
    FileLock,
    lock_holder,
    partial_dir,
    partial_progress,
)
from .reader import CacheSplit, FeatureCache, read_root_attrs
from .schema import FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS, CacheError
from .writer import TEMP_SUFFIX, CacheWriter

__all__ = [
    "CacheError",
    "CacheLock",
    "CacheSplit",
    "CacheWriter",
    "ChunkStore",
    "FeatureCache",
    "FileLock",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LOCK_SUFFIX",
    "PARTIAL_SUFFIX",
    "READABLE_VERSIONS",
    "TEMP_SUFFIX",
    "lock_holder",
    "partial_dir",
    "partial_progress",
    "read_root_attrs",
]
