"""Training loop and batched scoring of a :class:`~flow.model.sanf.SANFFlow` on in-memory feature tensors."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from flow.model.sanf import FlowConfig, SANFFlow, flow_loss


class FlowTrainingError(RuntimeError):
    """Training diverged (a non-finite loss)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (paper section 3.2; Adam eps from the reference code).

    Attributes:
        epochs: passes over the normal-class train rows.
        steps: when set, train for exactly this many optimiser steps instead (``epochs`` is then ignored): the
            same amount of training whatever the number of rows, the last pass over them cut short.
        early_stop: stop after the first epoch whose mean train loss is below the held-out loss (the
            generalisation gap turning positive, the onset of overfitting), ``epochs``/``steps`` being the most;
            needs held-out rows (``fit --val-fraction``). Measured in docs/results.md, "Training length".
        batch_size: samples per step (paper: 32).
        lr: Adam learning rate (paper: 5e-5).
        betas: Adam betas (paper: (0.8, 0.8)).
        eps: Adam epsilon (reference code: 1e-4).
        weight_decay: Adam weight decay (paper: 1e-5).
    """

    epochs: int = 16
    batch_size: int = 32
    lr: float = 5e-5
    betas: tuple[float, float] = (0.8, 0.8)
    eps: float = 1e-4
    weight_decay: float = 1e-5
    steps: int | None = None
    early_stop: bool = False

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1; got {self.steps}")

    def to_dict(self) -> dict:
        out = asdict(self)
        for key, unset in (("steps", None), ("early_stop", False)):
            if out[key] == unset:
                del out[key]  # the record of a run without the option is what it was before the option existed
        return out

    def steps_per_epoch(self, num_rows: int) -> int:
        """Optimiser steps of one pass over ``num_rows`` rows (the last batch may be smaller)."""
        return math.ceil(num_rows / self.batch_size)

    def total_steps(self, num_rows: int) -> int:
        """Optimiser steps a fit on ``num_rows`` rows takes."""
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch(num_rows)

    def describe(self, num_rows: int) -> str:
        """``"16 epochs"`` or ``"64 steps (0.5 epochs)"``, for logs."""
        if self.steps is None:
            return f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        passes = self.steps / self.steps_per_epoch(num_rows)
        return f"{self.steps} step{'s' if self.steps != 1 else ''} ({passes:.3g} epochs)"

    def check_held_out(self, has_held_out: bool) -> None:
        """Raises ValueError when ``early_stop`` is asked for without held-out rows to compare the train loss with."""
        if self.early_stop and not has_held_out:
            raise ValueError("--early-stop needs held-out normal rows to compare the train loss with: pass "
                             "--val-fraction (e.g. 0.2)")


@dataclass
class TrainResult:
    """What :func:`fit_flow` returns besides the model.

    Attributes:
        epoch_losses: mean train loss of each epoch (of its steps, for a last epoch cut short by ``steps``), nats
            per dimension (docs/method.md eq. (23)).
        val_losses: the same loss on held-out normal-class train rows after each epoch (empty without them).
        wall_time_s: seconds spent in the training loop.
        num_samples: training rows.
        stopped_early: ``early_stop`` ended training before ``epochs``/``steps`` were done.
        num_steps: optimiser steps made.
    """

    epoch_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    num_samples: int = 0
    stopped_early: bool = False
    num_steps: int = 0

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


def make_optimizer(model: torch.nn.Module, train_config: TrainConfig, fused: bool = True) -> torch.optim.Adam:
    """Adam with the settings of ``train_config`` over the model's parameters, by default as torch's fused kernel.

    ``fused=True`` updates each parameter tensor in one pass instead of a chain of elementwise ops over
    the 50 M parameters (the same update up to float rounding; about 5x less time per optimizer step on a
    CPU, see ``bench/bench.py`` section 3); ``fused=False`` is torch's default implementation (for
    comparisons). Source: ``torch.optim.Adam`` (fused on CPU since torch 2.4).
    """
    return torch.optim.Adam(model.parameters(), lr=train_config.lr, betas=train_config.betas,
                            eps=train_config.eps, weight_decay=train_config.weight_decay, fused=fused)


def fit_flow(cls: torch.Tensor, patches: torch.Tensor | None, flow_config: FlowConfig,
             train_config: TrainConfig, seed: int = 0, device: str | torch.device = "cpu",
             progress: bool = True, val_cls: torch.Tensor | None = None,
             val_patches: torch.Tensor | None = None,
             on_epoch: Callable[[int, SANFFlow, TrainResult], None] | None = None) -> tuple[SANFFlow, TrainResult]:
    """Train a SANF flow by maximum likelihood on the normal-class train rows (docs/method.md eq. (22)-(23)).

    The model is initialised and the batches are shuffled from ``seed`` alone, so the same inputs and
    seed give the same model on the same device. Nothing here looks at test data.

    Args:
        cls: (N, D) float32 semantic vectors of the normal class's train images.
        patches: (N, P, D) float32 patch tokens (None allowed without CAFF).
        flow_config: architecture; ``flow_config.dim`` must equal D.
        train_config: optimisation settings.
        seed: seed of the initialisation and of the batch order.
        device: where to train.
        progress: show a progress bar.
        val_cls: (M, D) held-out rows of the normal class's train split; when given, the loss on them is
            recorded after every epoch (for choosing the epoch count without the test split).
        val_patches: (M, P, D) their patch tokens.
        on_epoch: called as ``on_epoch(epoch, model, result)`` after each epoch (``epoch`` counts from 1; the
            model in train mode, ``result`` holding the losses so far); for studies of the training length
            (``bench/train_length.py``). It must leave the model's parameters unchanged.

    Returns:
        The trained model (in eval mode, on ``device``) and a :class:`TrainResult`.

    Raises:
        ValueError: no training rows, D does not match, or ``early_stop`` without held-out rows.
        FlowTrainingError: the loss became NaN or infinite (names the epoch and step).
    """
    n = cls.shape[0]
    if n == 0:
        raise ValueError("no training rows for this normal class")
    if cls.shape[1] != flow_config.dim:
        raise ValueError(f"semantic vectors have D = {cls.shape[1]}, flow built for {flow_config.dim}")
    train_config.check_held_out(val_cls is not None and len(val_cls) > 0)
    device = torch.device(device) if isinstance(device, str) else device
    torch.manual_seed(seed)
    model = SANFFlow(flow_config).to(device)
    optimizer = make_optimizer(model, train_config)
    generator = torch.Generator().manual_seed(seed)
    use_tokens = flow_config.use_caff and patches is not None
    result = TrainResult(num_samples=n)
    start = time.perf_counter()
    model.train()
    steps_left = train_config.total_steps(n)
    epochs = math.ceil(steps_left / train_config.steps_per_epoch(n))
    bar = tqdm(range(epochs), desc="fit", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for step, begin in enumerate(range(0, n, train_config.batch_size)):
            if steps_left == 0:
                break
            steps_left -= 1
            result.num_steps += 1
            idx = order[begin:begin + train_config.batch_size]
            y = cls[idx].to(device, non_blocking=True)
            tokens = patches[idx].to(device, non_blocking=True) if use_tokens else None
            z, log_det = model(y, tokens)
            loss = flow_loss(z, log_det)
            if not torch.isfinite(loss):
                raise FlowTrainingError(f"non-finite train loss ({loss.item()}) at epoch {epoch + 1}, "
                                        f"step {step + 1}; lower --lr or check the cache for extreme values")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        result.epoch_losses.append(total / count)
        if val_cls is not None and len(val_cls):
            # eq. (23) on the held-out rows: mean nll minus the constant, per dimension
            nll = score_batches(model, val_cls, val_patches, train_config.batch_size)["nll"]
            result.val_losses.append(float(nll.mean()) / flow_config.dim - 0.5 * math.log(2 * math.pi))
            model.train()
        if on_epoch is not None:
            on_epoch(epoch + 1, model, result)
            model.train()
        bar.set_postfix(loss=f"{result.epoch_losses[-1]:.4f}")
        if train_config.early_stop and result.epoch_losses[-1] < result.val_losses[-1] and epoch + 1 < epochs:
            result.stopped_early = True
            break
    result.wall_time_s = time.perf_counter() - start
    model.eval()
    return model, result


@torch.no_grad()
def score_batches(model: SANFFlow, cls: torch.Tensor, patches: torch.Tensor | None,
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """Both anomaly scores for a block of samples, computed in batches in eval mode.

    Args:
        model: a trained flow.
        cls: (N, D) semantic vectors (any float dtype; cast to the model's).
        patches: (N, P, D) patch tokens (None allowed without CAFF).
        batch_size: samples per forward pass; the scores do not depend on it beyond float rounding.

    Returns:
        ``{"nll": (N,) float64 nats, "z2": (N,) float64}``.
    """
    model.eval()
    param = next(model.parameters())
    out: dict[str, list[np.ndarray]] = {"nll": [], "z2": []}
    for begin in range(0, cls.shape[0], batch_size):
        y = cls[begin:begin + batch_size].to(param.device, param.dtype)
        tokens = None
        if model.config.use_caff:
            tokens = patches[begin:begin + batch_size].to(param.device, param.dtype)
        scores = model.scores(y, tokens)
        for key, value in scores.items():
            out[key].append(value.double().cpu().numpy())
    return {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in out.items()}


__all__ = ["FlowTrainingError", "TrainConfig", "TrainResult", "fit_flow", "make_optimizer",
           "score_batches"]
