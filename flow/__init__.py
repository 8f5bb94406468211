"""The SANF-AD flow (SPEC.md section 3): layers, model, training loop, scoring and runs.

``flow`` reads tensors through :mod:`cache` and knows nothing about images.
"""

from .coupling import CAFFSubnet, ClassAttention, FlowLayer, soft_clamp
from .metrics import MetricError, aupr, auroc, fpr_at_tpr
from .model import FlowConfig, SANFFlow, count_flops, count_parameters, flow_loss
from .train import FlowTrainingError, TrainConfig, TrainResult, fit_flow, score_batches

__all__ = [
    "CAFFSubnet",
    "ClassAttention",
    "FlowConfig",
    "FlowLayer",
    "FlowTrainingError",
    "MetricError",
    "SANFFlow",
    "TrainConfig",
    "TrainResult",
    "aupr",
    "auroc",
    "count_flops",
    "count_parameters",
    "fit_flow",
    "fpr_at_tpr",
    "flow_loss",
    "score_batches",
    "soft_clamp",
]
