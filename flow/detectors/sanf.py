"""The SANF-AD detector: the normalizing flow of :mod:`flow.model` as a detector (docs/method.md, section 3,
eq. (20)-(25)).

``sanf`` is the flow with CAFF subnets (patch tokens fused by class attention); ``sanf-nocaff`` the ablation with
MLP-only subnets (docs/method.md, section 4), which reads no patch tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from flow.detectors.base import Detector, as_tensor
from flow.model.sanf import FlowConfig, SANFFlow
from flow.model.train import TrainConfig, TrainResult, fit_flow


def flow_method(use_caff: bool) -> str:
    """``"sanf"`` for the CAFF flow, ``"sanf-nocaff"`` for the MLP-only ablation."""
    return "sanf" if use_caff else "sanf-nocaff"


class FlowDetector(Detector):
    """A :class:`~flow.model.sanf.SANFFlow` trained by maximum likelihood on the normal class's rows; its scores are
    the negative log-likelihood ``nll`` (nats, eq. (24)) and ``z2``, the mean squared latent (eq. (25)).

    Fitted state: the flow's weights (``state`` is the flow's state dict, as run folders have always stored it).

    Args:
        config: the flow's architecture (``use_caff`` chooses ``sanf`` or ``sanf-nocaff``).
        train_config: the optimisation settings :meth:`fit` uses.
        seed: seed of the initialisation and of the batch order.
        device: where :meth:`fit` trains.
        progress: show a progress bar while fitting.
    """

    score_names = ("nll", "z2")
    primary_score = "nll"

    def __init__(self, config: FlowConfig, train_config: TrainConfig = TrainConfig(), seed: int = 0,
                 device: str | torch.device = "cpu", progress: bool = False) -> None:
        super().__init__()
        self.config = config
        self.method = flow_method(config.use_caff)
        self.uses_patches = config.use_caff
        self.train_config = train_config
        self.seed = seed
        self.fit_device = device
        self.progress = progress
        self.flow = SANFFlow(config)
        self.result: TrainResult | None = None

    def params(self) -> dict[str, Any]:
        return {"flow": self.config.to_dict()}

    def fit(self, cls, patches=None, val_cls=None, val_patches=None) -> "FlowDetector":
        """Train the flow on class tokens (N, D) and patch tokens (N, P, D) (eq. (22)-(23)); ``val_*`` held-out normal
        rows whose loss is recorded after every epoch (and that ``early_stop`` compares with).

        Raises:
            ValueError: no rows, D does not match, or ``early_stop`` without held-out rows.
            FlowTrainingError: the loss became NaN or infinite.
        """
        tokens = as_tensor(patches) if self.uses_patches else None
        val_tokens = as_tensor(val_patches) if self.uses_patches else None
        self.flow, self.result = fit_flow(as_tensor(cls), tokens, self.config, self.train_config, seed=self.seed,
                                          device=self.fit_device, progress=self.progress, val_cls=as_tensor(val_cls),
                                          val_patches=val_tokens)
        return self

    def forward(self, cls: torch.Tensor, patches: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"nll": (B,) nats, "z2": (B,)}`` as float64, computed in the flow's dtype (float32) from class tokens
        (B, D) and, for CAFF, patch tokens (B, P, D)."""
        param = next(self.flow.parameters())
        tokens = patches.to(param.device, param.dtype) if self.uses_patches else None
        scores = self.flow.scores(cls.to(param.device, param.dtype), tokens)
        return {key: value.double() for key, value in scores.items()}

    def fit_record(self) -> dict[str, Any]:
        """The training's record: losses per epoch, steps, wall time (see ``run.json``)."""
        result = self.result
        if result is None:
            return {}
        return {"epochs": len(result.epoch_losses), "steps": result.num_steps, "stopped_early": result.stopped_early,
                "epoch_losses": result.epoch_losses, "final_train_loss": result.final_loss,
                "val_losses": result.val_losses, "wall_time_s": round(result.wall_time_s, 3)}

    def state(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().contiguous() for key, value in self.flow.state_dict().items()}

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, Any]) -> "FlowDetector":
        detector = cls(FlowConfig.from_dict(params["flow"]))
        detector.flow.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
        detector.flow.eval()
        return detector


__all__ = ["FlowDetector", "flow_method"]
