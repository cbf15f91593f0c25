"""The ring loop, written once.

Each rank keeps its queries; key/value blocks travel around a ring of R ranks. At step s a
rank holds the keys of ring rank (r - s) mod R and computes the blocks that the plan for that
step lists, merging partial outputs exactly by their log-sum-exp. The next K/V send/receive is
posted *before* the current blocks are computed, so communication hides behind compute.

Backward (flash-attention style, no probabilities stored): every block is recomputed from the
saved final output and LSE. Memory, not time, shapes it: a rank's floor is its inputs, output
and gradients, and anything held on top of that is what sharding must keep small. So the
same steps run with the roles of the pair made explicit -- at step s rank r fetches rank
r - s's K/V and sends that rank its dK/dV share directly -- and each remote block streams in
head groups (heads are independent): one group's K/V in use, the next one arriving, one
group's contribution on its way back. Neither a whole remote block nor a full-size
accumulator travelling one hop behind (the textbook ring backward) is ever held: at P = 2,
N = 16K that cut the per-rank peak from 0.72x to about 0.51x of single-process SDPA.

Ring, Ulysses (R = 1 after the all-to-all), the 2-D hybrid and all-gather-KV (R = 1 after the
gather) all run through `ring_attention`; only their plans differ. For Ulysses and the hybrid
the all-to-all to head shards happens inside it, per head group (`a2a_group`), so neither
pass ever holds every head's full-sequence tensors: the backward redoes a group's
all-to-all instead of saving all of them (at P = 2, N = 16K: 0.77x -> 0.58x of SDPA).
"""

from __future__ import annotations

import torch

from seqshard.dist import RingComm, exchange, heads_to_seq, seq_to_heads

from .blocks import plan_backward, plan_forward


def _ring_fwd(q, k, v, plans, scale, group, timeout):
    # q [B, Hq, nq, D]; k, v [B, Hkv, nk, D]; plans[s]: pieces against ring rank (r - s) % R
    comm = RingComm(group, timeout)
    out = lse = None  # fp32 [B, Hq, nq, D] and [B, Hq, nq], merged exactly by log-sum-exp
    for step in range(comm.size):
        last = step + 1 == comm.size
        if not last:
            pending = comm.post(k, v)  # the next block travels while this one is used
        out, lse = plan_forward(q, k, v, plans[step], scale, out, lse)
        if not last:
            k, v = pending.wait()
    if out is None:  # a plan with no blocks at all: nothing to attend to
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    return out.to(q.dtype), lse


# K/V heads are independent, so the memory-heavy stages -- the backward's remote blocks and
# the Ulysses all-to-all -- stream about this many head groups, holding one group at a time.
# Provenance: commit 5f118d3 (2026-11-25); the value 4 was not tuned. Its effect, measured on
# the 2-core Xeon CPU VM (commit 916d8fc, N = 16K, P = 2, B=1 H=4 D=64 fp32, causal fwd+bwd):
# per-rank peak of ring 105 -> 74.9 MiB, Ulysses 113 -> 85.1 MiB, Ulysses' CPU time +1% at 16K
# and +11% at 4K (benchmarks/RESULTS.md, "Attention").
HEAD_GROUPS = 4
# ... but the Ulysses stage only once a rank's K block is this large: below it the group's
# extra all-to-alls cost more time than the memory they save. Provenance: commit 229ca23
# (2026-11-25), 2-core Xeon CPU VM, 2 gloo ranks: at N = 512, 4 head groups made Ulysses 2.4x
# DeepSpeed's time; at N = 16K they were time-neutral (the commit records no other shape
# field). Only those two N were measured; no other threshold was tried.
STREAM_MIN_BYTES = 4 << 20
# The planner (launch/perf/planner.py) counts messages and buffers with these constants and
# with `head_slices` / `head_groups` below, so the rule lives here only.


def head_slices(batch: int, kv_heads: int, parts: int) -> list[tuple[int, int, int]]:
    """(b, h0, h1) groups of K/V heads, about `parts` in all, never across a batch element
    (so a group of a contiguous [B, H, n, D] tensor is one contiguous message)."""
    per = min(kv_heads, -(-batch * kv_heads // parts))
    return [(b, h, min(h + per, kv_heads)) for b in range(batch) for h in range(0, kv_heads, per)]


def _ring_bwd(do, q, k, v, out, lse, plans, scale, group, timeout):
    """Gradients, streaming remote K/V head group by head group (see the module docstring).

    At step s rank r needs the K/V of rank r - s and owes that rank their dK/dV share: both
    go point to point between the pair, one head group at a time, so a rank holds one
    group's K/V (plus the next one arriving) and one group's contribution, never a whole
    remote block or a travelling full-size accumulator. Remote steps come first, so the
    step-1 contributions land directly in this rank's dK/dV (no receive buffer, no zeros).
    """
    comm = RingComm(group, timeout)
    size, rank = comm.size, comm.rank
    if size == 1:  # nothing travels: the kernel's own outputs become the accumulators
        dq, dk, dv = plan_backward(do, q, k, v, out, lse, plans[0], scale, None, None, None)
        zeros = lambda t: torch.zeros(t.shape, dtype=torch.float32, device=t.device)  # noqa: E731
        return (zeros(q) if dq is None else dq, zeros(k) if dk is None else dk,
                zeros(v) if dv is None else dv)
    group_q = q.shape[1] // k.shape[1]  # query heads per K/V head
    ticks = [(s, sl) for s in list(range(1, size)) + [0]
             for sl in head_slices(k.shape[0], k.shape[1], HEAD_GROUPS)]
    kv_part = lambda t, sl: t[sl[0]:sl[0] + 1, sl[1]:sl[2]]  # noqa: E731  [1, h, nk, D]
    q_part = lambda t, sl: t[sl[0]:sl[0] + 1, sl[1] * group_q:sl[2] * group_q]  # noqa: E731
    peer = lambda s: ((rank + s) % size, (rank - s) % size)  # noqa: E731 (to, from)

    def fetch(tick):  # send my K/V group to rank r + s, receive rank r - s's
        s, sl = tick
        sends = [(kv_part(t, sl), peer(s)[0]) for t in (k, v)]
        # fresh contiguous buffers: empty_like would copy a transposed K's strides
        recvs = [(torch.empty(kv_part(t, sl).shape, dtype=t.dtype, device=t.device), peer(s)[1])
                 for t in (k, v)]
        return exchange(sends, recvs, group, timeout=timeout, op="ring_attention backward")

    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.zeros(q.shape, **f32)
    dk, dv = torch.empty(k.shape, **f32), torch.empty(v.shape, **f32)
    pending = fetch(ticks[0])
    for i, (s, sl) in enumerate(ticks):
        part = [q_part(t, sl) for t in (do, q)]
        rest = [q_part(t, sl) for t in (out, lse)]
        if s == 0:  # local step last: add straight into dK/dV (already hold remote shares)
            plan_backward(*part, kv_part(k, sl), kv_part(v, sl), *rest, plans[0], scale,
                                 q_part(dq, sl), kv_part(dk, sl), kv_part(dv, sl))
            continue
        k_blk, v_blk = pending.wait()
        if ticks[i + 1][0] != 0:
            pending = fetch(ticks[i + 1])  # the next group travels while this one computes
        _, g_k, g_v = plan_backward(*part, k_blk, v_blk, *rest, plans[s], scale,
                                           q_part(dq, sl), None, None)
        del k_blk, v_blk
        g_k = torch.zeros(kv_part(k, sl).shape, **f32) if g_k is None else g_k
        g_v = torch.zeros_like(g_k) if g_v is None else g_v
        # my share goes to the block's owner r - s; my own block's share comes from r + s
        direct = s == 1
        into = [kv_part(t, sl) if direct else torch.empty_like(kv_part(t, sl)) for t in (dk, dv)]
        exchange([(g_k, peer(s)[1]), (g_v, peer(s)[1])], [(t, peer(s)[0]) for t in into],
                 group, timeout=timeout, op="ring_attention backward").wait()
        del g_k, g_v
        if not direct:
            kv_part(dk, sl).add_(into[0])
            kv_part(dv, sl).add_(into[1])
    return dq, dk, dv


# --- the Ulysses stage: all-to-all to head shards around the loop, one head group at a time --
def head_groups(kv_heads: int, degree: int, k_bytes: int) -> int:
    """How many head groups stream through the Ulysses stage: the largest divisor of the
    K/V heads each rank gets (kv_heads / degree) up to HEAD_GROUPS (whole GQA groups); one
    while a rank's K block (k_bytes, the same before and after the all-to-all) is under
    STREAM_MIN_BYTES."""
    if k_bytes < STREAM_MIN_BYTES:
        return 1
    per_rank = kv_heads // degree
    return max(d for d in range(1, min(per_rank, HEAD_GROUPS) + 1) if per_rank % d == 0)


def _heads(t, j: int, groups: int):
    """Head group j of `groups` of t [B, H, ...] (a view)."""
    h = t.shape[1] // groups
    return t[:, j * h:(j + 1) * h]


def _ulysses_fwd(q, k, v, plans, scale, group, timeout, a2a, groups):
    # per group: [B, H/G, n, D] -> all-to-all -> [B, H/(G u), u n, D] -> the loop -> back
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lses = []
    for j in range(groups):
        qg, kg, vg = (seq_to_heads(_heads(t, j, groups), a2a, timeout=timeout) for t in (q, k, v))
        og, lse = _ring_fwd(qg, kg, vg, plans, scale, group, timeout)
        del qg, kg, vg
        _heads(out, j, groups).copy_(heads_to_seq(og, a2a, timeout=timeout))
        lses.append(lse)  # [B, H/(G u), u n]: all that is kept per group besides q, k, v, out
    return out, torch.stack(lses)


def _ulysses_bwd(do, q, k, v, out, lses, plans, scale, group, timeout, a2a, groups):
    """Head-sharded inputs are all-to-all'ed again per group instead of being saved: one
    group's working set at a time instead of every head's (the all-to-all is cheap next to
    the attention it feeds)."""
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
    for j in range(groups):
        parts = [seq_to_heads(_heads(t, j, groups), a2a, timeout=timeout)
                 for t in (do, q, k, v, out)]
        g = list(_ring_bwd(*parts, lses[j], plans, scale, group, timeout))
        del parts
        for i, dst in enumerate(grads):  # head shards -> this rank's rows, one at a time
            # cast before the all-to-all: bf16 gradients travel at half the bytes
            _heads(dst, j, groups).copy_(heads_to_seq(g[i].to(dst.dtype), a2a, timeout=timeout))
            g[i] = None
    return grads


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, scale, group, timeout, a2a):
        if a2a is None:
            out, lse = _ring_fwd(q, k, v, plans, scale, group, timeout)
        else:
            ctx.groups = head_groups(k.shape[1], RingComm(a2a).size, k.numel() * k.element_size())
            out, lse = _ulysses_fwd(q, k, v, plans, scale, group, timeout, a2a, ctx.groups)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plans, scale, group, timeout)
        ctx.a2a = a2a
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.a2a is None:
            dq, dk, dv = _ring_bwd(do.contiguous(), q, k, v, out, lse, *ctx.args)
        else:
            dq, dk, dv = _ulysses_bwd(do, q, k, v, out, lse, *ctx.args, ctx.a2a, ctx.groups)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention(q, k, v, plans, scale: float, group=None, timeout=None,
                   a2a_group=None) -> torch.Tensor:
    """Attention of local queries against K/V blocks passed around `group`'s ring.

    q [B, Hq, nq, D]; k, v [B, Hkv, nk, D] (this rank's blocks; every rank's k has the same
    shape); plans: R lists of `plan.Piece`, plans[s] for the keys of ring rank (r - s) mod R.
    Returns out [B, Hq, nq, D]. group None = one process (R = 1).

    a2a_group (Ulysses, u ranks): q, k, v are sequence shards that go to head shards
    [B, H/u, u nq, D] by all-to-all before the loop (the plans are for those concatenated
    rows) and back after it; Hq and Hkv must divide by u. Head groups stream through this
    stage one at a time, forward and backward. Example (one process):

    >>> from seqshard.ops.attention.plan import Piece
    >>> q = k = v = torch.randn(1, 2, 6, 32)
    >>> out = ring_attention(q, k, v, [[Piece(0, 6, 0, 6, "causal")]], scale=32 ** -0.5)
    """
    if len(plans) != RingComm(group).size:
        raise ValueError(f"got {len(plans)} step plans for a ring of {RingComm(group).size} ranks")
    if a2a_group is not None and RingComm(a2a_group).size == 1:
        a2a_group = None
    if a2a_group is not None:
        u = RingComm(a2a_group).size
        if q.shape[1] % u or k.shape[1] % u:
            raise ValueError(f"query heads {q.shape[1]} and key/value heads {k.shape[1]} must "
                             f"divide by the all-to-all group size {u}")
    return _RingAttention.apply(q, k, v, plans, scale, group, timeout, a2a_group)
