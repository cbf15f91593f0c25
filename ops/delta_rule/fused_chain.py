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

Building and loading (the native code runs with this process's rights, so nothing another
user could have written is ever loaded):

- `$CC` (default `cc`) compiles fused_chain.c at -O3 -march=native -pthread (FLAG_SETS: plain
  -O3 where -march=native is unknown, and a serial build where -pthread fails). No compiler
  on the PATH: the torch loop runs, silently.
- `$SEQSHARD_CACHE` (default ~/.cache/seqshard) holds the libraries. It is created, with any
  parents it has to create, with mode 0700. The cache, every library and its record must be
  owned by this user (os.getuid()), not group/other-writable and not symlinks; else the cache
  is refused: one RuntimeWarning naming the path and the reason, then the torch loop. (A
  cache reached through a symlink: point SEQSHARD_CACHE at the real folder.)
- A library's name is a hash of the source, the compiler, its `--version` first line, the
  flags, the precision and this CPU's features, so a shared home directory never hands one
  machine (or one compiler) another's build.
- Each build goes into a fresh private temporary folder in the cache; its sha256 is recorded
  in `<library>.sha256` (0600); both are renamed into place. Before dlopen the library is
  opened (no symlinks followed), hashed, and loaded through that same open file only if the
  hash equals the record. A library with no record or another hash was not built here: it is
  rebuilt over, never loaded.
- Ranks on one node build under an flock on `build.lock` in the cache: one compiles, the
  others wait and load its verified result.
- COMPILE_TIMEOUT_S (45 s, a module constant) bounds a first use: the version query and every
  compile together; a rank waiting on another's build gives up LOCK_SLACK_S (5 s) later. Both
  stay under the 60 s collective timeout of the rank pool (dist's default is 300 s), so a slow
  compiler costs one warning and the torch loop, not a collective timeout on the other ranks.
- A failed build, an unusable cache or a library that will not load: one RuntimeWarning, then
  the torch loop. `SEQSHARD_FUSED_CHAIN=0`: always the torch loop.
- The shapes and strides the C loops trust are checked before each call and raise ValueError
  (not assert, which `python -O` strips).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import platform
import secrets
import shutil
import stat
import subprocess
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
# tried in order: the first that builds is used (each is part of its library's cache key)
FLAG_SETS = (["-O3", "-march=native", "-pthread"],  # heads split over POSIX threads
             ["-O3", "-pthread"],  # where -march=native is unknown
             ["-O3", "-DSEQSHARD_SERIAL"])  # no pthreads: every head on the caller's thread
_TYPES = {torch.float32: "float", torch.float64: "double"}
COMPILE_TIMEOUT_S = 45.0  # a whole first-use build; must stay under the collective timeout
LOCK_SLACK_S = 5.0  # how much longer than that a rank waits on another rank's build
LOCK_NAME = "build.lock"
_POLL_S = 0.05
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


def _cpu_id() -> str:
    """What -march=native depends on: the machine and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


class _Unsafe(Exception):
    """A cache entry this code will not trust: refused with a warning, never loaded."""


class _BuildFailed(Exception):
    """No library could be built or found (the compiler failed, timed out, or the cache is
    unwritable)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("SEQSHARD_CACHE") or Path.home() / ".cache" / "seqshard")


def _check_owned(st: os.stat_result, path: Path, directory: bool) -> None:
    """Raise _Unsafe unless `st` is a plain file (or a folder) of this user that only this
    user can write."""
    if stat.S_ISLNK(st.st_mode):
        raise _Unsafe(f"{path} is a symlink")
    if not (stat.S_ISDIR if directory else stat.S_ISREG)(st.st_mode):
        raise _Unsafe(f"{path} is not a {'folder' if directory else 'regular file'}")
    if st.st_uid != os.getuid():
        raise _Unsafe(f"{path} is owned by uid {st.st_uid}, not by this user "
                      f"(uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise _Unsafe(f"{path} is group/other-writable "
                      f"(mode {oct(stat.S_IMODE(st.st_mode))})")


def _private_dir(cache: Path) -> int:
    """An open fd of the cache folder, created 0700 (with the parents it needs) and checked;
    everything after goes through this fd, so the folder cannot be swapped under us."""
    missing, path = [], cache
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another rank made it first
            os.mkdir(d, 0o700)
    _check_owned(os.lstat(cache), cache, directory=True)
    fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check_owned(os.fstat(fd), cache, directory=True)  # the folder we checked above
    except _Unsafe:
        os.close(fd)
        raise
    return fd


def _open_in(dfd: int, cache: Path, name: str, flags: int, mode: int = 0o600) -> int:
    """Open cache/name through the folder's fd without following a symlink (and without
    blocking on a planted FIFO); raise _Unsafe unless it is this user's private plain file."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode,
                     dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Unsafe(f"{cache / name} is a symlink") from None
        raise
    try:
        _check_owned(os.fstat(fd), cache / name, directory=False)
    except _Unsafe:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _build_lock(dfd: int, cache: Path, deadline: float):
    """Hold the cache's build lock: one rank per node compiles, the others wait for it."""
    fd = _open_in(dfd, cache, LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _BuildFailed(f"another process held {cache / LOCK_NAME} for over "
                                       f"{COMPILE_TIMEOUT_S + LOCK_SLACK_S:.0f} s") from None
                time.sleep(_POLL_S)  # flock has no timeout of its own
        yield
    finally:
        os.close(fd)  # releases the lock


def _sha256(fd: int) -> str:
    digest, offset = hashlib.sha256(), 0
    while block := os.pread(fd, 1 << 20, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def _verified(dfd: int, cache: Path, name: str) -> int | None:
    """An open fd of cache/name if this code built it (its hash matches the record); None if
    it is absent or was not built here (no record, another hash): then it is rebuilt."""
    try:
        fd = _open_in(dfd, cache, name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            record = _open_in(dfd, cache, name + ".sha256", os.O_RDONLY)
        except FileNotFoundError:
            os.close(fd)
            return None
        with os.fdopen(record, "rb") as f:
            recorded = f.read(4096).split()[:1]
        if recorded != [_sha256(fd).encode()]:
            os.close(fd)
            return None
        return fd
    except BaseException:
        os.close(fd)
        raise


def _compile(dfd: int, cache: Path, name: str, cmd: list[str], deadline: float) -> str | None:
    """Compile into a fresh private folder in the cache, record the result's hash, then
    rename both into place. Returns the compiler's error or None."""
    tmp = f".build-{secrets.token_hex(8)}"
    os.mkdir(tmp, 0o700, dir_fd=dfd)
    try:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no time left of the {COMPILE_TIMEOUT_S:.0f} s build budget"
        try:
            done = subprocess.run(cmd + [str(cache / tmp / "lib.so")], capture_output=True,
                                  text=True, timeout=left)
        except (OSError, subprocess.SubprocessError) as e:  # compiler hung or vanished
            return f"{type(e).__name__}: {e}"
        if done.returncode != 0:
            return done.stderr.strip()[-500:]
        # made by the linker in our 0700 folder (so by no one else), 0777 minus the umask
        fd = os.open(f"{tmp}/lib.so", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            os.fchmod(fd, 0o700)
            digest = _sha256(fd)
        finally:
            os.close(fd)
        record = _open_in(dfd, cache, f"{tmp}/record", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(record, "w") as f:
            f.write(f"{digest}  {name}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{tmp}/lib.so", name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.replace(f"{tmp}/record", name + ".sha256", src_dir_fd=dfd, dst_dir_fd=dfd)
        return None
    finally:
        _remove(dfd, tmp)


def _remove(dfd: int, tmp: str) -> None:
    """Delete a build folder and the files in it (shutil.rmtree takes no dir_fd before 3.11)."""
    with contextlib.suppress(OSError):
        sub = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            for entry in os.listdir(sub):
                os.unlink(entry, dir_fd=sub)
        finally:
            os.close(sub)
        os.rmdir(tmp, dir_fd=dfd)


def _compiler_version(cc: str, deadline: float) -> str:
    """`cc --version`'s first line: part of the cache key, so an upgraded compiler rebuilds."""
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True,
                              timeout=max(deadline - time.monotonic(), 0.001))
    except (OSError, subprocess.SubprocessError) as e:
        raise _BuildFailed(f"{cc} --version: {type(e).__name__}: {e}") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise _BuildFailed(f"{cc} --version failed: {done.stderr.strip()[-200:]}")
    return lines[0]


def _built(dfd: int, cache: Path, cc: str, version: str, real: str, deadline: float):
    """(fd, path) of the verified library for REAL = real, built if not cached."""
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(SOURCE.read_bytes() + repr(
            (cc, version, flags, real, _cpu_id())).encode()).hexdigest()[:16]
        name = f"fused_chain_{real}_{key}.so"
        fd = _verified(dfd, cache, name)
        if fd is None:
            cmd = [cc, *flags, "-shared", "-fPIC", f"-DREAL={real}", str(SOURCE), "-o"]
            error = _compile(dfd, cache, name, cmd, deadline)
            if error is not None:
                errors.append(f"{' '.join(cmd)} {cache / name}: {error}")
                continue
            fd = _verified(dfd, cache, name)
        if fd is not None:
            return fd, cache / name
        errors.append(f"{cache / name} does not match its record right after the build")
    raise _BuildFailed(" | ".join(errors))


def _open_library(real: str) -> tuple[int, Path] | None:
    """(fd, path) of the verified library for REAL = real; None if there is none (no compiler:
    silently; an unsafe cache or a failed build: with one warning)."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return None
    cache = _cache_dir()
    deadline = time.monotonic() + COMPILE_TIMEOUT_S
    try:
        version = _compiler_version(cc, deadline)
        dfd = _private_dir(cache)
        try:
            with _build_lock(dfd, cache, deadline + LOCK_SLACK_S):
                return _built(dfd, cache, cc, version, real, deadline)
        finally:
            os.close(dfd)
    except _Unsafe as e:
        warnings.warn(f"seqshard: refusing to load the fused delta-rule chain: {e}; the torch "
                      "loop runs instead (slower on the CPU)", RuntimeWarning)
    except (_BuildFailed, OSError) as e:  # e.g. the cache lies under a file
        warnings.warn("seqshard: the fused delta-rule chain did not build, the torch loop runs "
                      f"instead (slower on the CPU): {e}", RuntimeWarning)
    return None


def _load(dtype: torch.dtype) -> ctypes.CDLL | None:
    if dtype not in _libs:
        _libs[dtype] = _dlopen(_open_library(_TYPES[dtype]))
    return _libs[dtype]


def _dlopen(opened: tuple[int, Path] | None) -> ctypes.CDLL | None:
    """Load the verified library through its open fd, so the file hashed is the file mapped.
    The fd stays open for the process's life: glibc finds loaded objects by name, and a
    reused /proc/self/fd/N would hand back an earlier library."""
    if opened is None:
        return None
    fd, path = opened
    via = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(path)
    try:
        lib = ctypes.CDLL(via)
    except OSError as e:  # e.g. a cache on a noexec mount
        os.close(fd)
        warnings.warn(f"seqshard: could not load {path} ({e}); the torch loop runs instead",
                      RuntimeWarning)
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


def _expect(name: str, x: torch.Tensor | None, shape: tuple, contiguous: bool = False):
    """ValueError unless x has `shape` (and, where the C loop writes it as one block, is
    contiguous): the C loops index by these sizes with no bounds of their own. Not assert,
    which `python -O` strips."""
    if x is None:
        return
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"fused chain: {name} has shape {tuple(x.shape)}, expected "
                         f"{tuple(shape)}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"fused chain: {name} must be contiguous; its strides are {x.stride()}")


def _sizes(w: torch.Tensor, kt: torch.Tensor, decay: torch.Tensor | None):
    """(nc, BH, C, Dk) of w [nc, BH, C, Dk], with kt and decay [nc, BH] checked against it."""
    if w.dim() != 4:
        raise ValueError(f"fused chain: w has shape {tuple(w.shape)}, expected [nc, BH, C, Dk]")
    nc, BH, C, Dk = w.shape
    _expect("kt", kt, w.shape)
    _expect("decay", decay, (nc, BH))
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
    nc, BH, C, Dk = _sizes(w, kt, decay)
    threads = _threads(threads, BH, nc)
    Dv = _last(u)
    _expect("u", u, (nc, BH, C, Dv))
    _expect("states", states, (nc + 1, BH, Dk, Dv), contiguous=True)
    _expect("deltas", deltas, (nc, BH, C, Dv), contiguous=True)
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
    nc, BH, C, Dk = _sizes(w, kt, decay)
    threads = _threads(threads, BH, nc)
    Dv = _last(g)
    _expect("g", g, (BH, Dk, Dv), contiguous=True)
    _expect("ds_states", ds_states, (nc, BH, Dk, Dv))
    _expect("after", after, (nc, BH, Dk, Dv))
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
    nc, BH, C, Dk = _sizes(w, kt, decay)
    threads = _threads(threads, BH, nc)
    Dv = _last(u)
    _expect("u", u, (nc, BH, C, Dv))
    _expect("m", m, (BH, Dk, Dk + Dv), contiguous=True)
    lib = _native(m, w, u, kt, decay)
    if lib is None:
        return False
    w, u, kt = (_rows_contiguous(x) for x in (w, u, kt))
    scratch = w.new_empty(threads * C * (Dk + Dv))  # one [C, Dk + Dv] per thread
    lib.chain_map(BH, nc, C, Dk, Dv, _chunks(w), _chunks(u), _chunks(kt), _chunks(decay),
                  m.data_ptr(), scratch.data_ptr(), threads)
    return True
