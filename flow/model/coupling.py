"""Layers of the SANF-AD flow: soft clamp, class attention, CAFF subnet, flow-based learning layer.

Equation numbers refer to ``docs/method.md`` (section 3), which also relates them to the paper (Ma, Lan et al., "A
Semantics-aware Normalizing Flow Model for Anomaly Detection", ICME 2023).

Sign convention (as in zuko / FrEIA): ``forward`` returns ``(z, +log|det dz/dy|)`` and ``inverse``
returns ``(y, log|det dy/dz|)``, which is minus the forward log-det at the same point. Log-dets are in
nats, one value per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def soft_clamp(s: torch.Tensor, bound: float) -> torch.Tensor:
    """Arctan soft clamp of a log-scale (eq. (8)): ``kappa_c(s) = (2 c / pi) * arctan(s / c)``, c the ``bound``.

    Args:
        s: raw log-scales, any shape.
        bound: the clamp bound c (the paper's alpha = 3); the output lies in the open interval (-c, c).

    Returns:
        Tensor of the shape of ``s``.
    """
    return (2.0 * bound / math.pi) * torch.atan(s / bound)


def _power_of_two_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-sample power of two ``2^k >= max|x|`` (k >= 0) of a (B, ...) tensor, shape (B, 1, 1), no gradient.

    Dividing by a power of two is exact in floating point (outside the subnormal range), so values that
    need no scaling (``max|x| <= 1``, k = 0) are left bit for bit as they were.
    """
    peak = x.detach().abs().flatten(1).amax(dim=1).clamp_min(1.0)
    return torch.pow(2.0, torch.ceil(torch.log2(peak))).view(-1, 1, 1)


def stable_logits(key_side: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Attention logits ``key_side @ tokens^T`` shifted by their maximum, finite wherever the softmax is.

    The logits of eq. (15) can exceed float32's range (about 3.4e38) for large but finite inputs (the shifts t
    of one layer feed the next, unbounded), and ``softmax`` of an infinite logit is NaN. Here ``key_side``
    is divided by two per-sample powers of two, ``2^a >= max|key_side|`` and ``2^b >= max|tokens|``
    (:func:`_power_of_two_scale`; exact divisions, and only of the small (B, heads, d) factor), so that every
    product in the matrix product is at most 1 in magnitude; the product is shifted so that its maximum over
    the tokens is 0, and only then multiplied back by ``2^a`` and ``2^b``. The result is
    ``logits - max(logits)``: at most 0, its largest entry exactly 0, so the softmax never sees inf - inf;
    entries below float32's range become -inf, weight 0 (their weight is below ``exp(-3.4e38)`` anyway). The
    softmax is invariant to the shift, so this is eq. (15) unchanged; for inputs that need no scaling (both
    scales 1, or any scales while nothing leaves float32's normal range) the values are bit for bit those
    of the plain product.

    Args:
        key_side: (B, heads, d) query-side keys ``W_k,h^T q_h / sqrt(e)``.
        tokens: (B, 1 + P, d) the attended tokens ``[v; T]``.

    Returns:
        (B, heads, 1 + P) shifted logits.
    """
    k_scale, m_scale = _power_of_two_scale(key_side), _power_of_two_scale(tokens)
    # two divisions and two products, never by k_scale * m_scale: that may overflow to inf (and inf * 0 is NaN)
    logits = torch.bmm(key_side / k_scale / m_scale, tokens.transpose(1, 2))
    logits = logits - logits.detach().amax(dim=-1, keepdim=True)
    return logits * k_scale * m_scale


class ClassAttention(nn.Module):
    """Multi-head class attention of one query vector over ``[v; tokens]`` (eq. (13)-(16); the query-side form is
    eq. (17)).

    ``Q = W_q v + b_q`` (1 token), ``K, V = W_{k,v} [v; T] + b`` (1 + P tokens),
    ``A = softmax(Q K^T / sqrt(d_head))``, ``Out_CA = W_o (A V) + b_o``. The paper prints the
    sqrt outside the softmax (eq. (15)); scaled dot-product attention is meant.

    Attention runs in ``attn_dim = num_heads * ceil(in_dim / num_heads)`` channels, i.e. the
    input width rounded up to a multiple of the head count (the reference code attends in the
    input width); ``W_o`` maps to ``out_dim`` (H).

    With a single query the key and value projections of the 1 + P tokens can be moved onto the
    query side, which computes the same function (float rounding aside) in about 1 / (1 + P) of their
    multiply-adds: per head h, ``q_h . (W_k,h m_j + b_k,h) = (W_k,h^T q_h) . m_j + q_h . b_k,h``, and the
    last term is the same for every token j, so the softmax cancels it; and since each row of A sums
    to 1, ``sum_j A_hj (W_v,h m_j + b_v,h) = W_v,h (sum_j A_hj m_j) + b_v,h``. :meth:`forward` computes
    this form, with the logits computed by :func:`stable_logits` (finite for large finite inputs, where the
    plain product overflows float32); :meth:`forward_as_written` computes eq. (14)-(16) literally (the tests check that
    both agree; :func:`flow.model.sanf.count_flops` counts either). A consequence of the same identity: ``b_k`` has no
    effect on the output (its gradient is 0), in the paper's form as in ours; it is kept so that the
    parameters are exactly those of eq. (14).

    Args:
        in_dim: d, channels of v and of each token.
        out_dim: width of Out_CA (H).
        num_heads: attention heads (reference code: 4).
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int = 4) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = -(-in_dim // num_heads)
        self.attn_dim = self.head_dim * num_heads
        self.q = nn.Linear(in_dim, self.attn_dim)
        # W_k and W_v stacked in one layer (rows: K of every head, then V of every head).
        self.kv = nn.Linear(in_dim, 2 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, out_dim)
        #: compute eq. (14)-(16) literally in :meth:`forward` (for FLOP counts of the paper's form).
        self.as_written = False

    def forward(self, v: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Attend from ``v`` over ``[v; tokens]`` (the query-side form described above).

        Args:
            v: (B, d) query vector.
            tokens: (B, P, d) patch tokens.

        Returns:
            Out_CA of shape (B, H).
        """
        if self.as_written:
            return self.forward_as_written(v, tokens)
        B, P, d = tokens.shape
        heads, e = self.num_heads, self.head_dim
        m = torch.cat([v.unsqueeze(1), tokens], dim=1)  # (B, 1+P, d)
        q = self.q(v).view(B, heads, e)
        w_k, w_v = self.kv.weight.view(2, heads, e, d).unbind(0)  # (heads, e, d) each
        key_side = torch.einsum("bhe,hed->bhd", q, w_k) * e ** -0.5  # W_k,h^T q_h / sqrt(e)
        attn = torch.softmax(stable_logits(key_side, m), dim=-1)  # (B, heads, 1+P)
        mixed = torch.bmm(attn, m)  # (B, heads, d): sum_j A_hj m_j
        out = torch.einsum("bhd,hed->bhe", mixed, w_v) + self.kv.bias[self.attn_dim:].view(heads, e)
        return self.proj(out.reshape(B, self.attn_dim))

    def forward_as_written(self, v: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Eq. (14)-(16) as printed: project all 1 + P tokens to keys and values, then attend.

        Same arguments and result as :meth:`forward` (up to float rounding), about (1 + P) times the
        multiply-adds in the key/value projections.
        """
        B, P, d = tokens.shape
        m = torch.cat([v.unsqueeze(1), tokens], dim=1)  # (B, 1+P, d)
        q = self.q(v).view(B, self.num_heads, 1, self.head_dim)
        k, val = self.kv(m).view(B, 1 + P, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, val)  # (B, heads, 1, head_dim); scale 1/sqrt(head_dim)
        return self.proj(out.reshape(B, self.attn_dim))


class CAFFSubnet(nn.Module):
    """Coupling subnet with class-attention feature fusion (CAFF, eq. (13)-(19)).

    ``[s, t] = FC(concat(MLP(v), gamma * Out_CA(v, T)))`` where MLP is three Linear+ReLU layers of
    width H and gamma a per-channel scale initialised to 1. With ``use_caff=False`` (the paper's
    "without CAFF" ablation, Table 5) it is ``[s, t] = FC(MLP(v))`` and the patch tokens are unused.

    Args:
        in_dim: d, channels of the conditioning half v (and of each patch token half).
        out_dim: channels of the half being transformed; s and t each have this many.
        hidden: H (paper: 1024).
        num_heads: class-attention heads.
        use_caff: fuse the patch tokens by class attention.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 1024, num_heads: int = 4,
                 use_caff: bool = True) -> None:
        super().__init__()
        self.use_caff = use_caff
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        if use_caff:
            self.attn = ClassAttention(in_dim, hidden, num_heads)
            self.gamma = nn.Parameter(torch.ones(hidden))
        self.fc = nn.Linear(2 * hidden if use_caff else hidden, 2 * out_dim)

    def forward(self, v: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the raw log-scale and the shift.

        Args:
            v: (B, d) conditioning half.
            tokens: (B, P, d) patch-token halves aligned with v; may be None without CAFF.

        Returns:
            ``(s, t)``, each (B, out_dim); s is not yet clamped.
        """
        h = self.mlp(v)
        if self.use_caff:
            h = torch.cat([h, self.gamma * self.attn(v, tokens)], dim=-1)
        s, t = self.fc(h).chunk(2, dim=-1)
        return s, t


class FlowLayer(nn.Module):
    """One flow-based learning layer (FLL): fixed permutation, then a two-step affine coupling (eq. (6)-(11)).

    With y permuted and split into ``a`` (first floor(D/2) channels) and ``b`` (the rest), and the patch
    tokens permuted and split alike into ``T_a``, ``T_b``::

        (s1, t1) = CAFF_1(a, T_a);   b' = b * exp(c(s1)) + t1
        (s2, t2) = CAFF_2(b', T_b);  a' = a * exp(c(s2)) + t2
        output [a', b'],  log|det J| = sum c(s1) + sum c(s2)

    The output stays in the permuted channel order; :meth:`permute_tokens` gives the patch tokens in
    that order for the next layer.

    Args:
        dim: D, channels of the semantic vector and of each patch token.
        hidden: H of the subnets.
        num_heads: class-attention heads.
        clamp: the soft-clamp bound c of the log-scales (eq. (8); the paper's alpha).
        use_caff: CAFF subnets (True) or MLP-only subnets (ablation).
        seed: seed of this layer's channel permutation.
    """

    def __init__(self, dim: int, hidden: int = 1024, num_heads: int = 4, clamp: float = 3.0,
                 use_caff: bool = True, seed: int = 0) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"dim must be >= 2 to split into two halves, got {dim}")
        self.dim = dim
        self.clamp = clamp
        self.dim_a = dim // 2
        self.dim_b = dim - self.dim_a
        perm = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.subnet1 = CAFFSubnet(self.dim_a, self.dim_b, hidden, num_heads, use_caff)
        self.subnet2 = CAFFSubnet(self.dim_b, self.dim_a, hidden, num_heads, use_caff)
        self.use_caff = use_caff

    def permute_tokens(self, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """Apply this layer's channel permutation to (B, P, D) patch tokens (None passes through)."""
        return None if tokens is None else tokens.index_select(-1, self.perm)

    def _split_tokens(self, tokens: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if tokens is None or not self.use_caff:
            return None, None
        return tokens[..., : self.dim_a], tokens[..., self.dim_a:]

    def forward(self, y: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Map y to z.

        Args:
            y: (B, D) input, channel order aligned with ``tokens``.
            tokens: (B, P, D) patch tokens aligned with y (None only without CAFF).

        Returns:
            ``z`` (B, D) in this layer's permuted order and ``log|det dz/dy|`` (B,) in nats.
        """
        tokens = self.permute_tokens(tokens) if self.use_caff else None
        return self.couple(y.index_select(1, self.perm), tokens)

    def couple(self, y: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-step affine coupling (eq. (7)-(11)) on inputs already in this layer's permuted order.

        Args:
            y: (B, D) permuted input.
            tokens: (B, P, D) patch tokens permuted alike (:meth:`permute_tokens`); None without CAFF.

        Returns:
            ``z`` (B, D) and ``log|det dz/dy|`` (B,) in nats (the permutation's log-det is 0).
        """
        a, b = y[:, : self.dim_a], y[:, self.dim_a:]
        t_a, t_b = self._split_tokens(tokens)
        s1, t1 = self.subnet1(a, t_a)
        s1 = soft_clamp(s1, self.clamp)
        b = b * torch.exp(s1) + t1
        s2, t2 = self.subnet2(b, t_b)
        s2 = soft_clamp(s2, self.clamp)
        a = a * torch.exp(s2) + t2
        return torch.cat([a, b], dim=1), s1.sum(dim=1) + s2.sum(dim=1)

    def inverse(self, z: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form inverse of :meth:`forward`.

        Args:
            z: (B, D) output of forward (permuted order).
            tokens: (B, P, D) the same patch tokens given to forward (aligned with its input y).

        Returns:
            ``y`` (B, D) and ``log|det dy/dz|`` (B,) = minus the forward log-det.
        """
        tokens = self.permute_tokens(tokens) if self.use_caff else None
        y, log_det = self.uncouple(z, tokens)
        return y.index_select(1, self.inv_perm), log_det

    def uncouple(self, z: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`couple`: ``y`` (B, D) still in the permuted order, and ``log|det dy/dz|`` (B,)."""
        a, b = z[:, : self.dim_a], z[:, self.dim_a:]
        t_a, t_b = self._split_tokens(tokens)
        s2, t2 = self.subnet2(b, t_b)
        s2 = soft_clamp(s2, self.clamp)
        a = (a - t2) * torch.exp(-s2)
        s1, t1 = self.subnet1(a, t_a)
        s1 = soft_clamp(s1, self.clamp)
        b = (b - t1) * torch.exp(-s1)
        return torch.cat([a, b], dim=1), -(s1.sum(dim=1) + s2.sum(dim=1))
