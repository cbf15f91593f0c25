"""The state chain of the chunkwise delta rule, the only sequential part, and its dispatch.

Per chunk j (chunk_math.py has the notation): Delta_j = U_j - W_j S_j and
S_{j+1} = decay_j S_j + Kt_j^T Delta_j, two [C, Dk] x [Dk, Dv] products. Three entry points:

- `chain_states`: forward, the state at each chunk start and each chunk's Delta;
- `chain_grads`: backward, G_j = dS_j + decay_j G_{j+1} - W_j^T (Kt_j G_{j+1});
- `shard_map`: the affine map S -> A S + Bm of all chunks together (a middle rank's map).

Each runs on the first backend that takes the tensors, all with the same buffer-filling entry
points (`chain_forward`, `chain_backward`, `chain_map`, returning False where they do not
apply): `fused_chain` (one C call on the CPU, fp32/fp64) and `triton_chain` (one Triton
kernel on CUDA, fp32). Where neither applies the torch loops below run; they are the
reference the tests hold both backends against.
"""

from __future__ import annotations

import itertools

import torch

from . import fused_chain, triton_chain
from .chunk_math import Chunks

BACKENDS = (fused_chain, triton_chain)  # tried in order; each says False off its device


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


# --- the torch loops: the reference, with the backends' buffer-filling signatures ----------
def loop_forward(states, deltas, w, u, kt, decay) -> None:
    """Fill states [nc + 1, B*H, Dk, Dv] (states[0] given) and deltas [nc, B*H, C, Dv] from
    w, kt [nc, B*H, C, Dk], u [nc, B*H, C, Dv], decay [nc, B*H, 1, 1] or None."""
    steps = zip(w.unbind(0), u.unbind(0), kt.mT.unbind(0), _each(decay), states.unbind(0),
                states[1:].unbind(0), deltas.unbind(0))
    for w_j, u_j, kt_t, decay_j, s, s_next, delta_j in steps:
        delta = torch.baddbmm(u_j, w_j, s, alpha=-1, out=delta_j)  # U - W S
        torch.baddbmm(s if decay_j is None else s * decay_j, kt_t, delta, out=s_next)


def loop_backward(g, w, kt, decay, ds_states, after) -> None:
    """g [B*H, Dk, Dv]: the gradient of the state after the last chunk, replaced by that of
    the first chunk's state; ds_states and after (written, or None) [nc, B*H, Dk, Dv]."""
    steps = list(zip(w.mT.unbind(0), kt.unbind(0), _each(decay), ds_states.unbind(0),
                     after.unbind(0) if after is not None else _each(None)))
    grad = g
    for w_t, kt_j, decay_j, ds_j, after_j in reversed(steps):
        if after_j is not None:
            after_j.copy_(grad)
        d_delta = torch.bmm(kt_j, grad)  # [B*H, C, Dv]
        grad = torch.baddbmm(ds_j + (grad if decay_j is None else grad * decay_j), w_t,
                             d_delta, alpha=-1)
    g.copy_(grad)


def loop_map(m, w, u, kt, decay) -> None:
    """Run m = [A | Bm] [B*H, Dk, Dk + Dv] through every chunk in place."""
    Dk = w.shape[-1]
    tiny = torch.finfo(m.dtype).tiny
    run = m
    for j in range(w.shape[0]):
        delta = torch.bmm(w[j], run).neg_()  # [B*H, C, Dk + Dv]
        delta[..., Dk:] += u[j]
        run = torch.baddbmm(run if decay is None else run * decay[j], kt[j].mT, delta)
        if j % 16 == 15:
            # A is a product of contractions: its entries sink to subnormals, whose
            # arithmetic is ~30x slower on CPUs. Flush them to zero (fused_chain.c does it
            # in hardware).
            run.mul_(run.abs() >= tiny)
    m.copy_(run)


# --- the entry points -----------------------------------------------------------------------
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
    if not any(b.chain_forward(states, deltas, w, u, kt, _decay_2d(decay)) for b in BACKENDS):
        loop_forward(states, deltas, w, u, kt, decay)
    return (states[:-1].view(nc, B, H, *s0.shape[2:]), deltas.view(nc, B, H, *u.shape[2:]),
            states[-1].view(s0.shape))


def shard_map(ch: Chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map S -> A S + Bm that all chunks apply together, composed while streaming
    (only the running pair is live). Returns A [B, H, Dk, Dk], Bm [B, H, Dk, Dv]."""
    w, u, kt, decay = _heads_flat(ch)
    BH, Dk = w.shape[1], w.shape[-1]
    # one running matrix [A | Bm]: the A columns see no U (homogeneous part)
    m = torch.cat([torch.eye(Dk, dtype=w.dtype, device=w.device).expand(BH, Dk, Dk),
                   u.new_zeros(BH, Dk, u.shape[-1])], dim=-1)
    if not any(b.chain_map(m, w, u, kt, _decay_2d(decay)) for b in BACKENDS):
        loop_map(m, w, u, kt, decay)
    m = m.view(ch.w.shape[1:3] + m.shape[1:])
    return m[..., :Dk], m[..., Dk:]


def chain_grads(ch: Chunks, ds_states: torch.Tensor, ds_end: torch.Tensor, keep: bool = True):
    """The state chain backward. ds_states [nc, B, H, Dk, Dv]: gradient reaching each chunk-start
    state from the outputs; ds_end: gradient of the state after the last chunk.
    Returns (gradient of the state after each chunk [nc, ...] or None, gradient of s0)."""
    w, _, kt, decay = _heads_flat(ch)
    after = _per_chunk(ds_end, w.shape[0]) if keep else None
    g = ds_end.flatten(0, 1).clone(memory_format=torch.contiguous_format)  # [B*H, Dk, Dv]
    ds_flat, after_flat = ds_states.flatten(1, 2), after.flatten(1, 2) if keep else None
    if not any(b.chain_backward(g, w, kt, _decay_2d(decay), ds_flat, after_flat)
               for b in BACKENDS):
        loop_backward(g, w, kt, decay, ds_flat, after_flat)
    return after, g.view(ds_end.shape)
