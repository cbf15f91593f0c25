"""The state chain as one Triton kernel per entry point on CUDA (triton_chain_kernels.py).

On a GPU the torch loop costs a few kernel launches per chunk, about 16K chunks per layer at
1M tokens; one launch per chain instead keeps each head's state on chip from chunk to chunk.
The three entry points fill the caller's buffers exactly as fused_chain's do (same names,
same arguments; chain.py tries both): `chain_forward` (chain.chain_states), `chain_backward`
(chain.chain_grads) and `chain_map` (chain.shard_map). They return False, writing nothing,
where this path does not apply: not CUDA tensors, not fp32, triton not installed (it is
optional: the `gpu` extra), or SEQSHARD_TRITON_CHAIN=0; chain.py then runs its torch loops,
the reference. Triton is imported on the first CUDA call, never on the CPU path.

`forward`, `backward` and `shard_map` launch unconditionally on whatever device the tensors
are on: CUDA, or the CPU under TRITON_INTERPRET=1 (set before triton is first imported),
which is how tests/test_triton_chain.py runs them without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .fused_chain import chain_sizes, expect

# Columns of the state per program, and warps per program. Provenance: commit 0672b13
# (2026-11-29), chosen by register arithmetic, not measured: no GPU has run this kernel
# (benchmarks/gpu_check.py times the chain on one; benchmarks/RESULTS.md, "Delta rule" >
# "The state chain on CUDA (Triton)"). 32 keeps a [Dk, 32] fp32 state tile plus a [C, Dk]
# chunk tile within 4 warps' registers up to Dk = 128.
BLOCK_V = 32
NUM_WARPS = 4
WHO = "triton chain"  # names this backend in the shared shape checks' errors


def enabled() -> bool:
    return os.environ.get("SEQSHARD_TRITON_CHAIN", "1") != "0"


@functools.cache
def kernels():
    """triton_chain_kernels, or None when triton is not installed."""
    try:
        from . import triton_chain_kernels
    except ImportError:
        return None
    return triton_chain_kernels


def available() -> bool:
    """Whether CUDA fp32 tensors take the Triton chain here (imports triton)."""
    return enabled() and kernels() is not None


def _applies(*tensors: torch.Tensor | None) -> bool:
    first = tensors[0]
    if not enabled() or first.device.type != "cuda" or first.dtype != torch.float32:
        return False
    if any(t is not None and (t.dtype != first.dtype or t.device != first.device)
           for t in tensors):
        return False
    return kernels() is not None


def _blocks(C: int, Dk: int, block_v: int) -> dict:
    """Power-of-two tile sizes, at least 16 each (tl.dot's smallest operand)."""
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"triton chain: block_v must be a power of two >= 16, got {block_v}")
    return dict(BLOCK_C=max(16, _next_pow2(C)), BLOCK_K=max(16, _next_pow2(Dk)), BLOCK_V=block_v)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _launch(kernel, tensors, sizes, strides, grid, **constants):
    """Run `kernel` on the tensors' device (CUDA: that device's current stream)."""
    device = tensors[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*tensors, *sizes, *strides, num_warps=NUM_WARPS, **constants)


def _strides(x: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return x.stride() if x is not None else (0,) * dims


def forward(states, deltas, w, u, kt, decay, block_v: int = BLOCK_V) -> None:
    """fused_chain.chain_forward's contract, launched unconditionally (see the module doc)."""
    nc, BH, C, Dk = chain_sizes(w, kt, decay, who=WHO)
    Dv = u.shape[-1]
    expect("u", u, (nc, BH, C, Dv), who=WHO)
    expect("states", states, (nc + 1, BH, Dk, Dv), who=WHO)
    expect("deltas", deltas, (nc, BH, C, Dv), who=WHO)
    if nc == 0 or BH == 0 or Dv == 0:
        return
    _launch(kernels().chain_forward_kernel, (states, deltas, w, u, kt, _or(decay, w)),
            (nc, C, Dk, Dv),
            (*states.stride(), *deltas.stride(), *w.stride(), *u.stride(), *kt.stride(),
             *_strides(decay, 2)),
            (BH, -(-Dv // block_v)), HAS_DECAY=decay is not None, **_blocks(C, Dk, block_v))


def backward(g, w, kt, decay, ds_states, after, block_v: int = BLOCK_V) -> None:
    """fused_chain.chain_backward's contract, launched unconditionally."""
    nc, BH, C, Dk = chain_sizes(w, kt, decay, who=WHO)
    Dv = g.shape[-1]
    expect("g", g, (BH, Dk, Dv), who=WHO)
    expect("ds_states", ds_states, (nc, BH, Dk, Dv), who=WHO)
    expect("after", after, (nc, BH, Dk, Dv), who=WHO)
    if nc == 0 or BH == 0 or Dv == 0:
        return
    _launch(kernels().chain_backward_kernel, (g, w, kt, _or(decay, w), ds_states, _or(after, g)),
            (nc, C, Dk, Dv),
            (*g.stride(), *w.stride(), *kt.stride(), *_strides(decay, 2), *ds_states.stride(),
             *_strides(after, 4)),
            (BH, -(-Dv // block_v)), HAS_DECAY=decay is not None, HAS_AFTER=after is not None,
            **_blocks(C, Dk, block_v))


def shard_map(m, w, u, kt, decay, block_v: int = BLOCK_V) -> None:
    """fused_chain.chain_map's contract, launched unconditionally."""
    nc, BH, C, Dk = chain_sizes(w, kt, decay, who=WHO)
    Dv = u.shape[-1]
    expect("u", u, (nc, BH, C, Dv), who=WHO)
    expect("m", m, (BH, Dk, Dk + Dv), who=WHO)
    if nc == 0 or BH == 0:
        return
    _launch(kernels().chain_map_kernel, (m, w, u, kt, _or(decay, w)), (nc, C, Dk, Dv),
            (*m.stride(), *w.stride(), *u.stride(), *kt.stride(), *_strides(decay, 2)),
            (BH, -(-(Dk + Dv) // block_v)), HAS_DECAY=decay is not None,
            **_blocks(C, Dk, block_v))


def _or(x: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A pointer for an absent input the kernel never reads (its HAS_ flag is off)."""
    return x if x is not None else stand_in


def chain_forward(states, deltas, w, u, kt, decay) -> bool:
    """As fused_chain.chain_forward, on CUDA fp32 tensors; False elsewhere."""
    if not _applies(states, deltas, w, u, kt, decay):
        return False
    forward(states, deltas, w, u, kt, decay)
    return True


def chain_backward(g, w, kt, decay, ds_states, after) -> bool:
    """As fused_chain.chain_backward, on CUDA fp32 tensors; False elsewhere."""
    if not _applies(g, w, kt, decay, ds_states, after):
        return False
    backward(g, w, kt, decay, ds_states, after)
    return True


def chain_map(m, w, u, kt, decay) -> bool:
    """As fused_chain.chain_map, on CUDA fp32 tensors; False elsewhere."""
    if not _applies(m, w, u, kt, decay):
        return False
    shard_map(m, w, u, kt, decay)
    return True
