"""Chunkwise delta rule (WY / UT-transform form): the one kernel and the one autograd.Function.

Notation per chunk of C tokens (state S [Dk, Dv], read o = S^T q; see README.md):
gamma = cumulative log-decay inside the chunk (0 without a gate), Gamma[t, s] = exp(gamma_t -
gamma_s) for s <= t, else 0.

    T = (I + strict_tril(diag(b) (K K^T * Gamma)))^-1 diag(b)
    W = T diag(exp(gamma)) K,   U = T V,   Delta = U - W S
    O = diag(exp(gamma)) Q S + (Q K^T * Gamma) Delta
    S' = exp(gamma_C) S + Kt^T Delta,  Kt[s] = exp(gamma_C - gamma_s) K[s]

`prepare` does everything that is parallel over chunks (plain torch, differentiated by
autograd in backward). The only sequential part is the state chain S_j -> S_{j+1}, written
out by hand both ways (`chain_states`, `chain_grads`). Forward keeps the inputs and one state
per chunk start (N/C * Dk * Dv numbers), never per-token states or per-chunk transitions;
backward recomputes `prepare`, one block of chunks at a time.

A *schedule* decides where the first chunk's state comes from and where the last one goes:
`LocalSchedule` here (one process), the sharded ones in sharded.py. Same Function for all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Chunks(NamedTuple):
    """Per-chunk tensors, chunk-major so the state chain indexes dim 0."""

    qg: torch.Tensor  # [nc, B, H, C, Dk] scaled queries, decayed from the chunk start
    aqk: torch.Tensor  # [nc, B, H, C, C] causal (Q K^T * Gamma)
    w: torch.Tensor  # [nc, B, H, C, Dk]
    u: torch.Tensor  # [nc, B, H, C, Dv]
    kt: torch.Tensor  # [nc, B, H, C, Dk] keys decayed to the chunk end
    decay: torch.Tensor | None  # [nc, B, H] exp(total log-decay of the chunk), None: no gate


def to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, H, N, ...] -> [nc, B, H, C, ...], zero-padded at the end.

    Zero padding is exact: a token with k = 0, b = 0, g = 0 leaves the state unchanged.
    """
    N = x.shape[2]
    nc = -(-N // C)
    if nc * C != N:
        pad = x.new_zeros(x.shape[:2] + (nc * C - N,) + x.shape[3:])
        x = torch.cat([x, pad], dim=2)
    return x.unflatten(2, (nc, C)).movedim(2, 0).contiguous()  # contiguous: the chain slices it


def from_chunks(x: torch.Tensor, N: int) -> torch.Tensor:
    """[nc, B, H, C, D] -> [B, H, N, D] (drops the padding)."""
    return x.movedim(0, 2).flatten(2, 3)[:, :, :N]


def prepare(q, k, v, beta, gate, scale: float, C: int) -> Chunks:
    """The chunk-parallel part: the UT transform and the intra-chunk scores."""
    qc, kc, vc = to_chunks(q * scale, C), to_chunks(k, C), to_chunks(v, C)
    bc = to_chunks(beta, C)  # [nc, B, H, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # t >= s
    kk = kc @ kc.mT  # [nc, B, H, C, C]
    qk = qc @ kc.mT
    if gate is None:
        strict = (kk * bc[..., None]).tril_(-1)  # in place: mul's backward does not need it
        kw, qg, kt, decay = kc, qc, kc, None
        aqk = qk.tril_()
    else:
        gam = to_chunks(gate, C).cumsum(-1)  # [nc, B, H, C]
        # -inf above the diagonal first, so exp never sees a large positive gap
        ratio = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        strict = (kk * ratio * bc[..., None]).tril_(-1)
        kw = kc * gam.exp()[..., None]
        qg = qc * gam.exp()[..., None]
        kt = kc * (gam[..., -1:] - gam).exp()[..., None]
        decay = gam[..., -1].exp()
        aqk = qk * ratio
    # T = (I + strict)^-1 diag(b): unitriangular=True reads only the strict lower part
    eye = torch.eye(C, dtype=q.dtype, device=q.device).expand_as(strict)
    t = torch.linalg.solve_triangular(strict, eye, upper=False, unitriangular=True)
    t = t * bc[..., None, :]  # [nc, B, H, C, C]
    w, u = t @ kw, t @ vc
    return Chunks(qg, aqk, w, u, kt, decay)


def _heads_flat(ch: Chunks):
    """W, U, Kt as [nc, B*H, C, D] and the decay as [nc, B*H, 1, 1] (or None): 3-D batches,
    so each chain step is one fused baddbmm (small matmuls are dominated by call overhead)."""
    w, u, kt = (x.flatten(1, 2) if x is not None else None for x in (ch.w, ch.u, ch.kt))
    decay = ch.decay.flatten(1, 2)[..., None, None] if ch.decay is not None else None
    return w, u, kt, decay


def chain_states(s0: torch.Tensor, ch: Chunks):
    """Run the state through the chunks. Returns the state at each chunk start
    [nc, B, H, Dk, Dv], Delta = U - W S of each chunk [nc, B, H, C, Dv] (the outputs reuse
    it) and the state after the last chunk [B, H, Dk, Dv]."""
    w, u, kt, decay = _heads_flat(ch)
    states = s0.new_empty((w.shape[0],) + s0.shape)
    deltas = torch.empty_like(ch.u)
    flat_states, flat_deltas = states.flatten(1, 2), deltas.flatten(1, 2)
    s = s0.flatten(0, 1)  # [B*H, Dk, Dv]
    for j in range(w.shape[0]):
        flat_states[j] = s
        delta = torch.baddbmm(u[j], w[j], s, alpha=-1, out=flat_deltas[j])  # U - W S
        s = torch.baddbmm(s if decay is None else s * decay[j], kt[j].mT, delta)
    return states, deltas, s.view(s0.shape)


def shard_map(ch: Chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map S -> A S + Bm that all chunks apply together, composed while streaming
    (only the running pair is live). Returns A [B, H, Dk, Dk], Bm [B, H, Dk, Dv]."""
    w, u, kt, decay = _heads_flat(ch)
    nc, BH, _, Dk = w.shape
    # one running matrix [A | Bm]: the A columns see no U (homogeneous part)
    m = torch.cat([torch.eye(Dk, dtype=w.dtype, device=w.device).expand(BH, Dk, Dk),
                   u.new_zeros(BH, Dk, u.shape[-1])], dim=-1)
    for j in range(nc):
        delta = torch.bmm(w[j], m).neg_()  # [B*H, C, Dk + Dv]
        delta[..., Dk:] += u[j]
        m = torch.baddbmm(m if decay is None else m * decay[j], kt[j].mT, delta)
    m = m.view(ch.w.shape[1:3] + m.shape[1:])
    return m[..., :Dk], m[..., Dk:]


def chain_grads(ch: Chunks, ds_states: torch.Tensor, ds_end: torch.Tensor, keep: bool = True):
    """The state chain backward. ds_states [nc, B, H, Dk, Dv]: gradient reaching each chunk-start
    state from the outputs; ds_end: gradient of the state after the last chunk.
    Returns (gradient of the state after each chunk [nc, ...] or None, gradient of s0)."""
    w, _, kt, decay = _heads_flat(ch)
    after = ds_end.new_empty(ds_states.shape) if keep else None
    flat_after, flat_ds = (after.flatten(1, 2) if keep else None), ds_states.flatten(1, 2)
    g = ds_end.flatten(0, 1)  # [B*H, Dk, Dv]
    for j in range(w.shape[0] - 1, -1, -1):
        if keep:
            flat_after[j] = g
        d_delta = torch.bmm(kt[j], g)  # [B*H, C, Dv]
        g = torch.baddbmm(flat_ds[j] + (g if decay is None else g * decay[j]),
                          w[j].mT, d_delta, alpha=-1)
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


BLOCK_TOKENS = 4096  # tokens whose chunk temporaries are live together (bounds memory)


def _blocks(N: int, C: int) -> list[tuple[int, int]]:
    """Token ranges [start, stop) of whole chunks, about BLOCK_TOKENS long."""
    step = max(1, BLOCK_TOKENS // C) * C
    return [(a, min(a + step, N)) for a in range(0, N, step)]


def _part(tensors, a: int, b: int):
    return [t[:, :, a:b] if t is not None else None for t in tensors]


def _over_blocks(N: int, C: int, fn):
    """Run fn(a, b) -> tuple of [chunks of block, ...] tensors (or None) on every block and
    stack the results over all N/C chunks into buffers allocated on the first block."""
    nc, out = -(-N // C), None
    for a, b in _blocks(N, C):
        part = fn(a, b)
        if out is None:
            out = [t.new_empty((nc,) + t.shape[1:]) if t is not None else None for t in part]
        for buf, t in zip(out, part):
            if t is not None:
                buf[a // C: -(-b // C)] = t
    return out


def prepare_blocked(inputs, scale: float, C: int) -> Chunks:
    """`prepare` without autograd, block by block: the C x C temporaries of one block at a time
    are live, only the per-chunk results of all blocks are kept."""
    N = inputs[0].shape[2]
    return Chunks(*_over_blocks(N, C, lambda a, b: prepare(*_part(inputs, a, b), scale, C)))


def _fwd(inputs, h0, schedule, scale, C):
    """Returns (o [B, H, N, Dv], what the schedule makes of the last state, chunk-start states)."""
    ch = prepare_blocked(inputs, scale, C)
    s_in = schedule.state_in(h0, ch)
    states, deltas, s_out = chain_states(s_in, ch)
    qg, aqk = ch.qg, ch.aqk
    del ch  # W, U, Kt are no longer needed: free them before the outputs
    final = schedule.state_out(s_out)  # sharded schedules post their send here
    o = torch.matmul(qg, states)  # [nc, B, H, C, Dv]
    o.view(-1, *o.shape[-2:]).baddbmm_(aqk.view(-1, *aqk.shape[-2:]),
                                       deltas.view(-1, *deltas.shape[-2:]))
    return from_chunks(o, inputs[0].shape[2]), final, states


def _block_grads(inputs, states, after, do, scale, C, a, b):
    """Gradients of the inputs' tokens [a, b) given the gradient of every state after a chunk:
    recompute this block's `prepare` with autograd and pull the chunk gradients through it."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in _part(inputs, a, b)]
    with torch.enable_grad():
        ch = prepare(*leaves, scale, C)
    j = slice(a // C, -(-b // C))
    states, after, do_c = states[j], after[j], to_chunks(do[:, :, a:b], C)
    delta = ch.u.detach() - ch.w.detach() @ states  # [n, B, H, C, Dv]
    d_delta = ch.aqk.detach().mT @ do_c + ch.kt.detach() @ after
    outs = [ch.qg, ch.aqk, ch.w, ch.u, ch.kt]
    grads = [do_c @ states.mT, do_c @ delta.mT, (d_delta @ states.mT).neg_(), d_delta,
             delta @ after.mT]
    if ch.decay is not None:
        outs.append(ch.decay)
        grads.append((states * after).sum((-2, -1)))
    return torch.autograd.grad(outs, [t for t in leaves if t is not None], grads)


def _bwd(inputs, states, do, ds_final, schedule, scale, C):
    """Gradients of (q, k, v, beta, gate) and of the incoming state.

    Two passes over `prepare`: first without autograd for what the state chain needs (so the
    incoming-state gradient leaves for the previous rank early), then block by block with
    autograd, so that only one block's graph is ever alive."""
    def chain_part(a, b):  # what the state chain needs, and the outputs' pull on each S_j
        ch = prepare(*_part(inputs, a, b), scale, C)
        do_c = to_chunks(do[:, :, a:b], C)  # [n, B, H, C, Dv]
        ds_states = ch.qg.mT @ do_c - ch.w.mT @ (ch.aqk.mT @ do_c)
        return ch.w, ch.kt, ch.decay, ds_states

    w, kt, decay, ds_states = _over_blocks(inputs[0].shape[2], C, chain_part)
    ch = Chunks(None, None, w, None, kt, decay)
    ds_end = schedule.grad_out(ds_final, ch, ds_states)
    after, ds_in = chain_grads(ch, ds_states, ds_end)
    dh0 = schedule.grad_in(ds_in)
    del ch, w, kt, decay, ds_states
    d_inputs = [torch.empty_like(t) if t is not None else None for t in inputs]
    for a, b in _blocks(inputs[0].shape[2], C):
        got = iter(_block_grads(inputs, states, after, do, scale, C, a, b))
        for d in d_inputs:
            if d is not None:
                d[:, :, a:b] = next(got)
    return d_inputs, dh0


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


def run(q, k, v, beta, gate, initial_state, schedule, scale: float, chunk_size: int):
    """Apply the chunked delta rule with `schedule`; inputs already validated.
    Returns (o [B, H, N, Dv], state after the last token [B, H, Dk, Dv])."""
    C = min(chunk_size, q.shape[2])
    return _DeltaRule.apply(q, k, v, beta, gate, initial_state, schedule, scale, C)


def chunk_delta_rule(q, k, v, beta, *, initial_state=None, scale=None, gate=None,
                     chunk_size: int = 64):
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
