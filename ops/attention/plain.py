"""The plain-torch block kernel: any device and dtype, in query tiles.

It runs where no fused kernel does (float64 on CUDA, empty blocks, a torch without the
private kernels). Scores are computed for TILE_ROWS queries at a time, and each tile's mask is
built from the block kind on the fly, so a block never holds more than one tile x keys of
fp32 scores (never the whole [nq, nk] block).

Kinds: 'full' (every query sees every key), 'causal' (query i sees keys j <= i) and 'strict'
(j < i); the diagonal is top-left aligned, as in the fused CPU kernel.
"""

from __future__ import annotations

import torch

# Query rows per tile: scores take TILE_ROWS * nk * 4 bytes per (batch, head), e.g. 64 MiB
# for 16 heads at 16K keys; large enough that a tile's matmuls stay efficient. Provenance:
# commit dc8e869 (2026-11-29), sized by that memory bound; the value itself was not tuned.
# window.py builds its own-mask blocks one tile of ~TILE_ROWS queries at a time (b88e97c,
# 2-core Xeon CPU VM, 16K tokens, W=1024, 16 documents: peak rise 321 -> 295 MiB, CPU fwd+bwd
# 1.68 -> 1.49 s against masks built for the whole shard).
TILE_ROWS = 256

KINDS = {"full": None, "causal": 0, "strict": -1}  # key j visible from query i iff j - i <= this


def check_kind(kind: str) -> int | None:
    """The diagonal offset of a block kind (None: no diagonal); ValueError on unknown kinds."""
    if kind not in KINDS:
        raise ValueError(f"block kind {kind!r} must be one of {tuple(KINDS)}")
    return KINDS[kind]


def tile_mask(kind: str, rows: slice, nk: int, device) -> torch.Tensor | None:
    """Boolean [len(rows), nk] of one query tile (True = may attend); None for 'full'."""
    reach = check_kind(kind)
    if reach is None:
        return None
    i = torch.arange(rows.start, rows.stop, device=device)[:, None]  # [t, 1]
    j = torch.arange(nk, device=device)[None, :]  # [1, nk]
    return j - i <= reach


def _tiles(nq: int):
    return [slice(a, min(a + TILE_ROWS, nq)) for a in range(0, nq, TILE_ROWS)]


def _scores(q, k, scale, mask):
    s = scale * (q.float() @ k.float().transpose(-1, -2))  # [B, H, t, nk]
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _weights(s, lse):
    # rows that see no key in this block: lse -inf, weights 0 (not NaN)
    return torch.exp(s - lse.masked_fill(lse.isinf(), 0.0).unsqueeze(-1))


def plain_forward(q, k, v, kind: str, scale: float):
    """q [B, H, nq, D], k/v [B, H, nk, D] (heads already expanded) -> (out in q's dtype,
    lse [B, H, nq] fp32)."""
    out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    vf = v.float()
    for rows in _tiles(q.shape[2]):
        s = _scores(q[:, :, rows], k, scale, tile_mask(kind, rows, k.shape[2], q.device))
        lse[:, :, rows] = torch.logsumexp(s, dim=-1)
        out[:, :, rows] = (_weights(s, lse[:, :, rows]) @ vf).to(q.dtype)
    return out, lse


def plain_backward(do, q, k, v, o, lse, kind: str, scale: float):
    """Gradients of one block from the FINAL o and lse of its query rows (so P is this
    block's share of the whole softmax); delta = rowsum(dO * O). Returns fp32 (dq, dk, dv)
    with the heads of q (the caller folds GQA)."""
    kf, vf = k.float(), v.float()
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for rows in _tiles(q.shape[2]):
        qt, dot = q[:, :, rows].float(), do[:, :, rows].float()
        s = _scores(qt, kf, scale, tile_mask(kind, rows, k.shape[2], q.device))
        p = _weights(s, lse[:, :, rows])  # [B, H, t, nk]
        delta = (dot * o[:, :, rows].float()).sum(-1, keepdim=True)  # [B, H, t, 1]
        dv += p.transpose(-1, -2) @ dot
        ds = p * (dot @ vf.transpose(-1, -2) - delta)
        dq[:, :, rows] = scale * (ds @ kf)
        dk += scale * (ds.transpose(-1, -2) @ qt)
    return dq, dk, dv
