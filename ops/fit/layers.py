"""The sublayers FIT is built from, on one device: attention through torch SDPA, an MLP,
a pre-norm self-attention layer and a pre-norm cross-attention layer.

Every module works on any number of leading batch dimensions (`[..., L, dim]`), so a FIT
block applies the same layer to each group (`[B, t, n, dim]`) or to all latents
(`[B, T * m, dim]`) without copies of the code. Parameter names are the contract with
`naive.py`, which reads these weights and recomputes the math without SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_heads(dim: int, num_heads: int) -> int:
    """The head dimension; ValueError unless num_heads divides dim."""
    if num_heads < 1 or dim < 1 or dim % num_heads != 0:
        raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
    return dim // num_heads


class Attention(nn.Module):
    """Multi-head attention of queries from `x` over keys/values from `context`, unsharded:
    FIT's attention inside one group or over the gathered latents. (The sharded causal
    attention of the language models is `seqshard.models.layers.ShardedCausalAttention`.)

    x [..., L, dim], context [..., S, dim] -> [..., L, dim]. `mask` [L, S] is a bool
    (True = may attend) or additive float mask, or None; `causal` means query i sees keys <= i (L == S).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, *, causal: bool = False,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-2]
        h, d = self.num_heads, self.head_dim
        # the fused CPU / CUDA kernels want exactly [batch, heads, len, head_dim]
        x = x.reshape(-1, *x.shape[-2:])  # [b, L, dim]
        context = context.reshape(-1, *context.shape[-2:])  # [b, S, dim]
        q = self.q(x).unflatten(-1, (h, d)).transpose(1, 2)  # [b, h, L, d]
        k, v = self.kv(context).unflatten(-1, (2, h, d)).permute(2, 0, 3, 1, 4)  # 2 x [b, h, S, d]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        o = self.out(o.transpose(1, 2).flatten(-2))  # [b, L, dim]
        return o.reshape(*lead, *o.shape[-2:])


class MLP(nn.Module):
    """Linear -> GELU (erf) -> Linear, widening by mlp_ratio."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives a hidden width of {hidden} for dim={dim}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)). [..., L, dim].

    With `context` [..., S, dim] (a sequence that contains x's rows, e.g. every rank's
    latents), x's rows attend to norm(context) instead: the same layer, computed only for
    the rows in x. `mask` is then [L, S].
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, *, causal: bool = False, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        kv = h if context is None else self.norm1(context)
        x = x + self.attn(h, kv, causal=causal, mask=mask)
        return x + self.mlp(self.norm2(x))


class CrossLayer(nn.Module):
    """Pre-norm cross-attention with a residual and no MLP (FIT's read and write):
    x + attn(norm_q(x), norm_kv(context)). x [..., L, dim], context [..., S, dim]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm_q(x), self.norm_kv(context))
