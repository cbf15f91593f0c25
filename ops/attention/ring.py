"""The ring loop, written once.

Each rank keeps its queries; key/value blocks travel around a ring of R ranks. At step s a
rank holds the keys of ring rank (r - s) mod R and computes the blocks that the plan for that
step lists, merging partial outputs exactly by their log-sum-exp. The next K/V send/receive is
posted *before* the current blocks are computed, so communication hides behind compute.

Backward (flash-attention style, no probabilities stored): every block is recomputed from the
saved final output and LSE. K/V travel the same way as in the forward; the dK/dV accumulator
of the block a rank is holding travels one hop behind it, so after R hops every accumulator
is back at its owner holding the sum over all ranks' queries.

Ring, Ulysses (R = 1 after the all-to-all), the 2-D hybrid and all-gather-KV (R = 1 after the
gather) all run through `ring_attention`; only their plans differ.
"""

from __future__ import annotations

import torch

from seqshard.dist import RingComm

from .kernels import block_backward, block_forward, merge_into


def _add_rows(acc, part, rows: slice, n: int):
    """acc[..., rows, :] += part, allocating acc only when part does not cover all n rows.

    A block covering every row (the common case) becomes the accumulator itself: no zeros,
    no copy, one full-size buffer less at the memory peak.
    """
    if acc is None:
        if rows == slice(0, n):
            return part
        acc = torch.zeros(part.shape[:2] + (n,) + part.shape[3:], dtype=part.dtype,
                          device=part.device)
    acc[:, :, rows] += part
    return acc


def _ring_fwd(q, k, v, plans, scale, group, timeout):
    # q [B, Hq, nq, D]; k, v [B, Hkv, nk, D]; plans[s]: pieces against ring rank (r - s) % R
    comm = RingComm(group, timeout)
    nq = q.shape[2]
    out = lse = None  # fp32 [B, Hq, nq, D] and [B, Hq, nq], merged exactly by log-sum-exp
    for step in range(comm.size):
        last = step + 1 == comm.size
        if not last:
            pending = comm.post(k, v)  # the next block travels while this one is used
        for p in plans[step]:
            o_blk, lse_blk = block_forward(q[:, :, p.q_slice], k[:, :, p.k_slice],
                                           v[:, :, p.k_slice], p.kind, scale, p.mask)
            if out is None and p.q_slice == slice(0, nq):
                out, lse = o_blk.float(), lse_blk
                continue
            if out is None:
                out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
                lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32,
                                 device=q.device)
            merge_into(out[:, :, p.q_slice], lse[:, :, p.q_slice], o_blk, lse_blk)
        if not last:
            k, v = pending.wait()
    if out is None:  # a plan with no blocks at all: nothing to attend to
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    return out.to(q.dtype), lse


def _ring_bwd(do, q, k, v, out, lse, plans, scale, group, timeout):
    comm = RingComm(group, timeout)
    nq, nk = q.shape[2], k.shape[2]
    dq = None
    grads = None  # Pending dK/dV accumulators travelling one hop behind K/V
    for step in range(comm.size):
        last = step + 1 == comm.size
        if not last:
            pending_kv = comm.post(k, v)
        dk = dv = None  # fp32 [B, Hkv, nk, D] accumulators for the block held now
        if grads is not None:
            # what the previous ranks accumulated for this block; waiting now (the neighbour
            # finished the previous step too) frees our last send before new grads exist
            dk, dv = grads.wait()
        for p in plans[step]:
            qs, ks = p.q_slice, p.k_slice
            g_q, g_k, g_v = block_backward(do[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks],
                                           out[:, :, qs], lse[:, :, qs], p.kind, scale, p.mask)
            dq = _add_rows(dq, g_q, qs, nq)
            dk, dv = _add_rows(dk, g_k, ks, nk), _add_rows(dv, g_v, ks, nk)
            del g_q, g_k, g_v
        if dk is None:
            dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        grads = comm.post(dk, dv)  # after R hops it arrives at the block's owner
        del dk, dv
        if not last:
            k, v = pending_kv.wait()
    dk, dv = grads.wait()
    if dq is None:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, scale, group, timeout):
        out, lse = _ring_fwd(q, k, v, plans, scale, group, timeout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plans, scale, group, timeout)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_bwd(do.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q, k, v, plans, scale: float, group=None, timeout=None) -> torch.Tensor:
    """Attention of local queries against K/V blocks passed around `group`'s ring.

    q [B, Hq, nq, D]; k, v [B, Hkv, nk, D] (this rank's blocks; every rank's k has the same
    shape); plans: R lists of `plan.Piece`, plans[s] for the keys of ring rank (r - s) mod R.
    Returns out [B, Hq, nq, D]. group None = one process (R = 1). Example (one process):

    >>> from seqshard.ops.attention.plan import Piece
    >>> q = k = v = torch.randn(1, 2, 6, 32)
    >>> out = ring_attention(q, k, v, [[Piece(0, 6, 0, 6, "causal")]], scale=32 ** -0.5)
    """
    if len(plans) != RingComm(group).size:
        raise ValueError(f"got {len(plans)} step plans for a ring of {RingComm(group).size} ranks")
    return _RingAttention.apply(q, k, v, plans, scale, group, timeout)
