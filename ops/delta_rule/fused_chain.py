"""The state chain as one native call on the CPU (fused_chain.c), compiled on first use.

The chain is the delta rule's only sequential part: per chunk, Delta = U - W S and
S' = decay S + Kt^T Delta, two products of C x Dk x Dv. Issued from Python as torch calls
they cost about 20 us per chunk at C = 32, Dk = Dv = 64 (dispatch, views, the copy baddbmm
makes), more than their arithmetic; the C loop keeps each head's state in cache and does
the same chain in less than half the time (README.md: measurements).

`chain_forward` (chunk.chain_states), `chain_backward` (chunk.chain_grads) and `chain_map`
(chunk.shard_map: a middle rank's map for the "scan" schedule) fill the caller's buffers in
place. They return False, writing nothing, whenever the native path does not apply (not a
CPU tensor, not fp32/fp64, no C compiler, or SEQSHARD_FUSED_CHAIN=0), and chunk.py then runs
its torch loops, which stay the reference the tests hold this against.

The library is built with the C compiler (`$CC`, else `cc`) at -O3 for this CPU and cached
under `$SEQSHARD_CACHE` (default ~/.cache/seqshard), keyed by the source, the flags and the
CPU, so a shared home directory never hands one machine another's build. Ranks that build at
once each write their own file and rename it into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the second where -march=native is unknown
_TYPES = {torch.float32: "float", torch.float64: "double"}
_libs: dict[torch.dtype, ctypes.CDLL | None] = {}


class _Chunks(ctypes.Structure):
    """fused_chain.c's `chunks`: chunk j of head h at p + h*sh + j*sj, rows sr apart."""

    _fields_ = [("p", ctypes.c_void_p), ("sh", ctypes.c_int64), ("sj", ctypes.c_int64),
                ("sr", ctypes.c_int64)]


_NONE = _Chunks(None, 0, 0, 0)


def enabled() -> bool:
    return os.environ.get("SEQSHARD_FUSED_CHAIN", "1") != "0"


def _cpu_id() -> str:
    """What -march=native depends on: the machine and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _build(real: str) -> Path | None:
    """The compiled library for REAL = real, built if not cached; None if it cannot be (no
    compiler: silently; a failed build or an unwritable cache: with one warning)."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return None
    cache = Path(os.environ.get("SEQSHARD_CACHE") or Path.home() / ".cache" / "seqshard")
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(
            SOURCE.read_bytes() + repr((cc, flags, real, _cpu_id())).encode()).hexdigest()[:16]
        lib = cache / f"fused_chain_{real}_{key}.so"
        if lib.exists():
            return lib
        cmd = [cc, *flags, "-shared", "-fPIC", f"-DREAL={real}", str(SOURCE), "-o"]
        try:
            error = _compile(cmd, lib)
        except (OSError, subprocess.SubprocessError) as e:  # unwritable cache, compiler hung
            error = f"{type(e).__name__}: {e}"
        if error is None:
            return lib
        errors.append(f"{' '.join(cmd)} {lib}: {error}")
    warnings.warn("seqshard: the fused delta-rule chain did not build, the torch loop runs "
                  "instead (slower on the CPU): " + " | ".join(errors), RuntimeWarning)
    return None


def _compile(cmd: list[str], lib: Path) -> str | None:
    """Compile into a temporary file beside `lib`, then rename it into place (atomic: a
    concurrent build of the same key is identical). Returns the compiler's error or None."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        done = subprocess.run(cmd + [tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return done.stderr.strip()[-500:]
        os.replace(tmp, lib)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(dtype: torch.dtype) -> ctypes.CDLL | None:
    if dtype not in _libs:
        path = _build(_TYPES[dtype])
        lib = None
        if path is not None:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:  # e.g. a cache on a noexec mount
                warnings.warn(f"seqshard: could not load {path} ({e}); the torch loop runs "
                              "instead", RuntimeWarning)
        if lib is not None:
            i64, ch, ptr = ctypes.c_int64, _Chunks, ctypes.c_void_p
            lib.chain_forward.argtypes = [i64] * 5 + [ch] * 4 + [ptr] * 2
            lib.chain_backward.argtypes = [i64] * 5 + [ch] * 5 + [ptr] * 2
            lib.chain_map.argtypes = [i64] * 5 + [ch] * 4 + [ptr] * 2
        _libs[dtype] = lib
    return _libs[dtype]


def _native(*tensors: torch.Tensor | None) -> ctypes.CDLL | None:
    """The library for these tensors, or None where the native path does not apply."""
    first = tensors[0]
    if not enabled() or first.device.type != "cpu" or first.dtype not in _TYPES:
        return None
    if any(t is not None and (t.dtype != first.dtype or t.device != first.device)
           for t in tensors):
        return None
    return _load(first.dtype)


def _chunks(x: torch.Tensor | None) -> _Chunks:
    """x [nc, BH, C, D] (contiguous D) or a decay [nc, BH] as the C struct."""
    if x is None:
        return _NONE
    if x.dim() == 2:
        return _Chunks(x.data_ptr(), x.stride(1), x.stride(0), 0)
    assert x.stride(-1) == 1, "fused chain: the last dim must be contiguous"
    return _Chunks(x.data_ptr(), x.stride(1), x.stride(0), x.stride(2))


def _rows_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether CPU tensors of `dtype` take the native chain here (builds it on first use)."""
    return enabled() and dtype in _TYPES and _load(dtype) is not None


def chain_forward(states, deltas, w, u, kt, decay) -> bool:
    """Fill states [nc + 1, BH, Dk, Dv] (states[0] given) and deltas [nc, BH, C, Dv], both
    contiguous, from w, kt [nc, BH, C, Dk], u [nc, BH, C, Dv], decay [nc, BH] or None.
    False (nothing written) where the native path does not apply."""
    lib = _native(states, w, u, kt, decay)
    if lib is None:
        return False
    assert states.is_contiguous() and deltas.is_contiguous()
    w, u, kt = (_rows_contiguous(x) for x in (w, u, kt))
    nc, BH, C, Dk = w.shape
    lib.chain_forward(BH, nc, C, Dk, u.shape[-1], _chunks(w), _chunks(u), _chunks(kt),
                      _chunks(decay), states.data_ptr(), deltas.data_ptr())
    return True


def chain_backward(g, w, kt, decay, ds_states, after) -> bool:
    """g [BH, Dk, Dv] (contiguous): the gradient of the state after the last chunk, replaced
    by that of the first chunk's state; w, kt [nc, BH, C, Dk]; decay [nc, BH] or None;
    ds_states and after (written, or None) [nc, BH, Dk, Dv]. False (nothing written) where
    the native path does not apply."""
    lib = _native(g, w, kt, decay, ds_states, after)
    if lib is None:
        return False
    assert g.is_contiguous() and (after is None or after.stride(-1) == 1)
    w, kt, ds_states = (_rows_contiguous(x) for x in (w, kt, ds_states))
    nc, BH, C, Dk = w.shape
    Dv = g.shape[-1]
    scratch = g.new_empty(C * Dv)
    lib.chain_backward(BH, nc, C, Dk, Dv, _chunks(w), _chunks(kt), _chunks(decay),
                       _chunks(ds_states), _chunks(after), g.data_ptr(), scratch.data_ptr())
    return True


def chain_map(m, w, u, kt, decay) -> bool:
    """Run m = [A | B] [BH, Dk, Dk + Dv] (contiguous; the identity and zeros for the map of
    all chunks together, S -> A S + B) through every chunk in place: w, kt [nc, BH, C, Dk];
    u [nc, BH, C, Dv]; decay [nc, BH] or None. False (nothing written) where the native
    path does not apply."""
    lib = _native(m, w, u, kt, decay)
    if lib is None:
        return False
    assert m.is_contiguous()
    w, u, kt = (_rows_contiguous(x) for x in (w, u, kt))
    nc, BH, C, Dk = w.shape
    Dv = u.shape[-1]
    scratch = w.new_empty(C * (Dk + Dv))
    lib.chain_map(BH, nc, C, Dk, Dv, _chunks(w), _chunks(u), _chunks(kt), _chunks(decay),
                  m.data_ptr(), scratch.data_ptr())
    return True
