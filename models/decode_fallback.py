"""A stand-in for `seqshard.ops.attention.decode.decode_attention` until that op lands (the
models call whichever exists; see `layers.decode_attention`). Same signature and contract:

    decode_attention(q, k_cache, v_cache, key_positions, query_positions, mesh, *,
                     scale=None, window=None) -> out [B, Hq, T, D]

q [B, Hq, T, D] replicated; k_cache, v_cache [B, Hkv, S_local, D] this rank's shard (S_local
may be 0), key_positions int64 [S_local], query_positions [T]. Causal (key <= query), and
with a window key > query - W. Each rank attends over its shard with the readable reference,
then one all-gather of (out, lse) and a log-sum-exp merge in rank order give every rank the
same exact result. Inference only.
"""

from __future__ import annotations

import torch

from seqshard.dist import Mesh, all_gather
from seqshard.ops.attention.naive import naive_attention


def decode_attention(q, k_cache, v_cache, key_positions, query_positions, mesh: Mesh, *,
                     scale=None, window=None):
    allowed = key_positions[None, :] <= query_positions[:, None]  # [T, S_local]
    if window is not None:
        allowed &= key_positions[None, :] > query_positions[:, None] - window
    out, lse = naive_attention(q, k_cache, v_cache, scale=scale, mask=allowed)
    out = out.float()  # [B, Hq, T, D]; lse [B, Hq, T]
    if mesh.size > 1:
        outs = all_gather(out[None], 0, mesh.group, timeout=mesh.timeout)  # [P, B, Hq, T, D]
        lses = all_gather(lse[None], 0, mesh.group, timeout=mesh.timeout)  # [P, B, Hq, T]
        top = lses.max(0).values  # [B, Hq, T]; finite: the query sees at least itself
        weights = torch.exp(lses - top)  # [P, B, Hq, T]; a rank with no visible key gets 0
        out = (weights[..., None] * outs).sum(0) / weights.sum(0)[..., None]
    return out.to(q.dtype)
