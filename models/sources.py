"""Token streams on disk, read by position: a .bin of token ids, or text files read as bytes.

A source is one flat stream of token ids. Nothing reads the whole stream into memory:
- `BinTokens`: a flat file of uint16 / uint32 ids (the nanoGPT convention), memory-mapped;
  reading positions touches only their pages.
- `ByteFiles`: a text file or a sorted list of text files, as UTF-8 *bytes* (ids 0..255). Each
  file is followed by one separator byte 0 (NUL, which text files do not contain), so a
  folder's files are its documents. An index of (file, stream offset) is kept; a read opens
  only the files its byte range overlaps.

`take(positions)` reads arbitrary stream positions: positions closer together than a window
are read as one byte range and picked from (a striped shard is every P-th token), so the
transient memory of a read is at most `WINDOW` tokens beyond its result.
"""

from __future__ import annotations

import bisect
import functools
import os
import sysconfig
from pathlib import Path

import numpy as np

SEPARATOR = 0
"""The byte written after every file of a byte source (the default document separator)."""
WINDOW = 1 << 20
"""Most tokens one read of a byte range spans (bounds a striped shard's transient memory)."""
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SCAN_CHUNK = 1 << 24  # tokens per step of the max-id scan of a .bin


class BinTokens:
    """A flat .bin file of token ids, memory-mapped (opened lazily, so it pickles cheaply)."""

    def __init__(self, path: str, dtype: str = "uint16"):
        if dtype not in BIN_DTYPES:
            raise ValueError(f"data.dtype = {dtype!r}: expected one of {sorted(BIN_DTYPES)}")
        if not os.path.isfile(path):
            raise ValueError(f"data.path {path!r} does not exist (a .bin file of token ids)")
        self.path, self.dtype = path, dtype
        itemsize = np.dtype(BIN_DTYPES[dtype]).itemsize
        nbytes = os.path.getsize(path)
        if nbytes % itemsize:
            raise ValueError(f"data.path {path!r} has {nbytes} bytes, not a whole number of "
                             f"{dtype} ids ({itemsize} bytes each): is data.dtype right?")
        self.size = nbytes // itemsize
        self.name = path
        self._map = None

    def _mm(self) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=BIN_DTYPES[self.dtype], mode="r")
        return self._map

    def span(self, start: int, length: int) -> np.ndarray:
        return self._mm()[start: start + length].astype(np.int64)

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self._mm()[positions].astype(np.int64)  # fancy indexing reads only those pages

    def max_id(self) -> tuple[int, int]:
        """(largest id, its first position), scanned in chunks; cached per file version."""
        stat = os.stat(self.path)
        return _bin_max(self.path, self.dtype, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _bin_max(path: str, dtype: str, size: int, mtime: int) -> tuple[int, int]:
    mm = np.memmap(path, dtype=BIN_DTYPES[dtype], mode="r")
    best, where = -1, -1
    for start in range(0, len(mm), SCAN_CHUNK):
        chunk = mm[start: start + SCAN_CHUNK]
        i = int(chunk.argmax())
        if int(chunk[i]) > best:
            best, where = int(chunk[i]), start + i
    return best, where


class ByteFiles:
    """Text files as one byte stream: each file's bytes, then one SEPARATOR byte."""

    def __init__(self, files: list[str], name: str):
        if not files:
            raise ValueError(f"data.path {name!r} holds no files to read")
        self.files, self.name = files, name
        sizes = [os.path.getsize(f) + 1 for f in files]  # + the separator
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()  # [files + 1]
        self.size = self.offsets[-1]

    def span(self, start: int, length: int) -> np.ndarray:
        out = np.full(length, SEPARATOR, dtype=np.uint8)
        end, pos = start + length, start
        i = bisect.bisect_right(self.offsets, start) - 1
        while pos < end and i < len(self.files):
            lo = pos - self.offsets[i]
            n = min(end, self.offsets[i + 1] - 1) - pos  # bytes of this file (not its separator)
            if n > 0:
                with open(self.files[i], "rb") as f:
                    f.seek(lo)
                    data = f.read(n)
                out[pos - start: pos - start + len(data)] = np.frombuffer(data, np.uint8)
            pos, i = self.offsets[i + 1], i + 1
        return out.astype(np.int64)

    def take(self, positions: np.ndarray) -> np.ndarray:
        order = np.argsort(positions, kind="stable")
        sorted_pos = positions[order]
        out = np.empty(len(positions), dtype=np.int64)
        i = 0
        while i < len(sorted_pos):
            lo = int(sorted_pos[i])
            j = int(np.searchsorted(sorted_pos, lo + WINDOW, side="left"))
            hi = int(sorted_pos[j - 1]) + 1
            out[order[i:j]] = self.span(lo, hi - lo)[sorted_pos[i:j] - lo]
            i = j
        return out


def text_files(path: str) -> list[str]:
    """A text file, or every non-hidden file under a folder, sorted by relative path."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"data.path {path!r} does not exist (a .bin, a text file or a folder)")
    root = Path(path)
    return [str(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """The standard library's own *.py files (not the packages installed beside it), sorted by
    relative path; the installed packages' folders are never walked."""
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        rel = os.path.relpath(folder, root)
        found += [(Path(rel, n).parts, os.path.join(folder, n)) for n in names if n.endswith(".py")]
    return tuple(path for _, path in sorted(found))


def open_source(path: str, dtype: str = "uint16"):
    """BinTokens for a *.bin path, ByteFiles for a text file, a folder, or '' (the stdlib)."""
    if not path:
        return ByteFiles(list(stdlib_files()), f"<python stdlib {stdlib_root()}>")
    if path.endswith(".bin"):
        return BinTokens(path, dtype)
    return ByteFiles(text_files(path), path)
