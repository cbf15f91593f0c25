"""Exact causal sliding-window attention on a sharded sequence (any layout).

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

Other layouts (`window_layouts.py`): a zigzag rank holds two runs; each gets the W-1 keys
before it from their owners, one message per rank distance. A striped rank holds N/P runs
whose halos together are whole shards, so q/k/v are re-laid out to contiguous (one
all-to-all) and the output sent back.

Locally, query blocks of ~W/2 rows meet their key span (the W-1 keys before the block
through its last query) under a band mask, so time and memory are O(n * W), never O(n^2).
All blocks go to `torch.nn.functional.scaled_dot_product_attention` as one batch (blocks in
the batch dimension, key spans cut by one unfold) with a boolean mask -- on CPU torch's fused
flash kernel (natively GQA), which keeps no probabilities for backward (its inputs, output
and log-sum-exp). So autograd through the kernel, the unfold and the differentiable shifts
gives the exact gradients without a hand-written backward, in time linear in n. Memory: the
unfolded K/V spans are copies, (block + W - 1) / block ~ 3x the local K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqshard.dist import Layout, Mesh, get_layout, ring_shift

from .checks import check_qkv
from .kernels import default_scale, empty_attention, varlen_attention, varlen_ok
from .naive import doc_ids
from .plain import TILE_ROWS
from .window_layouts import MAX_HALO_RUNS, gather_run_halos, relayout

# Query rows per block: max(W // 2, MIN_BLOCK). A row computes block + W - 1 scores of which
# W count, but the fused kernel is slow on short blocks. Provenance: introduced as 256 in
# f860eaa, set to 128 with blocks of W/2 in 68f50fe (2026-11-25); 2-core Xeon CPU VM, D=64,
# W = 128 / 512 / 2048, fwd + bwd: this choice was the fastest or within 5% of it; blocks of
# 2W were up to 2x slower. Used only where the varlen kernel is not (CPU, fp32/fp64 on CUDA).
MIN_BLOCK = 128


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
    get_layout(layout)  # ValueError naming an unknown layout; every layout runs a window
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
    """Boolean [..., nq, nk] from positions q_pos [..., nq] and k_pos [..., nk]: True where
    query position i may read key position j, i - W < j <= i (and the same document when
    `doc`, int64 [N] of document ids, is given)."""
    dist = q_pos[..., :, None] - k_pos[..., None, :]  # [..., nq, nk]
    mask = (dist >= 0) & (dist < window)
    if doc is not None:  # padding positions (< 0, >= N) are masked elsewhere: clamp to look up
        q_doc, k_doc = (doc[p.clamp(0, doc.numel() - 1)] for p in (q_pos, k_pos))
        mask &= q_doc[..., :, None] == k_doc[..., None, :]
    return mask


def _blocks(x: torch.Tensor, front: int, back: int, size: int, step: int) -> torch.Tensor:
    """[B, H, m, D] -> [nb * B, H, size, D]: windows of `size` rows every `step` rows of x
    zero-padded by `front` / `back` rows, block-major (block b of every batch row together).

    Pad, unfold and one copy: their backward is one linear scatter-add. (Slicing x once per
    block would make autograd allocate a full-size zero gradient per block: O(n^2 / block).)
    """
    x = F.pad(x, (0, 0, front, back))  # [B, H, front + m + back, D]
    x = x.unfold(2, size, step)  # [B, H, nb, D, size]
    return x.permute(2, 0, 1, 4, 3).flatten(0, 1)  # [nb * B, H, size, D]


def _block_masks(blocks: range, q_start, halo, block, window, doc, device) -> torch.Tensor:
    """Masks [len(blocks), 1, block, span] of the query blocks `blocks` (see
    `local_window_attention` for the index algebra): the band, the document (when `doc`)
    and no key in the front padding (ranks whose halo is shorter than W - 1)."""
    span = block + window - 1
    b = torch.arange(blocks.start, blocks.stop, device=device)[:, None]  # [nb, 1]
    q_pos = q_start + b * block + torch.arange(block, device=device)  # [nb, block]
    k_pos = q_start - (window - 1) + b * block + torch.arange(span, device=device)  # [nb, span]
    mask = band_mask(q_pos, k_pos, window, doc)
    mask &= (k_pos >= q_start - halo)[:, None, :]
    return mask[:, None]


def _masked_blocks(qt, kt, vt, batch, scale, blocks: range, *mask_args) -> torch.Tensor:
    """The fused kernel on query blocks `blocks` (block-major rows of qt/kt/vt), each with
    its own mask, built here so that it lives only as long as this call."""
    mask = _block_masks(blocks, *mask_args)  # [len(blocks), 1, block, span]
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.repeat_interleave(batch, 0),
                                          scale=scale, enable_gqa=qt.shape[1] != kt.shape[1])

def _segments(n: int, halo: int, q_start: int, doc) -> tuple[list[int], list[int], int]:
    """The window's (query runs, key runs) for one batch row of the varlen kernel: one run
    per document that has queries here (the whole shard without documents).

    Returns (q_cuts, k_cuts, k_first): query run s is rows q_cuts[s]:q_cuts[s+1]; its keys
    are rows k_first + k_cuts[s] .. k_first + k_cuts[s+1] of the halo-extended keys, and end
    where its queries end (so the kernel's bottom-right diagonal is each query's own key).
    Only the first run reaches into the halo, back to its document's start."""
    if doc is None:
        return [0, n], [0, halo + n], 0
    ids = doc[q_start:q_start + n]  # [n]
    q_cuts = [0] + torch.nonzero(ids[1:] != ids[:-1]).flatten().add(1).tolist() + [n]
    # key rows start at global position q_start - halo; the first document's start, clipped
    first = int(torch.searchsorted(doc, ids[0]))  # doc ids ascend along the sequence
    k_first = max(first - (q_start - halo), 0)
    return q_cuts, [0] + [halo + c - k_first for c in q_cuts[1:]], k_first


def _varlen_window(q, k, v, window: int, scale: float, q_start: int, doc) -> torch.Tensor:
    """The local window attention in ONE varlen flash call (CUDA, bf16/fp16): every batch
    row and document is a segment, the window is the kernel's; no mask, no block copies.
    Same arguments and result as `local_window_attention`."""
    (b, hq, n, d), halo = q.shape, k.shape[2] - q.shape[2]
    q_cuts, k_cuts, k_first = _segments(n, halo, q_start, doc)
    m = k.shape[2] - k_first  # key rows per batch row that some query can see
    cu_q = torch.tensor([r * n + c for r in range(b) for c in q_cuts[:-1]] + [b * n],
                        dtype=torch.int32).to(q.device)
    cu_k = torch.tensor([r * m + c for r in range(b) for c in k_cuts[:-1]] + [b * m],
                        dtype=torch.int32).to(q.device)
    max_q = max(x - y for x, y in zip(q_cuts[1:], q_cuts))
    max_k = max(x - y for x, y in zip(k_cuts[1:], k_cuts))
    qp = q.transpose(1, 2).reshape(b * n, hq, d)  # [B n, Hq, D]
    kp, vp = (x[:, :, k_first:].transpose(1, 2).reshape(b * m, x.shape[1], x.shape[3])
              for x in (k, v))  # [B m, Hkv, D]
    out = varlen_attention(qp, kp, vp, cu_q, cu_k, max_q, max_k, causal=True, window=window,
                           scale=scale)
    return out.unflatten(0, (b, n)).transpose(1, 2)  # [B, Hq, n, D]


def local_window_attention(q, k, v, window: int, scale: float, q_start: int = 0,
                           doc=None, block: int | None = None) -> torch.Tensor:
    """Causal sliding-window attention of queries against keys that end with their own.

    q [B, Hq, n, D] at global positions q_start .. q_start+n-1; k, v [B, Hkv, m, D] with
    halo = m - n <= W - 1 at global positions q_start-halo .. q_start+n-1. Returns out like q.

    Query block b (rows b*block .. +block, default block max(W // 2, MIN_BLOCK)) meets keys
    q_start-(W-1)+b*block .. +span, span = block+W-1: k is padded with W-1-halo zero rows in
    front (masked) and up to the next block at the end (seen only by padding queries, whose
    rows are dropped), so query row a of any block reads span key c iff a <= c <= a+W-1.
    The blocks go to the fused kernel batched (one call for the blocks that share the band
    mask, one per tile of ~TILE_ROWS queries for blocks with masks of their own: the first
    ones, whose spans reach into the front padding, or all of them with documents): time
    and memory O(n (block + W)), masks O(TILE_ROWS span) at a time. On CUDA in bf16/fp16
    the whole shard is one varlen flash call instead (`_varlen_window`).
    """
    if varlen_ok(q, k):
        return _varlen_window(q, k, v, window, scale, q_start, None if doc is None else doc.cpu())
    doc = None if doc is None else doc.to(q.device)
    (b, hq, n, d), halo = q.shape, k.shape[2] - q.shape[2]
    block = max(window // 2, MIN_BLOCK) if block is None else block
    n_blocks, span = -(-n // block), block + window - 1
    back = n_blocks * block - n
    qb = _blocks(q, 0, back, block, block)  # [nb * B, Hq, block, D]
    kb, vb = (_blocks(x, window - 1 - halo, back, span, block) for x in (k, v))  # [nb*B, Hkv, span, D]
    front = window - 1 - halo  # padding keys before the halo: never visible
    # blocks < head have masks of their own (all of them with documents); the others share
    # one band [block, span]. Own masks are built a tile of blocks at a time (~TILE_ROWS
    # queries), so their int64 position algebra (8 bytes a pair) never spans the shard: the
    # kernel keeps only each tile's boolean mask for backward (rebuilding it there would
    # need a hand-written backward; checkpointing it measured 3x slower on CPU).
    head = n_blocks if doc is not None else min(n_blocks, -(-front // block))
    per_tile = max(1, TILE_ROWS // block)
    tiles = [range(a, min(a + per_tile, head)) for a in range(0, head, per_tile)]
    if head < n_blocks:
        tiles.append(range(head, n_blocks))  # the shared band: one call
    # split, not slices: the backward of one split is one concatenation, where every slice
    # would get a zero gradient of the whole unfolded tensor
    sizes = [len(t) * b for t in tiles]  # block-major batch rows
    mask_args = (q_start, halo, block, window, doc, q.device)
    outs = []
    for blocks, qt, kt, vt in zip(tiles, *(x.split(sizes) for x in (qb, kb, vb))):
        if blocks.start >= head:
            tail_mask = _block_masks(range(head, head + 1), *mask_args)[0, 0]  # [block, span]
            outs.append(F.scaled_dot_product_attention(qt, kt, vt, attn_mask=tail_mask,
                                                       scale=scale, enable_gqa=hq != k.shape[1]))
            continue
        outs.append(_masked_blocks(qt, kt, vt, b, scale, blocks, *mask_args))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [nb * B, Hq, block, D]
    out = out.unflatten(0, (n_blocks, b)).permute(1, 2, 0, 3, 4)  # [B, Hq, nb, block, D]
    return out.reshape(b, hq, n_blocks * block, d)[:, :, :n]


def window_attention(q, k, v, mesh: Mesh | None = None, *, window: int,
                     scale: float | None = None, doc_lens=None,
                     block: int | None = None, layout: str | Layout = "contiguous") -> torch.Tensor:
    """Causal sliding-window attention over a sharded sequence.

    q [B, Hq, n, D]; k, v [B, Hkv, n, D] (Hq % Hkv == 0): this rank's shard, placed by
    `layout`, of a global sequence of N = n * P tokens. Token t reads keys t-W+1 .. t
    (W = `window`, the token itself included). Returns out [B, Hq, n, D]. Usually reached
    through `sharded_attention(q, k, v, mesh, causal=True, window=W, layout=...)`, which
    checks the inputs. doc_lens: packed document lengths over the global sequence. block:
    query rows per local block (default max(W // 2, MIN_BLOCK)); any value gives the same
    result. Contiguous: the halo hops above. A few runs per rank (zigzag): each run's halo
    from its owners (`window_layouts.gather_run_halos`). Many runs (striped): re-laid out
    to contiguous and back (`seqshard.dist.relayout`).

    Example (one process):

    >>> q, k, v = (torch.randn(2, 4, 100, 48, requires_grad=True) for _ in range(3))
    >>> out = window_attention(q, k, v, None, window=16)
    >>> out.sum().backward()
    """
    check_qkv(q, k, v)
    mesh = Mesh.single(q.device) if mesh is None else mesh
    window = check_window(window, causal=True, layout=layout, strategy="auto",
                          world=mesh.size)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block={block!r} must be a positive integer")
    if q.numel() == 0:  # B, n or D = 0 (on every rank: they hold equal shapes)
        return empty_attention(q, k, v)
    n = q.shape[2]
    seq_len = n * mesh.size
    layout = get_layout(layout)
    if mesh.size > 1:
        layout.check(seq_len, mesh.size)
    # W >= N is plain causal attention: W = N gives it too, and sizes the blocks by N, not W
    window = min(window, seq_len)
    doc = None if doc_lens is None else doc_ids(doc_lens, seq_len)  # int64 [N], host
    scale = default_scale(q.shape[-1], scale)
    if mesh.size == 1 or layout.name == "contiguous":
        return _contiguous(q, k, v, mesh, window, scale, doc, block)
    runs = layout.runs(seq_len, mesh.rank, mesh.size)
    if len(runs) > MAX_HALO_RUNS:  # striped: see window_layouts.py for why not halos
        contiguous = get_layout("contiguous")
        hq, hkv = q.shape[1], k.shape[1]
        # one layout move for q, k and v: heads side by side [B, Hq + 2 Hkv, n, D]
        qkv = relayout(torch.cat((q, k, v), dim=1), mesh, layout, contiguous)
        q, k, v = qkv.split((hq, hkv, hkv), dim=1)
        out = _contiguous(q, k, v, mesh, window, scale, doc, block)  # [B, Hq, n, D]
        return relayout(out, mesh, contiguous, layout)
    halos = gather_run_halos(k, v, mesh, layout, window)  # per run [2, B, Hkv, h, D]
    outs, offset = [], 0
    for (start, length), halo in zip(runs, halos):
        rows = slice(offset, offset + length)
        k_run, v_run = (torch.cat((h, x[:, :, rows]), dim=2) for h, x in zip(halo, (k, v)))
        outs.append(local_window_attention(q[:, :, rows], k_run, v_run, window, scale,
                                           q_start=start, doc=doc, block=block))
        offset += length
    return torch.cat(outs, dim=2)  # [B, Hq, n, D]


def _contiguous(q, k, v, mesh: Mesh, window: int, scale: float, doc, block) -> torch.Tensor:
    """The window on a contiguous shard: halo hops, then the local kernel."""
    k_halo, v_halo = gather_halo(k, v, mesh, window)  # [B, Hkv, h, D]
    if k_halo.shape[2] or mesh.size > 1:
        k, v = torch.cat((k_halo, k), dim=2), torch.cat((v_halo, v), dim=2)  # [B, Hkv, h+n, D]
    return local_window_attention(q, k, v, window, scale, q_start=mesh.rank * q.shape[2],
                                  doc=doc, block=block)
