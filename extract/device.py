"""Which torch device a command runs on (shared by the extract stage and the flow stage)."""

from __future__ import annotations

import re

import torch


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available else CPU; ``"cpu"``/``"cuda"`` as given; ``"cuda:N"`` (a distributed
    job's rank, see :mod:`extract.distributed`) as given.

    Raises:
        ValueError: CUDA asked for but not available, or an unknown value.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    indexed = re.fullmatch(r"cuda:[0-9]+", device) is not None
    if (device == "cuda" or indexed) and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not indexed:
        raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
    return torch.device(device)


__all__ = ["resolve_device"]
