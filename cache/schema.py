"""The on-disk layout of a feature cache: the only place that names HDF5 paths and attributes.

Layout of format ``sanf-ad-features`` version 2 (one HDF5 file per dataset, backbone, preprocessing
and patch grid)::

    /                      root attributes, see ``REQUIRED_ROOT_ATTRS``
    /<split>/cls           (N, D)    semantic vector: the model's pooled embedding, the root attribute
                                     ``semantic_vector`` says which kind (``extract.backbone.SEMANTIC_VECTORS``)
    /<split>/patches       (N, P, D) patch tokens pooled to the patch grid, row-major (P = g_h * g_w)
    /<split>/label         (N,)      int64 class index into the root attribute ``class_names``
    /<split>/sample_id     (N,)      UTF-8 string: relative image path, or ``<split>/<index>``
    /<split>/fine_label    (N,)      optional int64 index into the root attribute ``fine_class_names``
                                     (CIFAR-100: the fine class of each image; its ``label`` is the superclass)

``<split>`` is ``train`` and ``test``. ``cls`` and ``patches`` are stored in the dtype named by the root
attribute ``dtype`` (float32 or float16) and chunked along N. Attributes that hold lists or dicts are
stored as JSON strings so that any HDF5 reader can show them.

Versions: 1 stored as ``cls`` the class token when the model has one, else the spatial mean of the final
features (before any head norm: for average-pooled ViTs, the mean before ``fc_norm``), with ``semantic_vector``
``class_token`` or ``spatial_mean``; 2 stores the model's own pooled embedding (``forward_head(...,
pre_logits=True)``), with the new kinds ``class_token_fc_norm``, ``spatial_mean_fc_norm``, ``attention_pool``
and ``pre_logits``. ``class_token`` and ``spatial_mean`` mean the same in both, so version 1 caches stay
readable and their attribute stays true.
"""

from __future__ import annotations

FORMAT_NAME = "sanf-ad-features"
FORMAT_VERSION = 2
#: Versions this build can read.
READABLE_VERSIONS = (1, 2)

SPLITS = ("train", "test")
SPLIT_DATASETS = ("cls", "patches", "label", "sample_id")

#: Root attributes every complete cache carries. Values are str, int, float or bool; JSON for lists.
REQUIRED_ROOT_ATTRS = (
    "format",
    "format_version",
    "complete",
    "created",
    "dataset",
    "data_source",
    "class_names",
    "backbone",
    "weights_source",
    "weights_sha256",
    "semantic_vector",
    "num_prefix_tokens",
    "timm_version",
    "torch_version",
    "input_size",
    "mean",
    "std",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "token_grid",
    "patch_grid",
    "feature_dim",
    "num_patches",
    "precision",
    "dtype",
)

#: Attributes that must be plain strings.
STRING_ATTRS = ("created", "dataset", "data_source", "backbone", "weights_source", "weights_sha256",
                "semantic_vector", "timm_version", "torch_version", "interpolation", "crop_mode", "precision", "dtype")

#: Optional root attribute ``layer``: which layer of the backbone the tokens come from (``extract --layer``:
#: ``final``, ``pre-activation`` or ``block-N``); a cache without it holds the final features.
DEFAULT_LAYER = "final"

#: Attributes stored as JSON strings.
JSON_ATTRS = ("class_names", "input_size", "mean", "std", "token_grid", "patch_grid", "fine_class_names",
              "skipped_files", "normal_classes")

#: Optional per-split dataset; present in every split exactly when the root attribute ``fine_class_names`` is.
FINE_LABEL = "fine_label"

STORAGE_DTYPES = ("float32", "float16")

#: Target size of one HDF5 chunk along the sample axis (h5py recommends 10 KiB to 1 MiB).
CHUNK_BYTES = 512 * 1024


class CacheError(Exception):
    """A feature cache is missing, incomplete, of another format or version, or inconsistent."""


def chunk_rows(row_bytes: int, num_rows: int) -> int:
    """Rows per chunk so that one chunk holds about ``CHUNK_BYTES``.

    Args:
        row_bytes: bytes of one sample's row in the dataset.
        num_rows: N, the dataset's length (a chunk never exceeds it).

    Returns:
        The chunk length along N, at least 1.
    """
    return max(1, min(num_rows, CHUNK_BYTES // max(1, row_bytes)))
