"""What export and predict share about a run on new images: how its features were computed, and the ONNX graph's
session and metadata (which run it was exported from)."""

from __future__ import annotations

import os
from pathlib import Path

from cache import FeatureCache
from extract.backbone import file_sha256
from extract.encode import provenance
from flow.store.run_folder import TRANSFORM_FILE, RunError

#: The prefix of this project's entries in an exported graph's metadata.
METADATA_PREFIX = "sanf_ad."


class ExportError(RuntimeError):
    """The graph could not be exported, or onnxruntime disagrees with PyTorch beyond :data:`CHECK_TOLERANCE`."""


def run_features(run: Path, record: dict) -> dict:
    """How the run's features were computed: ``record["features"]``, or (runs fitted before it was recorded) the
    provenance attributes of its cache.

    Raises:
        RunError: neither is there.
    """
    if isinstance(record.get("features"), dict):
        return record["features"]
    if not Path(record["cache"]).is_file():
        raise RunError(f"run {run}: run.json does not record how its features were computed and its cache "
                       f"{record['cache']} is missing; fit the run again")
    with FeatureCache(record["cache"]) as fc:
        return provenance(fc.attrs)


def onnx_session(path: str | os.PathLike):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed: pip install -e '.[export]'") from None
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise RunError(f"--onnx {path}: onnxruntime cannot load it ({str(err).splitlines()[0][:300]})") from None


def transform_sha256(run: Path) -> str:
    """sha256 of the run's feature-transform statistics, "" when it has none (stateless transforms)."""
    path = Path(run) / TRANSFORM_FILE
    return file_sha256(path) if path.exists() else ""


def read_metadata(session) -> dict[str, str]:
    """The ``sanf_ad.*`` metadata of an exported graph, without the prefix."""
    props = session.get_modelmeta().custom_metadata_map
    return {k[len(METADATA_PREFIX):]: v for k, v in props.items() if k.startswith(METADATA_PREFIX)}


__all__ = ["METADATA_PREFIX", "ExportError", "onnx_session", "read_metadata", "run_features", "transform_sha256"]

