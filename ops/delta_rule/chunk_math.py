"""The chunk math of the chunkwise delta rule: everything that is parallel over chunks.

Notation per chunk of C tokens (state S [Dk, Dv], read o = S^T q; see README.md):
gamma = cumulative log-decay inside the chunk (0 without a gate), Gamma[t, s] = exp(gamma_t -
gamma_s) for s <= t, else 0 (computed as the sum of the gates in (s, t], never as a difference,
so that a large negative gate, a reset, stays exact).

    T = (I + strict_tril(diag(b) (K K^T * Gamma)))^-1 diag(b)
    W = T diag(exp(gamma)) K,   U = T V,   Delta = U - W S
    O = diag(exp(gamma)) Q S + (Q K^T * Gamma) Delta
    S' = exp(gamma_C) S + Kt^T Delta,  Kt[s] = exp(gamma_C - gamma_s) K[s]

This module holds the per-chunk layout (`Chunks`, `to_chunks`, `flat`), the UT transform and
the in-chunk products of G chunks at once (`_scores`, `_chunk_math`), their hand-written
backward (`_chunk_grads`), and `prepare_blocked`, which runs the chunk math over all chunks
of all heads in blocks of about BLOCK_TOKENS tokens. The sequential state chain is chain.py;
the autograd Function that puts both together is chunk.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


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


# Tokens (over all heads) whose C x C temporaries are live together: bounds the kernel's
# temporaries to about 1.5 KB per token of the block (~100 MB), whatever the length. Backward
# keeps 3 C floats per token (_Kept) from pass 1 for pass 2 instead of redoing two products
# and the solve (12% of the backward); a shard that fits one block keeps all its scores.
# Provenance: 2-core Intel Xeon (the CI machine; RESULTS.md), fp32, 2026-11-25 (commit
# a4e888c): forward+backward at 32K tokens x 2 heads, d = 64, was 7% faster in one block of
# 64K than in blocks of 16K. Not measured on a GPU.
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
