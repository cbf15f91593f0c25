"""The workers' malloc (`[launch] allocator`): the C library's, or the jemalloc that the ray
wheel ships, set up so that a long-context step neither page-faults nor fragments.

A CPU step of a long-context model frees and reallocates the same few tensor sizes over and
over: pieces of a few MiB, and whole-shard tensors of hundreds of MiB. glibc either keeps the
pieces in its heap, which fragments (+1.5 GB at 128K tokens per process), or, with a low
MALLOC_MMAP_THRESHOLD_, maps every fresh tensor anew, so the kernel faults in and zeroes it
(40-50% of a DeltaNetLM step's CPU). jemalloc that never purges reuses freed blocks by size
class; blocks of 128 MiB and more come from an arena of their own, so a freed whole-shard
block is never split by the pieces (benchmarks/RESULTS.md has the measurements).

The library is ray's own file (`ray/core/libjemalloc.so`), preloaded into the worker
processes (LD_PRELOAD at their start): code of the installed ray package, trusted as much as
importing ray. Nothing is compiled or downloaded.
"""

from __future__ import annotations

import importlib.util
import os

ALLOCATORS = ("system", "jemalloc")
# never purge freed pages; blocks of 128 MiB and more from their own arena
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:134217728"


def jemalloc_library() -> str:
    """The path of the libjemalloc.so in the installed ray package; FileNotFoundError naming
    where it was looked for."""
    spec = importlib.util.find_spec("ray")
    folders = spec.submodule_search_locations if spec is not None else None
    library = os.path.join(folders[0], "core", "libjemalloc.so") if folders else ""
    if not os.path.isfile(library):
        raise FileNotFoundError(f"no libjemalloc.so in the installed ray package "
                                f"({library or 'ray is not installed'})")
    return library


def jemalloc_env(preload: str = "") -> dict[str, str]:
    """The environment that starts a process on ray's jemalloc: LD_PRELOAD (the library ahead
    of `preload`, what was preloaded already) and MALLOC_CONF."""
    return {"LD_PRELOAD": ":".join(filter(None, [jemalloc_library(), preload])),
            "MALLOC_CONF": JEMALLOC_CONF}


def running_allocator() -> str:
    """'jemalloc' when this process has libjemalloc mapped (it was preloaded), else 'system'."""
    try:
        with open("/proc/self/maps") as maps:
            return "jemalloc" if any("libjemalloc" in line for line in maps) else "system"
    except OSError:  # not Linux: nothing was preloaded by us
        return "system"
