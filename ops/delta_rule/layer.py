"""The DeltaNet token mixer as an nn.Module, exact with the sequence sharded over a Mesh.

    q, k = L2norm(SiLU(conv(W_q x))), L2norm(SiLU(conv(W_k x)))   per head
    v    = SiLU(conv(W_v x))
    beta = sigmoid(W_b x)            (x2 with allow_neg_eigval: eigenvalues of I - b k k^T in [-1, 1])
    g    = -exp(A_log) softplus(W_a x + dt_bias)    (use_gate: Gated DeltaNet's log-decay)
    y    = W_o [RMSNorm(delta_rule(q, k, v, beta, g)) (* SiLU(W_g x) with use_gate)]

`conv` is a short depthwise causal convolution; on a sharded sequence it needs the previous
rank's last conv_size - 1 tokens (the halo), fetched with `ring_shift` (`causal_halo`).

The layer's math lives once, in `DeltaNet._mix` (rows with their conv context and an optional
incoming state -> outputs and the state after them). `forward` runs it over the whole shard
(the state crossing ranks inside `delta_rule`), or, when the shard is longer than
`mixer_piece_tokens`, pieces.py runs it piece by piece so that the layer's memory is O(piece).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqshard.dist import Mesh, all_reduce, ring_shift

from .api import delta_rule
from .pieces import deltanet_in_pieces
from .short_conv import causal_conv


def causal_halo(x: torch.Tensor, rows: int, mesh: Mesh | None) -> torch.Tensor:
    """The `rows` tokens before this rank's shard x [B, N_local, C]: rank r - 1's last rows,
    zeros on rank 0 (and on one process). Returns [B, rows, C]; its gradient travels back."""
    B, N, C = x.shape
    if mesh is None or mesh.size == 1 or rows == 0:
        return x.new_zeros(B, rows, C)
    if N < rows:
        raise ValueError(f"ShortConv: local length {N} is shorter than the halo "
                         f"conv_size - 1 = {rows}; use fewer ranks or a longer sequence")
    halo = ring_shift(x[:, N - rows:], mesh.group, 1, timeout=mesh.timeout)
    # rank 0 received the last rank's tail (the ring wraps): the sequence starts here, so
    # zero it, keeping the node in the graph so every rank joins ring_shift's backward
    return halo * 0.0 if mesh.rank == 0 else halo


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

    def with_context(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The convolution of n rows x [B, n, C] given the `size - 1` rows before them,
        context [B, size - 1, C] -> [B, n, C] (short_conv.py: along the token axis,
        no transposition to conv1d's channels-first layout)."""
        return causal_conv(x, context, self.weight[:, 0])  # weight [C, 1, K] -> [C, K]

    def forward(self, x: torch.Tensor, mesh: Mesh | None = None) -> torch.Tensor:
        return self.with_context(x, causal_halo(x, self.size - 1, mesh))  # halo [B, size - 1, C]


class DeltaNet(nn.Module):
    """DeltaNet / Gated DeltaNet token mixer: x [B, N_local, dim] -> [B, N_local, dim].

    Pass the same `mesh` on every rank (sequence sharded contiguously); None = one process.
    chunk_size (None: per device, see `delta_rule`) and schedule go to `delta_rule`.

    mixer_piece_tokens: when the local shard is longer, the layer runs over it in pieces of this
    many tokens (pieces.py: one autograd.Function, recomputed piece by piece in backward), so
    its activations are O(piece) instead of O(N_local): ~16 KB per token of the shard drop to
    the input, output and their gradients (see README.md). None: never. The default, 16384,
    was chosen by measurement (benchmarks/RESULTS.md, "DeltaNetLM in pieces without turns"):
    in DeltaNetLM steps (checkpointed, 2 ranks) pieces of 4096 / 16384 / 16384 cost 1.08x /
    0.89x / 1.01x the whole shard's CPU at 16K / 32K / 64K tokens per rank, and for the
    layer alone at 128K tokens 16384 costs 0.90x the CPU of 65536 at 0.45x its memory; None
    (or a larger value) keeps short shards whole. Every rank must hold the same N_local (the contiguous layout
    does), so all take the same path.

    >>> layer = DeltaNet(dim=32, num_heads=2)
    >>> layer(torch.randn(1, 50, 32)).shape
    torch.Size([1, 50, 32])
    >>> DeltaNet(32, 2, mixer_piece_tokens=16)(torch.randn(1, 50, 32)).shape  # 4 pieces
    torch.Size([1, 50, 32])
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None,
                 use_short_conv: bool = True, conv_size: int = 4, allow_neg_eigval: bool = False,
                 use_gate: bool = False, *, chunk_size: int | None = None, schedule: str = "scan",
                 norm_eps: float = 1e-5, mixer_piece_tokens: int | None = 16384):
        super().__init__()
        if num_heads < 1 or dim < 1:
            raise ValueError(f"dim={dim}, num_heads={num_heads} must be >= 1")
        pieces = mixer_piece_tokens
        if pieces is not None and (not isinstance(pieces, int) or pieces < 1):
            raise ValueError(f"mixer_piece_tokens={pieces!r} must be a positive integer or None")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; "
                                 f"pass head_dim")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.allow_neg_eigval, self.use_gate = allow_neg_eigval, use_gate
        self.chunk_size, self.schedule, self.norm_eps = chunk_size, schedule, norm_eps
        self.mixer_piece_tokens = mixer_piece_tokens
        self._in_flight = []  # pieces.py's one-way sends not yet settled
        self.halo = conv_size - 1 if use_short_conv else 0  # context rows the conv reads
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        self.convs = nn.ModuleList(
            [ShortConv(inner, conv_size) for _ in range(3)] if use_short_conv else [])
        if use_gate:
            self.a_proj = nn.Linear(dim, num_heads, bias=False)
            # per-head decay rates spread over [1, 16] and time steps over [1e-3, 1e-1]
            self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1, 16).log())
            dt = torch.empty(num_heads).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            self.g_proj = nn.Linear(dim, inner, bias=False)
        self.o_norm = nn.Parameter(torch.ones(head_dim))
        self.o_proj = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H * D] -> [B, H, N, D]"""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _features(self, x: torch.Tensor, context: torch.Tensor):
        """The delta-rule inputs of n tokens x [B, n, dim], given the `self.halo` tokens
        before them, context [B, halo, dim], that the conv reads.
        Returns q, k [B, H, n, Dk], v [B, H, n, Dv], beta and gate (or None) [B, H, n]."""
        if self.convs:  # no bias: the halo's zero rows on rank 0 project to zero
            qkv = [conv.with_context(proj(x), proj(context))  # [B, n, H * D]
                   for conv, proj in zip(self.convs, (self.q_proj, self.k_proj, self.v_proj))]
        else:
            qkv = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]  # each [B, n, H * D]
        q, k, v = (self._heads(F.silu(t)) for t in qkv)  # [B, H, n, D]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [B, H, n]
        if self.allow_neg_eigval:
            beta = beta * 2.0
        gate = None
        if self.use_gate:
            rate = F.softplus(self.a_proj(x) + self.dt_bias)  # [B, n, H]
            gate = (-self.A_log.exp() * rate).transpose(1, 2)  # [B, H, n] log-decay
        return q, k, v, beta, gate

    def _readout(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Delta-rule outputs o [B, H, n, Dv] of the tokens x [B, n, dim] -> y [B, n, dim]."""
        o = F.rms_norm(o, (self.head_dim,), self.o_norm, self.norm_eps)  # [B, H, n, D]
        o = o.transpose(1, 2).flatten(2)  # [B, n, H * D]
        if self.use_gate:
            o = o * F.silu(self.g_proj(x))
        return self.o_proj(o)

    def _mix(self, x: torch.Tensor, context: torch.Tensor, state: torch.Tensor | None = None,
             mesh: Mesh | None = None, check: bool = True, *, global_state: bool = False):
        """The layer on n tokens x [B, n, dim] with their conv context [B, halo, dim].

        state: the delta-rule state before the n tokens [B, H, Dk, Dv] (None: zeros, or the
        state across ranks with a mesh). Returns (y [B, n, dim], the state after the n
        tokens [B, H, Dk, Dv], or None with a mesh unless global_state: then the state after
        the whole sharded sequence, on every rank, from `delta_rule`'s all-reduce)."""
        features = self._features(x, context)  # q, k, v, beta, gate
        # one dtype for all (delta_rule rejects a mix): under autocast the projections come
        # out in bf16 / fp16 and the gate in fp32. The widest of them (and of the state, which
        # leaves in v's dtype: fp32 under autocast) loses nothing, the kernel computes in fp32.
        dtype = state.dtype if state is not None else features[0].dtype
        for t in features:
            if t is not None:
                dtype = torch.promote_types(dtype, t.dtype)
        q, k, v, beta, gate = (t.to(dtype) if t is not None else None for t in features)
        alone = mesh is None or mesh.size == 1
        # the kernel computes in fp32 itself; autocast would lower its matmuls to bf16
        with torch.autocast(x.device.type, enabled=False):
            o, state = delta_rule(q, k, v, beta, mesh=mesh, gate=gate, initial_state=state,
                                  output_final_state=alone or global_state,
                                  chunk_size=self.chunk_size, schedule=self.schedule,
                                  check=check)
        return self._readout(o, x), state

    def forward(self, x: torch.Tensor, mesh: Mesh | None = None, check: bool = True,
                final_state: bool = False):
        """x [B, N_local, dim] -> y [B, N_local, dim].

        check: NaN/inf and, with a mesh, one agreement all-gather per call; False where the
        caller agreed already (DeltaNetLM checks its token shards once per forward).

        final_state: also return what continuing the sequence needs (a prefill), as
        (y, state, conv_tail), both valid on EVERY rank and carrying no gradient:
        state [B, H, Dk, Dv] the delta-rule state after the last token of the whole global
        sequence (fp32; float64 for float64 input), and conv_tail [B, conv_size - 1, dim] the
        last conv_size - 1 rows of the layer input x of the global sequence (zeros before the
        sequence start when it is shorter; [B, 0, dim] without the conv). No extra pass: the
        state is the last rank's chain end state, sent to the others with one all-reduce
        (and the tail with another). The next token x_t [B, 1, dim] then runs on one process
        as `self._mix(x_t, context=conv_tail, state=state)` -> (y_t, next state), with the
        next tail `torch.cat([conv_tail, x_t], 1)[:, 1:]`."""
        if x.dim() != 3:
            raise ValueError(f"DeltaNet expects x [B, N_local, dim], got {tuple(x.shape)}")
        pieces = self.mixer_piece_tokens
        if pieces is not None and x.shape[1] > pieces:
            # unchecked: the halo goes one way inside (no two-way ring_shift, which would
            # make rank 0 wait for the last rank at every layer)
            halo = causal_halo(x, self.halo, mesh) if check else None  # [B, halo, dim]
            y, state = deltanet_in_pieces(self, x, halo, mesh, pieces, check=check,
                                          end_state=True)
            if final_state:
                state = _from_last_rank(state.detach(), mesh)
        else:
            halo = causal_halo(x, self.halo, mesh)  # [B, halo, dim]
            y, state = self._mix(x, halo, mesh=mesh, check=check, global_state=final_state)
        if not final_state:
            return y
        tail = torch.cat([x.new_zeros(x.shape[0], self.halo, x.shape[2]), x.detach()], 1)
        return y, state.detach(), _from_last_rank(tail[:, tail.shape[1] - self.halo:], mesh)


def _from_last_rank(t: torch.Tensor, mesh: Mesh | None) -> torch.Tensor:
    """The last rank's t on every rank of mesh (one all-reduce), t itself on one process."""
    if mesh is None or mesh.size == 1:
        return t
    last = mesh.rank == mesh.size - 1
    return all_reduce(t if last else torch.zeros_like(t), mesh.group, timeout=mesh.timeout)
