"""Exact causal sliding-window attention on a contiguously sharded sequence.

Convention: a window of W tokens *includes the token itself*. Token t attends to keys
t-W+1 .. t (those that exist): W = 1 sees only itself, W >= N is plain causal attention.
With packed documents (`doc_lens`) a token sees the last W tokens of its own document.

Across ranks (contiguous layout, rank r holds global tokens r*n .. r*n+n-1): a rank's queries
need only its own keys and the W-1 keys before its shard -- the "halo". The halo comes from
the previous ranks' tails by point-to-point shifts: hop j brings the last L_j tokens of rank
r-j (L_j = n for every hop but the last), so ceil((W-1)/n) hops, capped at P-1, move exactly
the W-1 tokens a rank needs. We chose hops over an all-gather of tails because an all-gather
moves and stores P tails on every rank (O(P * min(W, n)) per rank); the hops move only the
halo, and for the usual W <= n there is one hop. K and V travel stacked (one message per
hop). The shifts are cyclic (`seqshard.dist.ring_shift`): the first ranks receive a wrapped
tail they do not need. They still take part and slice it away, so every rank runs the same
collectives in forward and backward (the backward of a shift sends the halo's dK/dV home).

Locally, queries are taken in blocks of ~W rows against their key span (the W-1 keys before
the block through its last query, ~2W keys) under a band mask, so time and memory are
O(n * W), never O(n^2). Each block is `torch.nn.functional.scaled_dot_product_attention` with
a boolean mask -- on CPU it runs torch's fused flash kernel (natively GQA), which saves only
the block's output and log-sum-exp for backward, so autograd through the blocks and the
differentiable shifts gives the exact gradients without a hand-written backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqshard.dist import Mesh, get_layout, ring_shift

from .kernels import default_scale
from .naive import doc_ids

MIN_BLOCK = 256  # query rows per block for small windows: fewer, larger kernel calls


def check_window(window, *, causal: bool, layout, strategy: str, world: int) -> int:
    """Validate the window options of `sharded_attention`; returns the window as an int."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be a positive integer (tokens seen, "
                         f"including the token itself)")
    if not causal:
        raise ValueError(f"window={window} needs causal=True (got causal={causal}): "
                         f"only the causal sliding window is implemented")
    if strategy != "auto":
        raise ValueError(f"window={window} has one algorithm (a halo exchange with the "
                         f"previous ranks); pass strategy='auto', got strategy={strategy!r}")
    name = get_layout(layout).name
    if world > 1 and name != "contiguous":
        raise ValueError(f"window={window} needs layout='contiguous' when sharded over "
                         f"{world} ranks, got layout={name!r}")
    return int(window)


def halo_lengths(window: int, n_local: int, world: int) -> list[int]:
    """Tokens hop j (j = 1, 2, ...) brings from rank r - j: full shards, then the rest.

    Their sum is min(W - 1, n * (P - 1)): no rank ever needs more than all earlier shards.
    """
    need = min(window - 1, n_local * (world - 1))
    return [min(n_local, need - j * n_local) for j in range(-(-need // n_local))]


def gather_halo(k: torch.Tensor, v: torch.Tensor, mesh: Mesh, window: int):
    """The keys/values of the (up to) W-1 global positions just before this rank's shard.

    k, v [B, Hkv, n, D] -> k_halo, v_halo [B, Hkv, h, D] with h = min(W-1, rank * n),
    oldest first. Differentiable: dK/dV of the halo flow back to the ranks that own it.
    """
    n = k.shape[2]
    pieces = []
    for hop, length in enumerate(halo_lengths(window, n, mesh.size), start=1):
        tail = torch.stack((k[:, :, n - length:], v[:, :, n - length:]))  # [2, B, Hkv, L, D]
        pieces.append(ring_shift(tail, mesh.group, hop, timeout=mesh.timeout))
    if not pieces:
        return k[:, :, :0], v[:, :, :0]
    halo = torch.cat(pieces[::-1], dim=3)  # [2, B, Hkv, H, D]: rank r-J's tail ... rank r-1
    # ranks r < J got wrapped tails from the end of the sequence for hops j > r: drop them
    # (slicing keeps them in the graph, so the backward shifts still run on every rank)
    valid = min(halo.shape[3], mesh.rank * n)
    halo = halo[:, :, :, halo.shape[3] - valid:]
    return halo[0], halo[1]


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, doc=None) -> torch.Tensor:
    """Boolean [nq, nk], True where query position i may read key position j:
    i - W < j <= i (and the same document when `doc`, int64 [N] of document ids, is given)."""
    dist = q_pos[:, None] - k_pos[None, :]  # [nq, nk]
    mask = (dist >= 0) & (dist < window)
    if doc is not None:
        mask &= doc[q_pos][:, None] == doc[k_pos][None, :]
    return mask


def local_window_attention(q, k, v, window: int, scale: float, q_start: int = 0,
                           doc=None, block: int | None = None) -> torch.Tensor:
    """Causal sliding-window attention of queries against keys that end with their own.

    q [B, Hq, n, D] at global positions q_start .. q_start+n-1; k, v [B, Hkv, m, D] (m >= n)
    at global positions q_start-(m-n) .. q_start+n-1. Returns out [B, Hq, n, D].
    Query blocks of `block` rows (default max(W, MIN_BLOCK)) meet only their key span.
    """
    n, halo = q.shape[2], k.shape[2] - q.shape[2]
    block = max(window, MIN_BLOCK) if block is None else block
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        # keys: the W-1 before the block's first query through its last query
        s0, s1 = max(0, halo + i0 - window + 1), halo + i1
        q_pos = torch.arange(q_start + i0, q_start + i1, device=q.device)
        k_pos = torch.arange(q_start - halo + s0, q_start - halo + s1, device=q.device)
        mask = band_mask(q_pos, k_pos, window, doc)  # [nq, nk]; every row sees itself
        outs.append(F.scaled_dot_product_attention(
            q[:, :, i0:i1], k[:, :, s0:s1], v[:, :, s0:s1], attn_mask=mask, scale=scale,
            enable_gqa=gqa))  # [B, Hq, nq, D]
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def window_attention(q, k, v, mesh: Mesh | None = None, *, window: int,
                     scale: float | None = None, doc_lens=None,
                     block: int | None = None) -> torch.Tensor:
    """Causal sliding-window attention over a contiguously sharded sequence.

    q [B, Hq, n, D]; k, v [B, Hkv, n, D] (Hq % Hkv == 0): this rank's contiguous shard of a
    global sequence of N = n * P tokens. Token t reads keys t-W+1 .. t (W = `window`, the
    token itself included). Returns out [B, Hq, n, D]. Usually reached through
    `sharded_attention(q, k, v, mesh, causal=True, window=W)`, which checks the inputs.
    doc_lens: packed document lengths over the global sequence. block: query rows per
    local block (default max(W, MIN_BLOCK)); any value gives the same result.

    Example (one process):

    >>> q, k, v = (torch.randn(2, 4, 100, 48, requires_grad=True) for _ in range(3))
    >>> out = window_attention(q, k, v, None, window=16)
    >>> out.sum().backward()
    """
    mesh = Mesh.single(q.device) if mesh is None else mesh
    window = check_window(window, causal=True, layout="contiguous", strategy="auto",
                          world=mesh.size)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block={block!r} must be a positive integer")
    n = q.shape[2]
    if n == 0:
        raise ValueError(f"window attention needs local tokens, got q of shape {tuple(q.shape)}")
    doc = None if doc_lens is None else doc_ids(doc_lens, n * mesh.size, q.device)
    k_halo, v_halo = gather_halo(k, v, mesh, window)  # [B, Hkv, h, D]
    if k_halo.shape[2] or mesh.size > 1:
        k, v = torch.cat((k_halo, k), dim=2), torch.cat((v_halo, v), dim=2)  # [B, Hkv, h+n, D]
    return local_window_attention(q, k, v, window, default_scale(q.shape[-1], scale),
                                  q_start=mesh.rank * n, doc=doc, block=block)
