"""The state chain as one native call on the CPU (fused_chain.c), compiled on first use.

The chain is the delta rule's only sequential part: per chunk, Delta = U - W S and
S' = decay S + Kt^T Delta, two products of C x Dk x Dv. Issued from Python as torch calls
they cost about 20 us per chunk at C = 32, Dk = Dv = 64 (dispatch, views, the copy baddbmm
makes), more than their arithmetic; the C loop keeps each head's state in cache and does
the same chain in less than half the time (README.md: measurements).

`chain_forward` (chunk.chain_states), `chain_backward` (chunk.chain_grads) and `chain_map`
(chunk.shard_map: a middle rank's map for the "scan" schedule) fill the caller's buffers in
place. The (batch, head) chains are independent: the C code runs them on `threads` POSIX
threads (default torch.get_num_threads(), the rank's intra-op threads, as the torch loop
uses; never more than B*H, nor than MIN_STEPS_PER_THREAD chunk steps allow), one contiguous
range of heads each. Every head's arithmetic is
the same for any split, so the result is bit-identical for every thread count. They return False, writing nothing, whenever the native path does not apply (not a
CPU tensor, not fp32/fp64, no C compiler, or SEQSHARD_FUSED_CHAIN=0), and chunk.py then runs
its torch loops, which stay the reference the tests hold this against.

Building and loading go through `native_cache` (read its docstring for the rules): `$CC`
(default `cc`) compiles fused_chain.c at -O3 -march=native -pthread (FLAG_SETS: plain -O3
where -march=native is unknown, and a serial build where -pthread fails) into the private,
verified cache `$SEQSHARD_CACHE` (default ~/.cache/seqshard); a library nobody here built is
never loaded. No compiler on the PATH: the torch loop runs, silently. A failed build, an
unusable cache or a library that will not load: one RuntimeWarning, then the torch loop.
`SEQSHARD_FUSED_CHAIN=0`: always the torch loop. The shapes and strides the C loops trust
are checked before each call and raise ValueError (not assert, which `python -O` strips).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from . import native_cache

SOURCE = Path(__file__).with_suffix(".c")
# tried in order: the first that builds is used (each is part of its library's cache key)
FLAG_SETS = (["-O3", "-march=native", "-pthread"],  # heads split over POSIX threads
             ["-O3", "-pthread"],  # where -march=native is unknown
             ["-O3", "-DSEQSHARD_SERIAL"])  # no pthreads: every head on the caller's thread
_TYPES = {torch.float32: "float", torch.float64: "double"}
# Fewest chunk steps (one head through one chunk) worth a thread of its own: starting and
# joining a thread costs ~30-100 us, a step ~6-14 us at C = 32, D = 64 fp32. Measured with
# chain_forward at nc = 1..64, BH = 2/8 on the 2-core dev VM (loaded, 2026-11-29; RESULTS.md
# "Fused chain threads"): two threads lost at 16 steps per thread and won at 64. A short
# chain (a test, a tiny shard) runs serially.
MIN_STEPS_PER_THREAD = 64
_libs: dict[torch.dtype, ctypes.CDLL | None] = {}  # tests reset it to {} to rebuild/reload


class _Chunks(ctypes.Structure):
    """fused_chain.c's `chunks`: chunk j of head h at p + h*sh + j*sj, rows sr apart."""

    _fields_ = [("p", ctypes.c_void_p), ("sh", ctypes.c_int64), ("sj", ctypes.c_int64),
                ("sr", ctypes.c_int64)]


_NONE = _Chunks(None, 0, 0, 0)


def enabled() -> bool:
    return os.environ.get("SEQSHARD_FUSED_CHAIN", "1") != "0"


def _load(dtype: torch.dtype) -> ctypes.CDLL | None:
    if dtype not in _libs:
        real = _TYPES[dtype]
        flag_sets = [flags + [f"-DREAL={real}"] for flags in FLAG_SETS]
        opened = native_cache.open_library(
            SOURCE, flag_sets, f"fused_chain_{real}",
            "the fused delta-rule chain (the torch loop runs instead, slower on the CPU)")
        _libs[dtype] = _dlopen(opened)
    return _libs[dtype]


def _dlopen(opened: tuple[int, Path] | None) -> ctypes.CDLL | None:
    lib = native_cache.load_opened(opened, "the torch loop runs instead")
    if lib is None:
        return None
    i64, ch, ptr = ctypes.c_int64, _Chunks, ctypes.c_void_p
    lib.chain_forward.argtypes = [i64] * 5 + [ch] * 4 + [ptr] * 2 + [i64]
    lib.chain_backward.argtypes = [i64] * 5 + [ch] * 5 + [ptr] * 2 + [i64]
    lib.chain_map.argtypes = [i64] * 5 + [ch] * 4 + [ptr] * 2 + [i64]
    return lib


def _native(*tensors: torch.Tensor | None) -> ctypes.CDLL | None:
    """The library for these tensors, or None where the native path does not apply."""
    first = tensors[0]
    if not enabled() or first.device.type != "cpu" or first.dtype not in _TYPES:
        return None
    if any(t is not None and (t.dtype != first.dtype or t.device != first.device)
           for t in tensors):
        return None
    return _load(first.dtype)


def expect(name: str, x: torch.Tensor | None, shape: tuple, contiguous: bool = False,
           who: str = "fused chain"):
    """ValueError unless x has `shape` (and, where the native loop writes it as one block, is
    contiguous): the C and Triton loops index by these sizes with no bounds of their own. Not
    assert, which `python -O` strips. `who` names the backend in the message."""
    if x is None:
        return
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{who}: {name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{who}: {name} must be contiguous; its strides are {x.stride()}")


def chain_sizes(w: torch.Tensor, kt: torch.Tensor, decay: torch.Tensor | None,
                who: str = "fused chain"):
    """(nc, BH, C, Dk) of w [nc, BH, C, Dk], with kt and decay [nc, BH] checked against it."""
    if w.dim() != 4:
        raise ValueError(f"{who}: w has shape {tuple(w.shape)}, expected [nc, BH, C, Dk]")
    nc, BH, C, Dk = w.shape
    expect("kt", kt, w.shape, who=who)
    expect("decay", decay, (nc, BH), who=who)
    return nc, BH, C, Dk


def _last(x: torch.Tensor) -> int:
    return x.shape[-1] if x.dim() else 0


def _chunks(x: torch.Tensor | None) -> _Chunks:
    """x [nc, BH, C, D] (contiguous D) or a decay [nc, BH] as the C struct."""
    if x is None:
        return _NONE
    if x.dim() == 2:
        return _Chunks(x.data_ptr(), x.stride(1), x.stride(0), 0)
    if x.stride(-1) != 1:
        raise ValueError(f"fused chain: the last dim must be contiguous; strides {x.stride()}")
    return _Chunks(x.data_ptr(), x.stride(1), x.stride(0), x.stride(2))


def _rows_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _threads(threads: int | None, BH: int, nc: int) -> int:
    """How many threads the C call splits the BH heads of nc chunks over: `threads` (default:
    this process's intra-op threads), at most one per head and one per MIN_STEPS_PER_THREAD
    chunk steps (fewer would cost more to start than they save)."""
    if threads is None:
        threads = torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"fused chain: threads must be a positive int, got {threads!r}")
    return max(1, min(threads, BH, nc * BH // MIN_STEPS_PER_THREAD))


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether CPU tensors of `dtype` take the native chain here (builds it on first use)."""
    return enabled() and dtype in _TYPES and _load(dtype) is not None


def chain_forward(states, deltas, w, u, kt, decay, threads: int | None = None) -> bool:
    """Fill states [nc + 1, BH, Dk, Dv] (states[0] given) and deltas [nc, BH, C, Dv], both
    contiguous, from w, kt [nc, BH, C, Dk], u [nc, BH, C, Dv], decay [nc, BH] or None.
    False (nothing written) where the native path does not apply; ValueError for shapes or
    strides that do not fit. threads: see _threads."""
    nc, BH, C, Dk = chain_sizes(w, kt, decay)
    threads = _threads(threads, BH, nc)
    Dv = _last(u)
    expect("u", u, (nc, BH, C, Dv))
    expect("states", states, (nc + 1, BH, Dk, Dv), contiguous=True)
    expect("deltas", deltas, (nc, BH, C, Dv), contiguous=True)
    lib = _native(states, w, u, kt, decay)
    if lib is None:
        return False
    w, u, kt = (_rows_contiguous(x) for x in (w, u, kt))
    lib.chain_forward(BH, nc, C, Dk, Dv, _chunks(w), _chunks(u), _chunks(kt),
                      _chunks(decay), states.data_ptr(), deltas.data_ptr(), threads)
    return True


def chain_backward(g, w, kt, decay, ds_states, after, threads: int | None = None) -> bool:
    """g [BH, Dk, Dv] (contiguous): the gradient of the state after the last chunk, replaced
    by that of the first chunk's state; w, kt [nc, BH, C, Dk]; decay [nc, BH] or None;
    ds_states and after (written, or None) [nc, BH, Dk, Dv]. False (nothing written) where
    the native path does not apply. threads: see _threads."""
    nc, BH, C, Dk = chain_sizes(w, kt, decay)
    threads = _threads(threads, BH, nc)
    Dv = _last(g)
    expect("g", g, (BH, Dk, Dv), contiguous=True)
    expect("ds_states", ds_states, (nc, BH, Dk, Dv))
    expect("after", after, (nc, BH, Dk, Dv))
    if after is not None and after.stride(-1) != 1:  # written in place: cannot be copied
        raise ValueError(f"fused chain: after's last dim must be contiguous; strides "
                         f"{after.stride()}")
    lib = _native(g, w, kt, decay, ds_states, after)
    if lib is None:
        return False
    w, kt, ds_states = (_rows_contiguous(x) for x in (w, kt, ds_states))
    scratch = g.new_empty(threads * C * Dv)  # one [C, Dv] per thread
    lib.chain_backward(BH, nc, C, Dk, Dv, _chunks(w), _chunks(kt), _chunks(decay),
                       _chunks(ds_states), _chunks(after), g.data_ptr(), scratch.data_ptr(),
                       threads)
    return True


def chain_map(m, w, u, kt, decay, threads: int | None = None) -> bool:
    """Run m = [A | B] [BH, Dk, Dk + Dv] (contiguous; the identity and zeros for the map of
    all chunks together, S -> A S + B) through every chunk in place: w, kt [nc, BH, C, Dk];
    u [nc, BH, C, Dv]; decay [nc, BH] or None. False (nothing written) where the native
    path does not apply. threads: see _threads."""
    nc, BH, C, Dk = chain_sizes(w, kt, decay)
    threads = _threads(threads, BH, nc)
    Dv = _last(u)
    expect("u", u, (nc, BH, C, Dv))
    expect("m", m, (BH, Dk, Dk + Dv), contiguous=True)
    lib = _native(m, w, u, kt, decay)
    if lib is None:
        return False
    w, u, kt = (_rows_contiguous(x) for x in (w, u, kt))
    scratch = w.new_empty(threads * C * (Dk + Dv))  # one [C, Dk + Dv] per thread
    lib.chain_map(BH, nc, C, Dk, Dv, _chunks(w), _chunks(u), _chunks(kt), _chunks(decay),
                  m.data_ptr(), scratch.data_ptr(), threads)
    return True
