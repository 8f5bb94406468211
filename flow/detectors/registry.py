"""The detectors by method name: what ``fit --method`` accepts and what a run folder's ``method`` means."""

from __future__ import annotations

from flow.detectors.base import Detector
from flow.detectors.gaussian import GaussianDetector
from flow.detectors.knn import KNNDetector
from flow.detectors.sanf import FlowDetector

#: The flow (with CAFF) and its ablation without CAFF: one class, :class:`FlowDetector`.
FLOW_METHODS = ("sanf", "sanf-nocaff")
#: The baselines on the same class tokens, by method name.
BASELINES: dict[str, type[Detector]] = {"knn": KNNDetector, "gaussian": GaussianDetector}
#: Every method of ``fit --method``.
METHODS = FLOW_METHODS + tuple(BASELINES)
#: The primary score of each method: the one ``predict`` decides on and writes as ``score``. The flows: the negative
#: log-likelihood (docs/method.md, eq. (24), the paper's score); k-NN: the cosine distance, ahead of L2 on every
#: dataset measured in docs/results.md; the Gaussian: its only score.
PRIMARY_SCORES = {method: (FlowDetector if method in FLOW_METHODS else BASELINES[method]).primary_score
                  for method in METHODS}


def detector_class(method: str) -> type[Detector]:
    """The class implementing ``method``.

    Raises:
        ValueError: an unknown method (the message names ``--method`` and the allowed values).
    """
    if method in FLOW_METHODS:
        return FlowDetector
    if method in BASELINES:
        return BASELINES[method]
    raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")


def method_score_names(method: str) -> tuple[str, ...]:
    """The scores a method gives, in output order (``nll``, ``z2`` for the flows)."""
    return detector_class(method).score_names


__all__ = ["BASELINES", "FLOW_METHODS", "METHODS", "PRIMARY_SCORES", "detector_class", "method_score_names"]
