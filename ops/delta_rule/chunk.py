"""Chunkwise delta rule (WY / UT-transform form): the one kernel and the one autograd.Function.

Notation per chunk of C tokens (state S [Dk, Dv], read o = S^T q; see README.md):
gamma = cumulative log-decay inside the chunk (0 without a gate), Gamma[t, s] = exp(gamma_t -
gamma_s) for s <= t, else 0 (computed as the sum of the gates in (s, t], never as a difference,
so that a large negative gate, a reset, stays exact).

    T = (I + strict_tril(diag(b) (K K^T * Gamma)))^-1 diag(b)
    W = T diag(exp(gamma)) K,   U = T V,   Delta = U - W S
    O = diag(exp(gamma)) Q S + (Q K^T * Gamma) Delta
    S' = exp(gamma_C) S + Kt^T Delta,  Kt[s] = exp(gamma_C - gamma_s) K[s]

`prepare_blocked` does everything that is parallel over chunks, as batched products over all
chunks of all heads. The only sequential part is the state chain S_j -> S_{j+1} (`chain_states`,
`chain_grads`, and `shard_map` for a sharded schedule: one C call each on the CPU,
fused_chain.py; their torch loops are the reference and run elsewhere). Forward keeps the
inputs and one state per chunk start (N/C * Dk * Dv numbers), never per-token states or
per-chunk transitions; backward recomputes the chunk math one block of chunks at a time and
differentiates it by hand (`_chunk_grads`).

A *schedule* decides where the first chunk's state comes from and where the last one goes:
`LocalSchedule` here (one process), the sharded ones in sharded.py. Same Function for all.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from . import fused_chain


class Chunks(NamedTuple):
    """Per-chunk tensors, indexed chunk first so the state chain reads chunk j as x[j].

    They are views of head-major storage [B, H, nc, C, ...] (the inputs' own order): chunking
    a contiguous input copies nothing, and all chunks of all heads are one 3-D batch
    [B*H*nc, C, ...] (`flat`) for the chunk-parallel bmm calls."""

    qg: torch.Tensor  # [nc, B, H, C, Dk] scaled queries, decayed from the chunk start
    aqk: torch.Tensor  # [nc, B, H, C, C] causal (Q K^T * Gamma)
    w: torch.Tensor  # [nc, B, H, C, Dk]
    u: torch.Tensor  # [nc, B, H, C, Dv]
    kt: torch.Tensor  # [nc, B, H, C, Dk] keys decayed to the chunk end
    decay: torch.Tensor | None  # [nc, B, H] exp(total log-decay of the chunk), None: no gate


def to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, H, N, ...] -> [nc, B, H, C, ...]: a view, or a zero-padded copy when C does not
    divide N.

    Zero padding is exact: a token with k = 0, b = 0, g = 0 leaves the state unchanged.
    """
    N = x.shape[2]
    nc = -(-N // C)
    if nc * C != N:
        pad = x.new_zeros(x.shape[:2] + (nc * C - N,) + x.shape[3:])
        x = torch.cat([x, pad], dim=2)
    return x.unflatten(2, (nc, C)).movedim(2, 0)


def from_chunks(x: torch.Tensor, N: int) -> torch.Tensor:
    """[nc, B, H, C, D] -> [B, H, N, D] (drops the padding; a view for head-major storage)."""
    return x.movedim(0, 2).flatten(2, 3)[:, :, :N]


def flat(x: torch.Tensor) -> torch.Tensor:
    """[nc, B, H, ...] -> [B*H*nc, ...]: one batch of every chunk of every head (a view for
    head-major storage, a copy otherwise)."""
    return x.movedim(0, 2).flatten(0, 2)


def unflat(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """[B*H*nc, ...] -> [nc, B, H, ...] (a view)."""
    return x.unflatten(0, (B, H, -1)).movedim(2, 0)


class _Scores(NamedTuple):
    """What the chunk math and its hand-written backward share, flat [G, ...]. Without a gate
    kw = kt = k and ratio, e, ekt, decay are None."""

    qs: torch.Tensor  # [G, C, Dk] scale * q
    qg: torch.Tensor  # [G, C, Dk] qs * e
    aqk: torch.Tensor  # [G, C, C] causal (qk * ratio)
    kkr: torch.Tensor  # [G, C, C] k k^T * ratio (only its strict lower part is read)
    t0: torch.Tensor  # [G, C, C] (I + strict_tril(diag(b) kkr))^-1, unit lower triangular
    t: torch.Tensor  # [G, C, C] t0 diag(b)
    kw: torch.Tensor  # [G, C, Dk] k * e
    kt: torch.Tensor  # [G, C, Dk] k * ekt
    ratio: torch.Tensor | None  # [G, C, C] exp(gam_t - gam_s) for s <= t, else 0
    e: torch.Tensor | None  # [G, C] exp(gam), gam = in-chunk cumulative log-decay
    ekt: torch.Tensor | None  # [G, C] exp(gam_C - gam)
    decay: torch.Tensor | None  # [G] exp(gam_C)


_NO_OUT = Chunks(None, None, None, None, None, None)


class _Kept(NamedTuple):
    """The costly part of _Scores (two products and the solve), [G, C, C] each: backward's
    pass 1 writes it for every chunk (3 C floats per token and head) and pass 2 reuses it."""

    aqk: torch.Tensor | None
    kkr: torch.Tensor | None
    t0: torch.Tensor | None


_NO_KEPT = _Kept(None, None, None)


def _scores(q, k, b, g, scale: float, out: Chunks = _NO_OUT, store: _Kept = _NO_KEPT,
            reuse: _Kept | None = None) -> _Scores:
    """The UT transform and the intra-chunk scores of G chunks (q, k [G, C, Dk], b, g [G, C]);
    qg, aqk, kt, decay land in `out`'s buffers where it has them, aqk, kkr, t0 in `store`'s.
    reuse: aqk, kkr, t0 from an earlier call on the same chunks (skips their computation)."""
    C = q.shape[1]
    if g is None:
        qs = qg = torch.mul(q, scale, out=out.qg)
        kw, kt, ratio, e, ekt, decay = k, k, None, None, None, None
    else:
        gam = g.cumsum(-1)  # [G, C] from the chunk start: a sum, never a difference
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # t >= s
        # seg[s, t] = sum of g over (s, t], a cumulative sum that starts after s. Not
        # gam_t - gam_s: after a reset (g = -1e4) both are ~-1e4 and their difference keeps
        # only ~1e-3 of fp32 precision; here a reset enters only the pairs it separates.
        seg = g[:, None, :].masked_fill(causal, 0.0).cumsum(-1)  # [G, C (s), C (t)]
        # -inf above the diagonal, so exp never sees a gap that is not a decay
        ratio = seg.mT.masked_fill(~causal, float("-inf")).exp()  # [G, C (t), C (s)]
        e, ekt = gam.exp(), seg[:, :, -1].exp()  # ekt_s = exp(sum of g over (s, C - 1])
        qs = q * scale
        qg = torch.mul(qs, e[..., None], out=out.qg)
        kw = k * e[..., None]
        kt = torch.mul(k, ekt[..., None], out=out.kt)
        decay = torch.exp(gam[:, -1], out=out.decay)
    if reuse is not None:
        aqk, kkr, t0 = reuse
    else:
        aqk = out.aqk if out.aqk is not None else store.aqk
        if g is None:
            aqk = torch.bmm(qs, k.mT, out=aqk).tril_()
            kkr = torch.bmm(k, k.mT, out=store.kkr)
        else:
            aqk = torch.mul(torch.bmm(qs, k.mT), ratio, out=aqk)
            kkr = torch.mul(torch.bmm(k, k.mT), ratio, out=store.kkr)
        # unitriangular=True reads only the strict lower part of kkr * b: no tril, no identity
        eye = torch.eye(C, dtype=q.dtype, device=q.device).expand(q.shape[0], C, C)
        t0 = torch.linalg.solve_triangular(kkr * b[..., None], eye, upper=False,
                                           unitriangular=True, out=store.t0)
    t = t0 * b[:, None, :]
    return _Scores(qs, qg, aqk, kkr, t0, t, kw, kt, ratio, e, ekt, decay)


def _chunk_math(q, k, v, b, g, scale: float, out: Chunks | None = None, with_u: bool = True,
                store: _Kept = _NO_KEPT):
    """The UT transform and the intra-chunk scores of G independent chunks, as 3-D batches.

    q, k [G, C, Dk], v [G, C, Dv], b, g (log-decay or None) [G, C]. Returns the Chunks fields
    as [G, ...] tensors (decay [G]) and the _Scores; with `out` (no autograd) the results land
    in its buffers (a None field: allocate; kt is k itself without a gate), and aqk, kkr, t0
    in `store`'s. with_u=False skips U = T V."""
    out = out or _NO_OUT
    sc = _scores(q, k, b, g, scale, out, store)
    w = torch.bmm(sc.t, sc.kw, out=out.w)
    u = torch.bmm(sc.t, v, out=out.u) if with_u else None
    return Chunks(sc.qg, sc.aqk, w, u, sc.kt, sc.decay), sc


def _chunk_grads(sc: _Scores, k, v, b, s, after, do, aqk_do, scale: float, out):
    """Gradients (dq, dk, dv, db, dg or None) of G chunks, by hand (see README.md, Backward),
    written into `out` (five [G, ...] buffers; dg's is None without a gate).

    sc: the chunks' _Scores; k [G, C, Dk], v [G, C, Dv], b [G, C]; s: state at each chunk start
    and after: gradient of the state after each chunk, [G, Dk, Dv]; do: dO [G, C, Dv];
    aqk_do: Aqk^T dO (pass 1 has it). Products that add into one gradient are chained as
    baddbmm_ so that no separate add passes run."""
    dq_out, dk_out, dv_out, db_out, dg_out = out
    gated = sc.e is not None
    r = torch.baddbmm(v, sc.kw, s, alpha=-1)  # [G, C, Dv] R = V - Kw S, so Delta = T R
    delta = torch.bmm(sc.t, r)
    d_delta = torch.baddbmm(aqk_do, sc.kt, after)  # [G, C, Dv]
    d_aqk = torch.bmm(do, delta.mT)  # [G, C, C] (its upper part meets zeros below)
    d_t = torch.bmm(d_delta, r.mT)  # [G, C, C]
    dv = torch.bmm(sc.t.mT, d_delta, out=dv_out)  # dR
    # T = T0 diag(b), T0 = M^-1 with M = I + strict_tril(diag(b) kkr): dM = -T0^T dT0 T0^T
    db = torch.sum(d_t * sc.t0, -2, out=db_out)
    d_m = torch.bmm(sc.t0.mT, torch.bmm(d_t * b[:, None, :], sc.t0.mT)).tril_(-1).neg_()
    db += (d_m * sc.kkr).sum(-1)
    d_kkr = d_m * b[..., None]  # [G, C, C], strictly lower
    if sc.ratio is None:
        d_kk, d_qk = d_kkr, d_aqk.tril_()
    else:
        d_kk, d_qk = d_kkr * sc.ratio, d_aqk * sc.ratio
    # qs: through qg = qs * e and through qk = qs k^T
    d_qg = torch.bmm(do, s.mT, out=None if gated else dq_out)  # [G, C, Dk]
    d_qs = (torch.mul(d_qg, sc.e[..., None], out=dq_out) if gated else d_qg).baddbmm_(d_qk, k)
    # k: through kk = k k^T, qk, kw = k * e (dKw = -dR S^T) and kt = k * ekt (dKt = Delta G^T)
    d_kw = torch.bmm(dv, s.mT, out=None if gated else dk_out).neg_()
    d_kt = torch.bmm(delta, after.mT)
    if gated:
        dk = torch.addcmul(d_kw * sc.e[..., None], d_kt, sc.ekt[..., None], out=dk_out)
    else:
        dk = d_kw.add_(d_kt)
    dk.baddbmm_(d_kk + d_kk.mT, k).baddbmm_(d_qk.mT, sc.qs)
    if gated:  # the log-decay: every path through gam, then gam = cumsum(g)
        d_end = (d_kt * k).sum(-1) * sc.ekt  # kt = k exp(gam_C - gam)
        d_gam = ((d_qg * sc.qs).sum(-1) + (d_kw * k).sum(-1)) * sc.e - d_end
        d_gam[:, -1] += d_end.sum(-1) + (s * after).sum((-2, -1)) * sc.decay
        z = (d_kkr * sc.kkr).add_(d_aqk * sc.aqk)  # d ratio * ratio
        d_gam += z.sum(-1) - z.sum(-2)
        dg_out.copy_(d_gam.flip(-1).cumsum(-1).flip(-1))
    d_qs.mul_(scale)


def _heads_flat(ch: Chunks):
    """W, U, Kt as [nc, B*H, C, D] and the decay as [nc, B*H, 1, 1] (or None): 3-D batches,
    so each chain step is one fused baddbmm (small matmuls are dominated by call overhead)."""
    w, u, kt = (x.flatten(1, 2) if x is not None else None for x in (ch.w, ch.u, ch.kt))
    decay = ch.decay.flatten(1, 2)[..., None, None] if ch.decay is not None else None
    return w, u, kt, decay


def _decay_2d(decay: torch.Tensor | None) -> torch.Tensor | None:
    """_heads_flat's decay [nc, B*H, 1, 1] as [nc, B*H]."""
    return decay[..., 0, 0] if decay is not None else None


def _each(x: torch.Tensor | None):
    """x's slices along dim 0, or an endless None for an absent decay."""
    return x.unbind(0) if x is not None else itertools.repeat(None)


def _per_chunk(like: torch.Tensor, nc: int) -> torch.Tensor:
    """An empty [nc, B, H, ...] buffer for one `like` [B, H, ...] per chunk, head-major as the
    Chunks are (so `flat` of it is a view)."""
    return like.new_empty(like.shape[:2] + (nc,) + like.shape[2:]).movedim(2, 0)


def chain_states(s0: torch.Tensor, ch: Chunks):
    """Run the state through the chunks. Returns the state at each chunk start
    [nc, B, H, Dk, Dv], Delta = U - W S of each chunk [nc, B, H, C, Dv] (the outputs reuse
    it; both chunk-major, unlike the Chunks) and the state after the last chunk [B, H, Dk, Dv]."""
    w, u, kt, decay = _heads_flat(ch)
    nc, BH = w.shape[:2]
    B, H = s0.shape[:2]
    # chunk-major results [nc (+1), B*H, ...]: every step writes contiguous memory (out=), which
    # keeps the products batched; a strided out= falls back to one matmul per head plus copies
    states = s0.new_empty((nc + 1, BH) + s0.shape[2:])
    deltas = u.new_empty(u.shape)
    states[0] = s0.flatten(0, 1)
    if not fused_chain.chain_forward(states, deltas, w, u, kt, _decay_2d(decay)):
        steps = zip(w.unbind(0), u.unbind(0), kt.mT.unbind(0), _each(decay), states.unbind(0),
                    states[1:].unbind(0), deltas.unbind(0))
        for w_j, u_j, kt_t, decay_j, s, s_next, delta_j in steps:
            delta = torch.baddbmm(u_j, w_j, s, alpha=-1, out=delta_j)  # U - W S
            torch.baddbmm(s if decay_j is None else s * decay_j, kt_t, delta, out=s_next)
    return (states[:-1].view(nc, B, H, *s0.shape[2:]), deltas.view(nc, B, H, *u.shape[2:]),
            states[-1].view(s0.shape))


def shard_map(ch: Chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map S -> A S + Bm that all chunks apply together, composed while streaming
    (only the running pair is live). Returns A [B, H, Dk, Dk], Bm [B, H, Dk, Dv]."""
    w, u, kt, decay = _heads_flat(ch)
    nc, BH, _, Dk = w.shape
    # one running matrix [A | Bm]: the A columns see no U (homogeneous part)
    m = torch.cat([torch.eye(Dk, dtype=w.dtype, device=w.device).expand(BH, Dk, Dk),
                   u.new_zeros(BH, Dk, u.shape[-1])], dim=-1)
    if not fused_chain.chain_map(m, w, u, kt, _decay_2d(decay)):
        tiny = torch.finfo(m.dtype).tiny
        for j in range(nc):
            delta = torch.bmm(w[j], m).neg_()  # [B*H, C, Dk + Dv]
            delta[..., Dk:] += u[j]
            m = torch.baddbmm(m if decay is None else m * decay[j], kt[j].mT, delta)
            if j % 16 == 15:
                # A is a product of contractions: its entries sink to subnormals, whose
                # arithmetic is ~30x slower on CPUs. Flush them to zero (fused_chain.c does it
                # in hardware).
                m.mul_(m.abs() >= tiny)
    m = m.view(ch.w.shape[1:3] + m.shape[1:])
    return m[..., :Dk], m[..., Dk:]


def chain_grads(ch: Chunks, ds_states: torch.Tensor, ds_end: torch.Tensor, keep: bool = True):
    """The state chain backward. ds_states [nc, B, H, Dk, Dv]: gradient reaching each chunk-start
    state from the outputs; ds_end: gradient of the state after the last chunk.
    Returns (gradient of the state after each chunk [nc, ...] or None, gradient of s0)."""
    w, _, kt, decay = _heads_flat(ch)
    after = _per_chunk(ds_end, w.shape[0]) if keep else None
    g = ds_end.flatten(0, 1).clone(memory_format=torch.contiguous_format)  # [B*H, Dk, Dv]
    if not fused_chain.chain_backward(g, w, kt, _decay_2d(decay), ds_states.flatten(1, 2),
                                      after.flatten(1, 2) if keep else None):
        steps = list(zip(w.mT.unbind(0), kt.unbind(0), _each(decay),
                         ds_states.flatten(1, 2).unbind(0),
                         after.flatten(1, 2).unbind(0) if keep else _each(None)))
        for w_t, kt_j, decay_j, ds_j, after_j in reversed(steps):
            if after_j is not None:
                after_j.copy_(g)
            d_delta = torch.bmm(kt_j, g)  # [B*H, C, Dv]
            g = torch.baddbmm(ds_j + (g if decay_j is None else g * decay_j), w_t, d_delta,
                              alpha=-1)
    return after, g.view(ds_end.shape)


class LocalSchedule:
    """One process: the first state is the initial state, the last one is the final state."""

    def state_in(self, h0: torch.Tensor, ch: Chunks) -> torch.Tensor:
        return h0

    def state_out(self, s_out: torch.Tensor) -> torch.Tensor:
        return s_out

    def grad_out(self, ds_final: torch.Tensor, ch: Chunks, ds_states: torch.Tensor):
        return ds_final

    def grad_in(self, ds_in: torch.Tensor) -> torch.Tensor:
        return ds_in


# Tokens (over all heads) whose C x C temporaries are live together: bounds the kernel's
# temporaries to about 1.5 KB per token of the block (~100 MB), whatever the length. Backward
# keeps 3 C floats per token (_Kept) from pass 1 for pass 2 instead of redoing two products
# and the solve (12% of the backward); a shard that fits one block keeps all its scores.
BLOCK_TOKENS = 65536


def _blocks(G: int, C: int) -> list[slice]:
    """Ranges of the flat chunk index [B*H*nc] about BLOCK_TOKENS tokens long: contiguous
    slices of every flat tensor, so a block's results are written in place (no stacking)."""
    step = max(1, BLOCK_TOKENS // C)
    return [slice(a, min(a + step, G)) for a in range(0, G, step)]


def _rows(x: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return x[sl] if x is not None else None


def _flat_inputs(inputs, C: int):
    return [flat(to_chunks(t, C)) if t is not None else None for t in inputs]


def prepare_blocked(inputs, scale: float, C: int) -> Chunks:
    """The chunk-parallel part (the UT transform and the intra-chunk scores; no autograd:
    backward is by hand), block by block: the C x C temporaries of one block at a time are
    live, only the per-chunk results of all blocks are kept (written in place).
    inputs: q, k [B, H, N, Dk], v [B, H, N, Dv], beta, gate [B, H, N] -> Chunks of
    nc = ceil(N / C)."""
    B, H = inputs[0].shape[:2]
    parts = _flat_inputs(inputs, C)  # [G, C, ...]
    q, k, v, _, gate = parts
    G = q.shape[0]
    out = Chunks(q.new_empty(G, C, q.shape[-1]), q.new_empty(G, C, C),
                 q.new_empty(G, C, k.shape[-1]), q.new_empty(G, C, v.shape[-1]),
                 q.new_empty(G, C, k.shape[-1]) if gate is not None else k,
                 q.new_empty(G) if gate is not None else None)
    for sl in _blocks(G, C):
        _chunk_math(*(_rows(t, sl) for t in parts), scale,
                    out=Chunks(*(_rows(x, sl) for x in out)))
    return Chunks(*(unflat(x, B, H) if x is not None else None for x in out))


def _fwd(inputs, h0, schedule, scale, C):
    """Returns (o [B, H, N, Dv], what the schedule makes of the last state, chunk-start states)."""
    B, H, N = inputs[0].shape[:3]
    ch = prepare_blocked(inputs, scale, C)
    s_in = schedule.state_in(h0, ch)
    states, deltas, s_out = chain_states(s_in, ch)
    qg, aqk = flat(ch.qg), flat(ch.aqk)
    del ch  # W, U, Kt are no longer needed: free them before the outputs
    final = schedule.state_out(s_out)  # sharded schedules post their send here
    # states and deltas are chunk-major: one batched product per head, each writing its own
    # contiguous rows of o
    nc = states.shape[0]
    o = qg.new_empty(qg.shape[:-1] + (deltas.shape[-1],))  # [B*H*nc, C, Dv]
    o_h, qg_h, aqk_h = (x.view(B * H, nc, *x.shape[1:]) for x in (o, qg, aqk))
    st, dl = states.flatten(1, 2), deltas.flatten(1, 2)
    for i in range(B * H):
        torch.bmm(qg_h[i], st[:, i], out=o_h[i]).baddbmm_(aqk_h[i], dl[:, i])
    return from_chunks(unflat(o, B, H), N), final, states


def _bwd(inputs, states, do, ds_final, schedule, scale, C):
    """Gradients of (q, k, v, beta, gate) and of the incoming state.

    Pass 1 computes what the state chain needs and runs the chain backward (so the
    incoming-state gradient leaves for the previous rank early); pass 2 computes every input's
    gradient by hand, block by block. Pass 1 keeps the costly scores for pass 2 (_Kept: 3 C
    floats per token and head; the rest is elementwise and recomputed), or all of them when
    the shard is one block (then the bound on one block's temporaries covers them)."""
    B, H, N = inputs[0].shape[:3]
    parts, do_f = _flat_inputs(inputs, C), flat(to_chunks(do, C))
    q, k, v, beta, gate = parts
    G = q.shape[0]
    blocks = _blocks(G, C)
    # pass 1: W, Kt, decay and the outputs' pull on each S_j, Qg^T dO - W^T (Aqk^T dO)
    ds_states = _per_chunk(ds_final, G // (B * H))
    ds_f, w = flat(ds_states), q.new_empty(G, C, k.shape[-1])
    kt = q.new_empty(w.shape) if gate is not None else k
    decay = q.new_empty(G) if gate is not None else None
    one_block = len(blocks) == 1
    kept = _NO_KEPT if one_block else _Kept(*(q.new_empty(G, C, C) for _ in range(3)))
    for sl in blocks:
        ch, sc = _chunk_math(*(_rows(t, sl) for t in parts), scale,
                             out=Chunks(None, None, w[sl], None,
                                        _rows(kt, sl) if gate is not None else None,
                                        _rows(decay, sl)),
                             with_u=False, store=_Kept(*(_rows(x, sl) for x in kept)))
        aqk_do = torch.bmm(ch.aqk.mT, do_f[sl])  # [g, C, Dv]
        torch.bmm(ch.qg.mT, do_f[sl], out=ds_f[sl]).baddbmm_(ch.w.mT, aqk_do, alpha=-1)
    whole = (sc, aqk_do) if one_block else None
    del ch, sc, aqk_do
    ch = Chunks(None, None, *(unflat(x, B, H) if x is not None else None
                              for x in (w, None, kt, decay)))
    ds_end = schedule.grad_out(ds_final, ch, ds_states)
    after, ds_in = chain_grads(ch, ds_states, ds_end)
    dh0 = schedule.grad_in(ds_in)
    del ch, w, kt, decay, ds_states, ds_f
    # pass 2: every input's gradient, written in place into each block's rows
    states_f, after_f = flat(states), flat(after)
    d_parts = [torch.empty_like(t) if t is not None else None for t in parts]
    for sl in blocks:
        if whole is not None:
            sc, aqk_do = whole
        else:
            sc = _scores(q[sl], k[sl], beta[sl], _rows(gate, sl), scale,
                         reuse=_Kept(*(_rows(x, sl) for x in kept)))
            aqk_do = torch.bmm(sc.aqk.mT, do_f[sl])
        _chunk_grads(sc, k[sl], v[sl], beta[sl], states_f[sl], after_f[sl], do_f[sl], aqk_do,
                     scale, out=[_rows(d, sl) for d in d_parts])
    return [from_chunks(unflat(d, B, H), N) if d is not None else None for d in d_parts], dh0


class _DeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, gate, h0, schedule, scale, C):
        work = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 state chain
        inputs = [t.to(work) if t is not None else None for t in (q, k, v, beta, gate)]
        s0 = h0.to(work) if h0 is not None else q.new_zeros(
            q.shape[:2] + (k.shape[-1], v.shape[-1]), dtype=work)
        o, final, states = _fwd(inputs, s0, schedule, scale, C)
        ctx.save_for_backward(*inputs, states)
        ctx.n = q.shape[2]
        ctx.args = (schedule, scale, C)
        ctx.dtypes = [t.dtype if t is not None else None for t in (q, k, v, beta, gate, h0)]
        return o.to(v.dtype), final.to(v.dtype)

    @staticmethod
    def backward(ctx, do, ds_final):
        *inputs, states = ctx.saved_tensors
        work = states.dtype
        if do is None:
            do = states.new_zeros(states.shape[1:3] + (ctx.n, states.shape[-1]))
        do = do.to(work)
        ds_final = torch.zeros_like(states[0]) if ds_final is None else ds_final.to(work)
        d_inputs, dh0 = _bwd(inputs, states, do, ds_final, *ctx.args)
        grads = [g.to(dt) if g is not None and dt is not None else None
                 for g, dt in zip(d_inputs + [dh0], ctx.dtypes)]
        return (*grads, None, None, None)


def default_chunk_size(device: torch.device) -> int:
    """The chunk length C when the caller gives none.

    Per token the kernel does ~5 C*d multiply-adds in C x C products (the UT transform, the
    intra-chunk scores) and ~3 d^2 in the state products (chain and reads), and the chain
    takes N / C sequential steps. On an accelerator the steps' latency dominates: 64, as the
    field's kernels use. On a CPU the chain is one fused call (fused_chain.c), a step costs
    only its arithmetic, so the smaller C cuts the C*d work: 32 was the fastest for d = 64
    (forward and backward; 16 is slower, README.md). The saved chunk-start states grow as
    N / C * Dk * Dv."""
    return 32 if device.type == "cpu" else 64


def run(q, k, v, beta, gate, initial_state, schedule, scale: float, chunk_size: int | None):
    """Apply the chunked delta rule with `schedule`; inputs already validated.
    chunk_size None: `default_chunk_size` of q's device.
    Returns (o [B, H, N, Dv], state after the last token [B, H, Dk, Dv])."""
    if chunk_size is None:
        chunk_size = default_chunk_size(q.device)
    C = min(chunk_size, q.shape[2])
    return _DeltaRule.apply(q, k, v, beta, gate, initial_state, schedule, scale, C)


def chunk_delta_rule(q, k, v, beta, *, initial_state=None, scale=None, gate=None,
                     chunk_size: int | None = None):
    """Single-process chunked delta rule without argument checks (see `delta_rule`).

    q, k [B, H, N, Dk]; v [B, H, N, Dv]; beta, gate (log-decay) [B, H, N];
    initial_state [B, H, Dk, Dv]. Returns (o [B, H, N, Dv], final state [B, H, Dk, Dv]).

    >>> q = k = torch.nn.functional.normalize(torch.randn(1, 2, 100, 8), dim=-1)
    >>> o, s = chunk_delta_rule(q, k, torch.randn(1, 2, 100, 8), torch.rand(1, 2, 100))
    >>> o.shape, s.shape
    (torch.Size([1, 2, 100, 8]), torch.Size([1, 2, 8, 8]))
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return run(q, k, v, beta, gate, initial_state, LocalSchedule(), scale, chunk_size)
