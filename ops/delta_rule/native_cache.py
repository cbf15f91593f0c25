"""A native library built from C source into a private, verified cache, safe to dlopen.

The library runs with this process's rights, so nothing another user could have written is
ever loaded:

- `$SEQSHARD_CACHE` (default ~/.cache/seqshard) holds the libraries. It is created, with any
  parents it has to create, with mode 0700. The cache, every library and its record must be
  owned by this user (os.getuid()), not group/other-writable and not symlinks; else the cache
  is refused (`open_library` warns once, naming the path and the reason, and returns None).
- A library's name is a hash of the source, the compiler, its `--version` first line, the
  flags and this CPU's features, so a shared home directory never hands one machine (or one
  compiler) another's build.
- Each build goes into a fresh private temporary folder in the cache; its sha256 is recorded
  in `<library>.sha256` (0600); both are renamed into place. Before loading, the library is
  opened (no symlinks followed), hashed, and loaded through that same open file only if the
  hash equals the record. A library with no record or another hash was not built here: it is
  rebuilt over, never loaded.
- Ranks on one node build under an flock on `build.lock` in the cache: one compiles, the
  others wait and load its verified result.
- COMPILE_TIMEOUT_S bounds a first use (the version query and every compile together); a rank
  waiting on another's build gives up LOCK_SLACK_S later. Both stay under the 60 s collective
  timeout of the rank pool, so a slow compiler costs one warning, not a collective timeout on
  the other ranks.
- No compiler (`$CC`, default `cc`) on the PATH: None, silently.
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

COMPILE_TIMEOUT_S = 45.0  # a whole first-use build; must stay under the collective timeout
LOCK_SLACK_S = 5.0  # how much longer than that a rank waits on another rank's build
LOCK_NAME = "build.lock"
_POLL_S = 0.05


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


def _built(dfd: int, cache: Path, cc: str, version: str, source: Path, flag_sets,
           stem: str, deadline: float):
    """(fd, path) of the verified library `stem`_<key>.so, built if not cached."""
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(source.read_bytes() + repr(
            (cc, version, flags, _cpu_id())).encode()).hexdigest()[:16]
        name = f"{stem}_{key}.so"
        fd = _verified(dfd, cache, name)
        if fd is None:
            cmd = [cc, *flags, "-shared", "-fPIC", str(source), "-o"]
            error = _compile(dfd, cache, name, cmd, deadline)
            if error is not None:
                errors.append(f"{' '.join(cmd)} {cache / name}: {error}")
                continue
            fd = _verified(dfd, cache, name)
        if fd is not None:
            return fd, cache / name
        errors.append(f"{cache / name} does not match its record right after the build")
    raise _BuildFailed(" | ".join(errors))


def open_library(source: Path, flag_sets, stem: str, what: str) -> tuple[int, Path] | None:
    """(fd, path) of the verified library built from `source` with the first of `flag_sets`
    that compiles (each a list of compiler flags, part of the cache key); None if there is
    none (no compiler: silently; an unsafe cache or a failed build: with one RuntimeWarning
    that names `what`). `stem` starts the library's file name."""
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
                return _built(dfd, cache, cc, version, source, flag_sets, stem, deadline)
        finally:
            os.close(dfd)
    except _Unsafe as e:
        warnings.warn(f"seqshard: refusing to load {what}: {e}", RuntimeWarning)
    except (_BuildFailed, OSError) as e:  # e.g. the cache lies under a file
        warnings.warn(f"seqshard: {what} did not build: {e}", RuntimeWarning)
    return None


def load_opened(opened: tuple[int, Path] | None, what: str) -> ctypes.CDLL | None:
    """Load a verified library through its open fd, so the file hashed is the file mapped.
    The fd stays open for the process's life: glibc finds loaded objects by name, and a
    reused /proc/self/fd/N would hand back an earlier library."""
    if opened is None:
        return None
    fd, path = opened
    via = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(path)
    try:
        return ctypes.CDLL(via)
    except OSError as e:  # e.g. a cache on a noexec mount
        os.close(fd)
        warnings.warn(f"seqshard: could not load {path} ({e}); {what}", RuntimeWarning)
        return None
