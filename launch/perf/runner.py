"""Run benchmark points on P real gloo ranks: one group of worker processes per world size.

The driver starts P ranks (`seqshard.dist.RankPool`: spawned processes with the torchrun
variables, each joined to one gloo group) that measure every point of that world size the
driver sends them (see measure.py for how).
Process start-up (import torch, join the group) is paid once per world size, not per point.

A point that fails on any rank, or runs past `point_timeout_s`, is recorded with status
"error" and its world is restarted for the remaining points (a half-finished collective can
leave the group wedged). Points that can never run (e.g. heads not divisible by the Ulysses
degree) are recorded as "skipped" with the reason, before any process sees them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from typing import Callable

from seqshard.dist import RankPool

from . import results
from .workloads import check_spec

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# One rank = one core, like one rank = one GPU: comparisons across P stay per-device, and a
# rank never waits in an OpenMP barrier for a second thread that a busy host descheduled
# (on a loaded 2-core machine that turned 20 ms of small kernels into seconds).
THREADS_PER_RANK = 1


def _pin_malloc(threshold: int = 65536) -> None:
    """Allocations >= threshold become their own mmaps, returned to the OS when freed, so the
    resident high-water mark follows live tensors instead of glibc's growing cache."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        libc.mallopt(M_TRIM_THRESHOLD, threshold)
    except OSError:  # not glibc: peak memory then also counts the allocator's cache
        pass


_NOISE = (b"SyncActivityProfilerHandler", b"allocated before the profiling started")


def _quiet_profiler_lines() -> None:
    """Forward this process's stderr minus the lines the profiler prints per session (kineto's
    start/stop, and the allocator's note that blocks made before the session have no alloc
    event; their frees are then not subtracted, so the peak errs high, never low). C++ writes
    them straight to fd 2, with no switch to turn them off."""
    import threading

    read_fd, write_fd = os.pipe()
    real = os.fdopen(os.dup(2), "wb", buffering=0)
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump():
        with os.fdopen(read_fd, "rb") as lines:
            for line in lines:
                if not any(tag in line for tag in _NOISE):
                    real.write(line)

    threading.Thread(target=pump, daemon=True).start()


def _measure_points(items: list[tuple[int, dict]], mesh_of, modes, warmup: int,
                    repeats: tuple) -> dict[int, dict]:
    """Measure several points *interleaved*: every timing round runs each point once, so a
    burst of other work on the machine slows all of them alike instead of ruining one.

    repeats: (at least, at most, until this many seconds were timed); see measure.py. Every
    rank walks the points in the same order and decides from agreed times, so the ranks'
    collectives always match.
    """
    from .measure import measuring, time_one, wants_more
    from .workloads import build

    built = [(i, mesh_of(spec), build(spec, mesh_of(spec))) for i, spec in items]
    out: dict[int, dict] = {i: {} for i, _ in items}
    for mode in modes:
        backward = mode == "fwdbwd"
        live = []
        for i, mesh, workload in built:
            run = functools.partial(workload.run, workload.make_inputs(), backward)
            for _ in range(warmup):
                run()
            live.append((i, mesh, run, [], [], []))
        for _ in range(repeats[1]):
            for i, mesh, run, times, cpu, host in live:
                if wants_more(times, *repeats):
                    times.append(time_one(run, mesh.group, mesh.device, cpu, host))
        for i, _, _, times, cpu, host in live:
            out[i][mode] = {"times": times, "cpu": cpu, "host": host}
        del live, run  # free the timing inputs before the memory runs
        for i, mesh, workload in built:
            # a separate run for memory and bytes, with fresh inputs inside the measured window
            with measuring(mesh.device) as (pm, cc):
                inputs = workload.make_inputs()
                workload.run(inputs, backward)
                del inputs
            out[i][mode].update(mem=pm.peak_bytes, rss=pm.rss_bytes, comm=cc.bytes_sent,
                                calls=cc.calls)
    return out


def _bench_setup() -> None:
    """Each bench rank, before it allocates: malloc pinned, profiler chatter filtered."""
    _pin_malloc()
    _quiet_profiler_lines()
    import warnings

    # torch's deprecation notes for the collectives dist/ calls, once per rank and call site
    warnings.filterwarnings("ignore", category=FutureWarning)


_meshes: dict = {}  # inside a bench rank: Mesh objects by (ulysses, ring)


def _mesh_of(spec: dict, timeout_s: float):
    from seqshard.dist import Mesh

    key = (spec["ulysses"], spec["ring"])
    if key not in _meshes:  # every rank creates the same groups in the same order
        _meshes[key] = Mesh.new(ulysses=key[0], ring=key[1], timeout_s=timeout_s)
    return _meshes[key]


def _measure_task(rank: int, world: int, items, modes, warmup: int, repeats: tuple,
                  timeout_s: float) -> dict[int, dict]:
    import torch

    torch.manual_seed(1234 + rank)
    return _measure_points(items, lambda spec: _mesh_of(spec, timeout_s), modes, warmup,
                           repeats)


def _memory_task(rank: int, world: int, spec: dict, timeout_s: float) -> dict:
    """One untimed fwd+bwd inside the memory window only (a memory-only search needs no
    timing runs): this rank's peak bytes, resident high-water mark and wall seconds."""
    import torch

    from .measure import measuring
    from .workloads import build

    torch.manual_seed(1234 + rank)
    mesh = _mesh_of(spec, timeout_s)
    workload = build(spec, mesh)
    started = time.perf_counter()
    with measuring(mesh.device) as (pm, _):
        inputs = workload.make_inputs()
        workload.run(inputs, True)
        del inputs
    return {"mem": pm.peak_bytes, "rss": pm.rss_bytes, "wall_s": time.perf_counter() - started}


class World:
    """P bench ranks in one gloo group (a `seqshard.dist.RankPool`); `measure(items)` ->
    per-rank results."""

    def __init__(self, world: int, *, timeout_s: float = 120.0, start_timeout_s: float = 180.0,
                 threads: int = THREADS_PER_RANK):
        self.world, self.timeout_s = world, timeout_s
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.pool = RankPool(world, threads=threads, timeout_s=timeout_s,
                             start_timeout_s=start_timeout_s, setup=_bench_setup)

    def measure(self, items: list[tuple[int, dict]], modes, warmup: int, repeats: int | tuple,
                timeout_s: float) -> list[dict[int, dict]]:
        """Per rank {index: {mode: {times, mem, rss, comm, calls}}} for the points `items`
        [(index, spec)], measured interleaved; RankFailure (a RuntimeError) naming the failed
        rank, TimeoutError past timeout_s."""
        if isinstance(repeats, int):
            repeats = (repeats, repeats, 0.0)
        args = (list(items), tuple(modes), warmup, tuple(repeats), self.timeout_s)
        # fail fast: the other ranks may be stuck in a collective the failed one never joins
        return self.pool.run(_measure_task, args, timeout_s=timeout_s, fail_fast=True)

    def peak_memory(self, spec: dict, timeout_s: float) -> list[dict]:
        """Per rank {mem, rss, wall_s} of one fwd+bwd of `spec` (see _memory_task)."""
        return self.pool.run(_memory_task, (spec, self.timeout_s), timeout_s=timeout_s,
                             fail_fast=True)

    def close(self) -> None:
        self.pool.close()


def merge(spec: dict, per_rank: list[dict], modes) -> dict:
    """One record point from every rank's measurements."""
    from .measure import median

    measures = {}
    for mode in results.MODES:
        if mode not in modes:
            measures[mode] = None
            continue
        runs = [r[mode] for r in per_rank]
        # barriers bracket each repeat, so the repeat's time is the slowest rank's
        times = [max(t) for t in zip(*(r["times"] for r in runs))]
        time_s = median(times)
        measures[mode] = {"time_s": time_s, "times_s": times,
                          # every rank's CPU seconds in each repeat (lists of equal length)
                          "cpu_times_s": [list(r["cpu"]) for r in runs],
                          # the whole host's busy CPU seconds in each repeat (rank 0's view)
                          "host_cpu_s": list(runs[0]["host"]),
                          "tokens_per_s": spec["n"] / time_s,
                          "mem_peak_bytes": [int(r["mem"]) for r in runs],
                          "rss_peak_bytes": [int(r["rss"]) for r in runs],
                          "comm_bytes": [int(r["comm"]) for r in runs],
                          "comm_calls": [int(r["calls"]) for r in runs]}
    return results.make_point(spec["family"], spec["impl"], spec["n"], spec["world"],
                              spec["ulysses"], spec["ring"], spec["shape"],
                              fwd=measures["fwd"], fwdbwd=measures["fwdbwd"])


def _failed(spec: dict, status: str, message: str) -> dict:
    return results.make_point(spec["family"], spec["impl"], spec["n"], spec["world"],
                              spec["ulysses"], spec["ring"], spec["shape"], status=status,
                              error=message)


def run_points(specs: list[dict], *, modes=("fwd", "fwdbwd"), warmup: int = 1,
               repeats: int = 3, max_repeats: int | None = None, min_total_s: float = 0.0,
               point_timeout_s: float = 300.0,
               log: Callable[[str], None] = print) -> list[dict]:
    """Measure every spec; returns record points in the order of `specs`.

    Each point is timed `repeats` times, or more (up to `max_repeats`) while less than
    `min_total_s` seconds were timed."""
    timing = (repeats, max(repeats, max_repeats or repeats), min_total_s)
    points: list[dict | None] = [None] * len(specs)
    by_world: dict[int, list[int]] = {}
    for i, spec in enumerate(specs):
        try:
            check_spec(spec)
        except (ValueError, KeyError) as err:
            points[i] = _failed(spec, "skipped", str(err))
            continue
        by_world.setdefault(spec["world"], []).append(i)
    for world, indices in sorted(by_world.items()):
        todo = list(indices)
        if len(todo) > 1:  # all of this world's points interleaved; one by one if that fails
            log(f"  P={world}: {len(todo)} points, timed runs interleaved ...")
            try:
                pool = World(world, timeout_s=min(point_timeout_s, 120.0))
                try:
                    per_rank = pool.measure([(i, specs[i]) for i in todo], modes, warmup,
                                            timing, point_timeout_s * len(todo))
                finally:
                    pool.close()
                for i in todo:
                    points[i] = merge(specs[i], [r[i] for r in per_rank], modes)
                    log(f"  {describe(specs[i])}: {summary(points[i])}")
                continue
            except (RuntimeError, TimeoutError) as err:
                log(f"  P={world}: interleaved run failed ({str(err).splitlines()[0][:160]}); "
                    f"measuring its points one by one")
        pool = None
        for i in todo:
            spec = specs[i]
            try:
                pool = pool or World(world, timeout_s=min(point_timeout_s, 120.0))
                started = time.monotonic()
                per_rank = pool.measure([(i, spec)], modes, warmup, timing, point_timeout_s)
                points[i] = merge(spec, [r[i] for r in per_rank], modes)
                log(f"  {describe(spec)}: {summary(points[i])} "
                    f"({time.monotonic() - started:.1f} s)")
            except (RuntimeError, TimeoutError) as err:
                points[i] = _failed(spec, "error", str(err)[-2000:])
                log(f"  {describe(spec)}: ERROR {str(err).splitlines()[0][:200]}")
                if pool is not None:
                    pool.close()
                pool = None
        if pool is not None:
            pool.close()
    return points  # type: ignore[return-value]


def describe(spec: dict) -> str:
    split = f" {spec['ulysses']}x{spec['ring']}" if spec["impl"] == "hybrid" else ""
    return f"{spec['family']}/{spec['impl']}{split} N={spec['n']} P={spec['world']}"


def summary(point: dict) -> str:
    parts = []
    for mode in results.MODES:
        m = point.get(mode)
        if m:
            parts.append(f"{mode} {m['time_s'] * 1e3:.1f} ms, "
                         f"{max(m['mem_peak_bytes']) / 2**20:.1f} MiB, "
                         f"{max(m['comm_bytes']) / 2**20:.2f} MiB sent")
    return "; ".join(parts)
