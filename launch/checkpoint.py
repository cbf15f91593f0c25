"""Atomic checkpoints with a msgpack manifest of files and sha256 checksums.

Layout on disk (the folder must be shared by all ranks, e.g. NFS / Lustre on a cluster):

    checkpoints/
      step-00000004/           complete: renamed into place only after its manifest was written
        MANIFEST.msgpack       {"format", "step", "world_size", "files": {path: {size, sha256}}}
        ...                    whatever the task saved (DeepSpeed shards, our step / RNG state)
      .tmp-step-00000006/      being written (or torn by a crash): never read

A checkpoint is written into a temp folder by every rank, then rank 0 hashes the files, writes
the manifest (itself via temp + rename) and renames the folder into place. A crash at any point
leaves either a temp folder (ignored) or a complete checkpoint. On resume, the newest folder
whose manifest loads and whose files all match their size and checksum wins; a torn or corrupt
one is reported and skipped for the previous one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import msgpack

MANIFEST = "MANIFEST.msgpack"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def temp_dir(root: Path, step: int) -> Path:
    return Path(root) / f".tmp-step-{step:08d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    # makes the rename itself durable (POSIX); not every filesystem supports it
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare(root: Path, step: int) -> Path:
    """Rank 0, before every rank writes: an empty temp folder for `step` (stale ones removed)."""
    root = Path(root)
    if root.exists() and not root.is_dir():  # mkdir would say only "File exists"
        raise NotADirectoryError(errno.ENOTDIR, "checkpoint folder is not a folder", str(root))
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier attempt
    tmp.mkdir()
    return tmp


def commit(root: Path, step: int, *, world_size: int, meta: dict | None = None) -> Path:
    """Rank 0, after every rank finished writing into the temp folder: manifest, then rename."""
    root = Path(root)
    tmp = temp_dir(root, step)
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())  # data on disk before the manifest vouches for it
        rel = path.relative_to(tmp).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "format": FORMAT, "step": step, "world_size": world_size, "files": files,
        "created": time.time(), "meta": meta or {},
    }
    part = tmp / (MANIFEST + ".part")
    with open(part, "wb") as f:
        f.write(msgpack.packb(manifest))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, tmp / MANIFEST)
    final = step_dir(root, step)
    if final.exists():  # same step saved by an earlier attempt: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else the reason it is not."""
    path = Path(path)
    try:
        with open(path / MANIFEST, "rb") as f:
            manifest = msgpack.unpackb(f.read())
    except FileNotFoundError:
        return f"{path.name}: no {MANIFEST} (torn write)"
    except Exception as err:  # truncated or garbled msgpack
        return f"{path.name}: unreadable {MANIFEST} ({type(err).__name__}: {err})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"{path.name}: {MANIFEST} has an unknown format"
    for rel, want in manifest.get("files", {}).items():
        file = path / rel
        if not file.is_file():
            return f"{path.name}: file {rel} is missing"
        if file.stat().st_size != want["size"]:
            return f"{path.name}: file {rel} has {file.stat().st_size} bytes, manifest says {want['size']}"
        if sha256_file(file) != want["sha256"]:
            return f"{path.name}: file {rel} fails its sha256 checksum"
    return None


def read_manifest(path: Path) -> dict:
    with open(Path(path) / MANIFEST, "rb") as f:
        return msgpack.unpackb(f.read())


def candidates(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-* folder, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def latest_complete(root: Path, log=print) -> tuple[int, Path] | None:
    """The newest intact checkpoint as (step, folder), skipping (and logging) broken ones."""
    for step, path in candidates(root):
        problem = verify(path)
        if problem is None:
            return step, path
        log(f"checkpoint {problem}; falling back to an older one")
    return None


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` intact checkpoints (and broken ones older than them)."""
    kept, removed = 0, []
    for _, path in candidates(root):
        if kept < keep and verify(path) is None:
            kept += 1
            continue
        if kept >= keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def meta_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'section.key: A in the checkpoint, B now' for every leaf where two metas differ."""
    # msgpack turned the saved tuples into lists; send the current values through it too
    saved, current = msgpack.unpackb(msgpack.packb(saved)), msgpack.unpackb(msgpack.packb(current))
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        then, now = saved.get(key), current.get(key)
        if isinstance(then, dict) and isinstance(now, dict):
            out += meta_diff(then, now, f"{prefix}{key}.")
        elif then != now:
            out.append(f"{prefix}{key}: {then!r} in the checkpoint, {now!r} now")
    return out
