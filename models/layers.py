"""Building blocks shared by the language models: the shard context, RMSNorm, SwiGLU, RoPE
from global positions, and a causal self-attention layer on the sharded-attention op.

A model never assumes its shard is a contiguous slice: every position-dependent piece (RoPE,
the loss targets) asks the layout which global positions this rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seqshard.dist import Layout, Mesh, get_layout
from seqshard.ops.attention import decode_attention, sharded_attention


@dataclass(frozen=True)
class ShardContext:
    """Where this rank's tokens sit in the global sequence; built once per forward.

    mesh: the Mesh (size 1 when unsharded). layout: the Layout. seq_len: global length N.
    positions: int64 [N_local] global positions of the local tokens, in local order.
    doc_lens: lengths of the packed documents over the global sequence (sum == N; the same
    for every row of the batch), or None for one document.
    cache: inference only (`models.kv_cache.ModelCache`): while it fills, the attention layers
    store their K/V in it (prefill); once it decodes, the tokens are the same new token(s) on
    every rank at `positions`, and attention reads every rank's cache (`decoding`).
    """

    mesh: Mesh
    layout: Layout
    seq_len: int
    positions: torch.Tensor
    doc_lens: tuple[int, ...] | None = None
    cache: object | None = None

    @classmethod
    def for_token(cls, position: int, mesh: Mesh, cache, device) -> "ShardContext":
        """The context of one new token at global `position`, replicated on every rank."""
        positions = torch.tensor([position], dtype=torch.int64, device=device)
        return cls(mesh, get_layout("contiguous"), position + 1, positions, None, cache)

    @classmethod
    def make(cls, n_local: int, mesh: Mesh | None, layout: str | Layout, device,
             doc_lens=None, cache=None) -> "ShardContext":
        mesh = mesh or Mesh.single()
        layout = get_layout(layout)
        seq_len = n_local * mesh.size
        positions = layout.positions(seq_len, mesh.rank, mesh.size).to(device)
        if doc_lens is not None:
            doc_lens = tuple(int(n) for n in torch.as_tensor(doc_lens).flatten().tolist())
            if sum(doc_lens) != seq_len or min(doc_lens, default=0) < 1:
                raise ValueError(f"doc_lens={list(doc_lens)[:8]}{'...' if len(doc_lens) > 8 else ''}"
                                 f" must be positive lengths summing to the global sequence "
                                 f"length N={seq_len} (sum {sum(doc_lens)})")
        return cls(mesh, layout, seq_len, positions, doc_lens, cache)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 so bf16 autocast does not lose the variance
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight).to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) with hidden = 2/3 * ratio * dim rounded up to a multiple of 8."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        hidden = -(-(2 * ratio * dim // 3) // 8) * 8
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N_local, head_dim] for the given global positions (fp32).

    Computed from the *global* positions the layout assigns, so a zigzag or striped shard gets
    the same rotation its tokens get in the unsharded model.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [N_local, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [N_local, head_dim] (rotate-half pairing)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, N_local, D] by the tables [N_local, D] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class ShardedCausalAttention(nn.Module):
    """Causal multi-head (grouped-query) self-attention with RoPE over a sharded sequence.

    x [B, N_local, C] -> [B, N_local, C]. The attention itself is
    `seqshard.ops.attention.sharded_attention` with the mesh, layout and strategy, so the
    result equals attention over the whole (gathered) sequence. `window` (tokens, the token
    itself included) makes it causal sliding-window attention (on any layout).
    (Not `seqshard.ops.fit.layers.Attention`, FIT's unsharded attention inside a group or
    over latents.)
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: float, strategy: str, window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta, self.strategy, self.window = rope_theta, strategy, window
        self.wq = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        batch, n_local, _ = x.shape
        heads = (batch, n_local, self.num_heads, self.head_dim)
        kv_heads = (batch, n_local, self.num_kv_heads, self.head_dim)
        q = self.wq(x).view(heads).transpose(1, 2)  # [B, Hq, N_local, D]
        k = self.wk(x).view(kv_heads).transpose(1, 2)  # [B, Hkv, N_local, D]
        v = self.wv(x).view(kv_heads).transpose(1, 2)
        cos, sin = rope_tables(ctx.positions, self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.cache is not None and ctx.cache.decoding:
            out = self._decode(q, k, v, ctx)  # [B, Hq, T, D]
            return self.wo(out.transpose(1, 2).reshape(batch, n_local, -1))
        if ctx.cache is not None:  # prefill: this rank's K/V stay here, with their positions
            ctx.cache.attention(self, self.window).fill(k, v, ctx.positions, ctx.seq_len)
        # the model checked once per forward that every rank's token shard agrees
        out = sharded_attention(q, k, v, ctx.mesh, causal=True, layout=ctx.layout,
                                strategy=self.strategy, window=self.window,
                                doc_lens=ctx.doc_lens,
                                check_agreement=False)  # [B, Hq, N_local, D]
        return self.wo(out.transpose(1, 2).reshape(batch, n_local, self.num_heads * self.head_dim))

    def _decode(self, q, k, v, ctx: ShardContext) -> torch.Tensor:
        """New tokens q [B, Hq, T, D], k, v [B, Hkv, T, D] (the same on every rank) at
        ctx.positions: append their K/V to the cache (round-robin over ranks), then attend
        over every rank's cache. Returns [B, Hq, T, D], the same on every rank."""
        cache = ctx.cache.attention(self, self.window)
        for j, position in enumerate(ctx.positions.tolist()):
            cache.append(k[:, :, j:j + 1], v[:, :, j:j + 1], position)
        k_cache, v_cache, key_positions = cache.view()
        # generate agreed once on the shapes and options: skip the per-call agreement gather
        return decode_attention(q, k_cache, v_cache, key_positions, ctx.positions, ctx.mesh,
                                window=self.window, check_agreement=False)
