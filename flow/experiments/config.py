"""What a fit is, as one validated object: :class:`FitConfig`.

Every field is a ``fit`` option of the same name (``val_fraction`` is ``--val-fraction``; a test checks that they
agree), validated once here, whether it comes from the command line or from Python. A run folder's ``run.json``
records what the fit used (the flow's shape under ``flow``, the training under ``train``, and ``method``,
``normal_class``, ``seed``, ``val_fraction``, ``feature_transform``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any

from flow.detectors.registry import FLOW_METHODS, METHODS
from flow.detectors.transforms import FEATURE_CHOICES
from flow.model.sanf import FlowConfig
from flow.model.train import TrainConfig

#: The fields that set the flow's shape and training: they mean nothing to the baselines (knn, gaussian).
FLOW_FIELDS = ("blocks", "hidden", "heads", "clamp", "epochs", "steps", "early_stop", "batch_size", "lr", "beta1",
               "beta2", "adam_eps", "weight_decay")
#: The epochs of a flow fit when neither ``epochs`` nor ``steps`` is given (docs/results.md, "Training length").
DEFAULT_EPOCHS = TrainConfig.epochs


@dataclass(frozen=True)
class FitConfig:
    """One fit: the detector, its normal class, its feature transform, held-out rows and (flows) shape and training.

    Attributes:
        normal: the normal class: a class name, ``all``, or an index (a class name wins).
        method: ``sanf`` (the CAFF flow), ``sanf-nocaff`` (MLP-only subnets), ``knn`` or ``gaussian``.
        transform: the feature transform applied to class and patch tokens before the detector: ``auto``, ``raw``
            (the paper's), ``l2``, ``ssqrt-l2``, ``standardize`` or ``pca-whiten`` (docs/method.md eq. (31)-(35)).
        val_fraction: the share of the normal class's train rows held out, in [0, 1): their scores calibrate the
            run's p-values and decisions (eq. (36)-(37)); the flows also log their loss per epoch.
        seed: the seed of the flow's initialisation and batch order, and of the held-out rows' choice.
        blocks: K, flow layers (paper: 4).
        hidden: H, the coupling subnets' width (paper: 1024).
        heads: class-attention heads (reference code: 4).
        clamp: the bound c of the arctan soft clamp of the log-scales (eq. (8); the paper's alpha = 3).
        epochs: passes over the train rows (default 16 when ``steps`` is not given).
        steps: train for exactly this many optimiser steps instead of ``epochs``.
        early_stop: stop after the first epoch whose train loss is below the held-out loss (needs ``val_fraction``).
        batch_size: rows per optimiser step (paper: 32).
        lr, beta1, beta2, adam_eps, weight_decay: Adam's settings (paper: 5e-5, 0.8, 0.8; eps 1e-4 from the
            reference code; weight decay 1e-5).
        k: neighbours averaged by ``knn`` (PANDA: 2).

    Raises:
        ValueError: a value out of range, or an option that the method does not use (``--steps`` for ``knn``,
            ``--k`` for a flow); the message names the option, what is allowed and the value received.
    """

    normal: str = "all"
    method: str = "sanf"
    transform: str = "auto"
    val_fraction: float = 0.0
    seed: int = 0
    blocks: int = 4
    hidden: int = 1024
    heads: int = 4
    clamp: float = 3.0
    epochs: int | None = None
    steps: int | None = None
    early_stop: bool = False
    batch_size: int = 32
    lr: float = 5e-5
    beta1: float = 0.8
    beta2: float = 0.8
    adam_eps: float = 1e-4
    weight_decay: float = 1e-5
    k: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "normal", str(self.normal))
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.transform not in FEATURE_CHOICES:
            raise ValueError(f"--transform must be one of {', '.join(FEATURE_CHOICES)}; got {self.transform!r}")
        self._set("val_fraction", _number("val_fraction", self.val_fraction, low=0.0, high=1.0, high_open=True))
        self._set("seed", _integer("seed", self.seed, 0, 2**32 - 1))
        for name, most in (("blocks", 256), ("hidden", 65536), ("heads", 1024), ("batch_size", 2**20), ("k", 1000)):
            self._set(name, _integer(name, getattr(self, name), 1, most))
        for name in ("epochs", "steps"):
            if getattr(self, name) is not None:
                self._set(name, _integer(name, getattr(self, name), 1, 2**31 - 1))
        self._set("clamp", _number("clamp", self.clamp, low=0.0, low_open=True))
        self._set("lr", _number("lr", self.lr, low=0.0, low_open=True))
        self._set("adam_eps", _number("adam_eps", self.adam_eps, low=0.0, low_open=True))
        self._set("weight_decay", _number("weight_decay", self.weight_decay, low=0.0))
        for name in ("beta1", "beta2"):
            self._set(name, _number(name, getattr(self, name), low=0.0, high=1.0, high_open=True))
        if not isinstance(self.early_stop, bool):
            raise ValueError(f"--early-stop must be true or false; got {self.early_stop!r}")
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"--epochs and --steps exclude each other (a fit has one length); got --epochs "
                             f"{self.epochs} and --steps {self.steps}")
        if self.method in FLOW_METHODS:
            self.train_config().check_held_out(self.val_fraction > 0)
            if self.k != FitConfig.k:
                raise ValueError(f"--k is the knn baseline's; --method {self.method} has no neighbours (got --k "
                                 f"{self.k})")
        else:
            given = [name for name in FLOW_FIELDS if getattr(self, name) != getattr(FitConfig, name)]
            if given:
                raise ValueError(f"{_option(given[0])} sets the flows (sanf, sanf-nocaff); --method {self.method} "
                                 f"trains no flow (got {_option(given[0])} {getattr(self, given[0])})")
            if self.method != "knn" and self.k != FitConfig.k:
                raise ValueError(f"--k is the knn baseline's; --method {self.method} has no neighbours (got --k "
                                 f"{self.k})")

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # a frozen dataclass: the checked value, as a Python number

    @property
    def is_flow(self) -> bool:
        """Whether the method is a flow (``sanf``, ``sanf-nocaff``)."""
        return self.method in FLOW_METHODS

    def flow_config(self, dim: int) -> FlowConfig:
        """The flow's architecture for tokens of width ``dim`` (D)."""
        return FlowConfig(dim=dim, num_blocks=self.blocks, hidden=self.hidden, num_heads=self.heads,
                          clamp=self.clamp, use_caff=self.method == "sanf")

    def train_config(self) -> TrainConfig:
        """The flow's optimisation settings."""
        return TrainConfig(epochs=DEFAULT_EPOCHS if self.epochs is None else self.epochs, steps=self.steps,
                           early_stop=self.early_stop, batch_size=self.batch_size, lr=self.lr,
                           betas=(self.beta1, self.beta2), eps=self.adam_eps, weight_decay=self.weight_decay)

    def detector_params(self) -> dict[str, Any]:
        """The baseline's constructor arguments (``{"k": k}`` for knn, none otherwise)."""
        return {"k": self.k} if self.method == "knn" else {}

    def for_method(self, method: str, k: int | None = None) -> "FitConfig":
        """The same fit with another method (a sweep fits flows and baselines from one set of options): the flow
        and training fields are reset for a baseline, and ``k`` (default: this one's) is kept for knn only."""
        k = self.k if k is None else k
        if method in FLOW_METHODS:
            return replace(self, method=method, k=FitConfig.k)
        defaults = {name: getattr(FitConfig, name) for name in FLOW_FIELDS}
        return replace(self, method=method, **defaults, k=k if method == "knn" else FitConfig.k)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep_base(methods, k: int = 2, seeds=(0,), blocks=(4,), hidden=(1024,), **fields) -> FitConfig:
    """The options a sweep's fits share, checked against the methods swept: the flow options (and several seeds or
    flow sizes) need a flow among them, ``k`` needs knn; the flow options are then checked as that flow's.

    Raises:
        ValueError: as :class:`FitConfig`, or an option the methods swept do not use.
    """
    swept = f"--methods {','.join(methods)}"
    if k != FitConfig.k and "knn" not in methods:
        raise ValueError(f"--k is the knn baseline's; {swept} has no knn (got --k {k})")
    flows = [m for m in methods if m in FLOW_METHODS]
    if not flows:
        axes = {"seeds": (list(seeds), [0]), "blocks": (list(blocks), [4]), "hidden": (list(hidden), [1024])}
        given = [(f"--{name}", ",".join(map(str, v))) for name, (v, default) in axes.items() if v != default]
        given += [(_option(name), fields[name]) for name in FLOW_FIELDS
                  if name in fields and fields[name] != getattr(FitConfig, name)]
        if given:
            raise ValueError(f"{given[0][0]} sets the flows (sanf, sanf-nocaff); {swept} has none (the baselines are "
                             f"fitted once, seed 0; got {given[0][0]} {given[0][1]})")
    return FitConfig(method=flows[0] if flows else methods[0], **fields)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _integer(name: str, value, low: int, high: int) -> int:
    """``value`` as a Python int (numpy integers welcome) if it is an integer in low..high.

    Raises:
        ValueError: otherwise (naming the option, the range and the value).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{_option(name)} must be an integer in {low}..{high}; got {value!r}")
    return int(value)


def _number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> float:
    """``value`` as a Python float (numpy numbers welcome) if it is finite and within the bounds.

    Raises:
        ValueError: otherwise (naming the option, the interval and the value).
    """
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = (f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}"
                  f"{')' if high_open or high is None else ']'}")
        raise ValueError(f"{_option(name)} must be a finite number in {bounds}; got {value!r}")
    return float(value)


__all__ = ["DEFAULT_EPOCHS", "FLOW_FIELDS", "FitConfig", "sweep_base"]
