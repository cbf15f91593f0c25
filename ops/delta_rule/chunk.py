"""The chunkwise delta rule's one autograd.Function (`_DeltaRule`) and its entry points.

Forward runs the chunk math over all chunks (chunk_math.prepare_blocked), the state chain
(chain.chain_states) and the outputs O = Qg S + Aqk Delta. It keeps the inputs and one state
per chunk start (N/C * Dk * Dv numbers), never per-token states or per-chunk transitions.
Backward recomputes the chunk math one block of chunks at a time, runs the chain backward
(chain.chain_grads) and differentiates the chunk math by hand (chunk_math._chunk_grads).

A *schedule* decides where the first chunk's state comes from and where the last one goes:
`LocalSchedule` here (one process), the sharded ones in sharded.py. Same Function for all.
The names other modules import from here (Chunks, prepare_blocked, chain_states,
chain_grads, shard_map) are re-exported from chunk_math.py and chain.py; BLOCK_TOKENS is set
in chunk_math.py (the module that reads it).
"""

from __future__ import annotations

import torch

from ..dtypes import compute_dtype
from .chain import _per_chunk, chain_grads, chain_states, shard_map
from .chunk_math import (_NO_KEPT, Chunks, _blocks, _chunk_grads, _chunk_math,
                         _flat_inputs, _Kept, _rows, _scores, flat, from_chunks,
                         prepare_blocked, to_chunks, unflat)

__all__ = ["Chunks", "LocalSchedule", "chain_grads", "chain_states",
           "chunk_delta_rule", "default_chunk_size", "prepare_blocked", "run", "shard_map"]


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
        work = compute_dtype(q.dtype)  # fp32 state chain (fp64 stays fp64)
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


# The chunk length C when the caller gives none (see default_chunk_size).
# CPU: 32. Provenance: 2-core Intel Xeon (the CI machine), fp32, B=1 H=2 d=64 N=8K, fused C
# chain, 2026-11-25 (commits af66be9, 14b5e0e; benchmarks/RESULTS.md, "Delta rule" > "Chunk
# size on the CPU"): forward 14.0-14.3 / 13.7-14.2 / 20.6 ms and forward+backward
# 74-80 / 66-71 / 92 ms for C = 16 / 32 / 64.
CPU_CHUNK = 32
# Accelerators: 64, as the field's GPU kernels use (the chain's step latency dominates there).
# Not measured on a GPU by this project.
GPU_CHUNK = 64


def default_chunk_size(device: torch.device) -> int:
    """The chunk length C when the caller gives none.

    Per token the kernel does ~5 C*d multiply-adds in C x C products (the UT transform, the
    intra-chunk scores) and ~3 d^2 in the state products (chain and reads), and the chain
    takes N / C sequential steps. On an accelerator the steps' latency dominates: GPU_CHUNK.
    On a CPU the chain is one fused call (fused_chain.c), a step costs only its arithmetic,
    so the smaller C cuts the C*d work: CPU_CHUNK was the fastest for d = 64 (forward and
    backward; 16 is slower). The saved chunk-start states grow as N / C * Dk * Dv."""
    return CPU_CHUNK if device.type == "cpu" else GPU_CHUNK


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
