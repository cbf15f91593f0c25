"""The DeltaNet token mixer as an nn.Module, exact with the sequence sharded over a Mesh.

    q, k = L2norm(SiLU(conv(W_q x))), L2norm(SiLU(conv(W_k x)))   per head
    v    = SiLU(conv(W_v x))
    beta = sigmoid(W_b x)            (x2 with allow_neg_eigval: eigenvalues of I - b k k^T in [-1, 1])
    g    = -exp(A_log) softplus(W_a x + dt_bias)    (use_gate: Gated DeltaNet's log-decay)
    y    = W_o [RMSNorm(delta_rule(q, k, v, beta, g)) (* SiLU(W_g x) with use_gate)]

`conv` is a short depthwise causal convolution; on a sharded sequence it needs the previous
rank's last conv_size - 1 tokens (the halo), which `ShortConv` fetches with `ring_shift`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqshard.dist import Mesh, ring_shift

from .api import delta_rule


class ShortConv(nn.Module):
    """Depthwise causal convolution over the sequence: x [B, N_local, C] -> [B, N_local, C].

    With a mesh, rank r prepends rank r-1's last `size - 1` tokens (zeros on rank 0), so the
    result equals the convolution of the whole sequence; gradients for the halo travel back.

    >>> ShortConv(8, 4)(torch.randn(2, 10, 8)).shape
    torch.Size([2, 10, 8])
    """

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        if size < 1:
            raise ValueError(f"conv size={size} must be >= 1")
        self.size = size
        self.weight = nn.Parameter(torch.empty(channels, 1, size))
        bound = 1.0 / math.sqrt(size)  # torch's Conv1d default for a depthwise kernel
        nn.init.uniform_(self.weight, -bound, bound)

    def _halo(self, x: torch.Tensor, mesh: Mesh | None) -> torch.Tensor:
        B, N, C = x.shape
        need = self.size - 1
        if mesh is None or mesh.size == 1:
            return x.new_zeros(B, need, C)
        if N < need:
            raise ValueError(f"ShortConv: local length {N} is shorter than the halo "
                             f"conv_size - 1 = {need}; use fewer ranks or a longer sequence")
        halo = ring_shift(x[:, N - need:], mesh.group, 1, timeout=mesh.timeout)
        # rank 0 received the last rank's tail (the ring wraps): the sequence starts here, so
        # zero it, keeping the node in the graph so every rank joins ring_shift's backward
        return halo * 0.0 if mesh.rank == 0 else halo

    def forward(self, x: torch.Tensor, mesh: Mesh | None = None) -> torch.Tensor:
        if self.size == 1:
            return x * self.weight[:, 0, 0]
        padded = torch.cat([self._halo(x, mesh), x], dim=1)  # [B, N + size - 1, C]
        out = F.conv1d(padded.transpose(1, 2), self.weight, groups=x.shape[-1])  # [B, C, N]
        return out.transpose(1, 2)


class DeltaNet(nn.Module):
    """DeltaNet / Gated DeltaNet token mixer: x [B, N_local, hidden] -> [B, N_local, hidden].

    Pass the same `mesh` on every rank (sequence sharded contiguously); None = one process.
    chunk_size and schedule go to `delta_rule`.

    >>> layer = DeltaNet(hidden_size=32, num_heads=2)
    >>> layer(torch.randn(1, 50, 32)).shape
    torch.Size([1, 50, 32])
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None,
                 use_short_conv: bool = True, conv_size: int = 4, allow_neg_eigval: bool = False,
                 use_gate: bool = False, *, chunk_size: int = 64, schedule: str = "scan",
                 norm_eps: float = 1e-5):
        super().__init__()
        if num_heads < 1 or hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size}, num_heads={num_heads} must be >= 1")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size={hidden_size} is not divisible by "
                                 f"num_heads={num_heads}; pass head_dim")
            head_dim = hidden_size // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.allow_neg_eigval, self.use_gate = allow_neg_eigval, use_gate
        self.chunk_size, self.schedule, self.norm_eps = chunk_size, schedule, norm_eps
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.convs = nn.ModuleList(
            [ShortConv(inner, conv_size) for _ in range(3)] if use_short_conv else [])
        if use_gate:
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
            # per-head decay rates spread over [1, 16] and time steps over [1e-3, 1e-1]
            self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1, 16).log())
            dt = torch.empty(num_heads).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            self.g_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_norm = nn.Parameter(torch.ones(head_dim))
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H * D] -> [B, H, N, D]"""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, mesh: Mesh | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"DeltaNet expects x [B, N_local, hidden], got {tuple(x.shape)}")
        qkv = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]  # each [B, N, H * D]
        if self.convs:
            qkv = [conv(t, mesh) for conv, t in zip(self.convs, qkv)]
        q, k, v = (self._heads(F.silu(t)) for t in qkv)  # [B, H, N, D]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [B, H, N]
        if self.allow_neg_eigval:
            beta = beta * 2.0
        gate = None
        if self.use_gate:
            rate = F.softplus(self.a_proj(x) + self.dt_bias)  # [B, N, H]
            gate = (-self.A_log.exp() * rate).transpose(1, 2)  # [B, H, N] log-decay
        o, _ = delta_rule(q, k, v, beta, mesh=mesh, gate=gate, chunk_size=self.chunk_size,
                          schedule=self.schedule)
        o = F.rms_norm(o, (self.head_dim,), self.o_norm, self.norm_eps)  # [B, H, N, D]
        o = o.transpose(1, 2).flatten(2)  # [B, N, H * D]
        if self.use_gate:
            o = o * F.silu(self.g_proj(x))
        return self.o_proj(o)
