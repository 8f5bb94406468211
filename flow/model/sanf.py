"""The SANF-AD normalizing flow over the semantic vector, conditioned on patch tokens (docs/method.md section 3)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from flow.model.coupling import ClassAttention, FlowLayer


@dataclass(frozen=True)
class FlowConfig:
    """Architecture of a :class:`SANFFlow` (paper defaults, section 3.2).

    Attributes:
        dim: D, channels of the semantic vector and of each patch token.
        num_blocks: K, flow-based learning layers (paper: 4).
        hidden: H, hidden width of the coupling subnets (paper: 1024).
        num_heads: class-attention heads (reference code: 4).
        clamp: the soft-clamp bound c of the log-scales (eq. (8); the paper's alpha = 3). ``run.json`` stores it
            under the key ``alpha`` (:meth:`to_dict`, :meth:`from_dict`).
        use_caff: CAFF subnets (True) or the MLP-only ablation of Table 5 (False).
    """

    dim: int
    num_blocks: int = 4
    hidden: int = 1024
    num_heads: int = 4
    clamp: float = 3.0
    use_caff: bool = True

    def __post_init__(self) -> None:
        for name, most in (("dim", 2**20), ("num_blocks", 256), ("hidden", 65536), ("num_heads", 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"flow {name} must be an integer in 1..{most}, got {value!r}")
        if isinstance(self.clamp, bool) or not isinstance(self.clamp, (int, float)) \
                or not math.isfinite(self.clamp) or self.clamp <= 0:
            raise ValueError(f"flow clamp (alpha in run.json) must be a finite number > 0, got {self.clamp!r}")
        if not isinstance(self.use_caff, bool):
            raise ValueError(f"flow use_caff must be true or false, got {self.use_caff!r}")

    def to_dict(self) -> dict:
        """The fields as ``run.json`` stores them (``clamp`` under its key since the first runs, ``alpha``)."""
        out = asdict(self)
        out["alpha"] = out.pop("clamp")
        return {key: out[key] for key in ("dim", "num_blocks", "hidden", "num_heads", "alpha", "use_caff")}

    @classmethod
    def from_dict(cls, fields: dict) -> "FlowConfig":
        """The inverse of :meth:`to_dict` (``alpha`` read as ``clamp``).

        Raises:
            TypeError: unknown keys; ValueError: values out of range.
        """
        fields = dict(fields)
        if "alpha" in fields:
            fields["clamp"] = fields.pop("alpha")
        return cls(**fields)


class SANFFlow(nn.Module):
    """``z = F(y_sem) = f_K o ... o f_1 (y_sem)``, each f_k a :class:`FlowLayer` seeded with k.

    A plain module: no optimizer, no loss. ``forward`` returns latents and log-dets; the anomaly
    scores are :meth:`nll` and :meth:`z2`.

    Args:
        config: the architecture.
    """

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        if config.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {config.num_blocks}")
        self.config = config
        self.layers = nn.ModuleList(
            FlowLayer(config.dim, config.hidden, config.num_heads, config.clamp, config.use_caff, seed=k)
            for k in range(config.num_blocks)
        )

    def set_attention_form(self, as_written: bool) -> "SANFFlow":
        """Compute every class attention as eq. (14)-(16) print it (True) or in the query-side form (False, default).

        Both forms compute the same function (see :class:`~flow.model.coupling.ClassAttention`); the literal one is
        for FLOP counts of the paper's form and for comparisons. Returns the model itself.
        """
        for module in self.modules():
            if isinstance(module, ClassAttention):
                module.as_written = as_written
        return self

    def _check(self, x: torch.Tensor, tokens: torch.Tensor | None) -> None:
        if x.dim() != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"semantic vectors must have shape (B, {self.config.dim}), got {tuple(x.shape)}")
        if self.config.use_caff:
            if tokens is None:
                raise ValueError("the CAFF flow needs patch tokens of shape (B, P, D), got None")
            if tokens.dim() != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[2] != self.config.dim:
                raise ValueError(f"patch tokens must have shape ({x.shape[0]}, P, {self.config.dim}), "
                                 f"got {tuple(tokens.shape)}")

    def forward(self, y: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Map semantic vectors to latents.

        Args:
            y: (B, D) semantic vectors (class tokens).
            tokens: (B, P, D) patch tokens; ignored (may be None) without CAFF.

        Returns:
            ``z`` (B, D) and ``log|det dz/dy|`` (B,) in nats, summed over layers.
        """
        self._check(y, tokens)
        if not self.config.use_caff:
            tokens = None
        log_det = y.new_zeros(y.shape[0])
        for layer in self.layers:
            tokens = layer.permute_tokens(tokens)  # once per layer, kept for the next one
            y, ld = layer.couple(y.index_select(1, layer.perm), tokens)
            log_det = log_det + ld
        return y, log_det

    def inverse(self, z: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Map latents back to semantic vectors (closed form; used for tests and sampling).

        Args:
            z: (B, D) latents.
            tokens: (B, P, D) the patch tokens of the samples, as given to :meth:`forward`.

        Returns:
            ``y`` (B, D) and ``log|det dy/dz|`` (B,) in nats (= minus the forward log-det).
        """
        self._check(z, tokens)
        if not self.config.use_caff:
            tokens = None
        per_layer = []  # the patch tokens in each layer's permuted order
        for layer in self.layers:
            tokens = layer.permute_tokens(tokens)
            per_layer.append(tokens)
        log_det = z.new_zeros(z.shape[0])
        for layer, layer_tokens in zip(reversed(self.layers), reversed(per_layer), strict=True):
            z, ld = layer.uncouple(z, layer_tokens)
            z = z.index_select(1, layer.inv_perm)
            log_det = log_det + ld
        return z, log_det

    def nll(self, y: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Anomaly score ``-log p(y) = 0.5 ||z||^2 + (D/2) log(2 pi) - log|det J|`` in nats, shape (B,)."""
        z, log_det = self(y, tokens)
        return 0.5 * z.pow(2).sum(dim=1) + 0.5 * self.config.dim * math.log(2 * math.pi) - log_det

    def scores(self, y: torch.Tensor, tokens: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Both anomaly scores from one forward pass (higher = more anomalous).

        Returns:
            ``{"nll": (B,) nats, "z2": (B,) mean over the D channels of z^2}``.
        """
        z, log_det = self(y, tokens)
        sq = z.pow(2)
        nll = 0.5 * sq.sum(dim=1) + 0.5 * self.config.dim * math.log(2 * math.pi) - log_det
        return {"nll": nll, "z2": sq.mean(dim=1)}


def flow_loss(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """Training loss (eq. (23): the paper's eq. (22) divided by D) in nats per dimension:
    ``mean_b(0.5 ||z_b||^2 - log|det J_b|) / D``.

    Dividing by D as the reference code does; the constant (D/2) log(2 pi) is left out.

    Args:
        z: (B, D) latents.
        log_det: (B,) forward log-dets.

    Returns:
        A scalar tensor.
    """
    return (0.5 * z.pow(2).sum(dim=1) - log_det).mean() / z.shape[1]


def parameter_count(config: FlowConfig) -> int:
    """Trainable parameters of ``SANFFlow(config)``, counted without allocating them (PyTorch's meta device)."""
    with torch.device("meta"):
        return count_parameters(SANFFlow(config))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as the permutations excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(config: FlowConfig, num_patches: int, as_written: bool = False) -> int:
    """Floating-point operations of one forward pass for one sample (``torch.utils.flop_counter``).

    Counts matrix products and attention (a multiply-add counts as 2 FLOPs), as the paper's Table 6.

    Args:
        config: the architecture.
        num_patches: P, patch tokens per sample.
        as_written: count the class attention as eq. (14)-(16) print it (eq. (42)) (keys and values of all 1 + P tokens,
            :meth:`~flow.model.coupling.ClassAttention.forward_as_written`, the form the paper's count refers to)
            instead of the equivalent query-side form this implementation computes.

    Returns:
        FLOPs per sample.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = SANFFlow(config).eval().set_attention_form(as_written)
    tokens = torch.zeros(1, num_patches, config.dim) if config.use_caff else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, config.dim), tokens)
    return int(counter.get_total_flops())
