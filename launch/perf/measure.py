"""Honest measurements inside one rank: median time, peak memory, bytes on the wire.

- Time: `warmup` untimed runs (first-call allocations, kernel selection, gloo buffers), then
  at least `repeats` timed runs (more for short ones), each bracketed by barriers so the time
  is the slowest rank's wall time; the median is kept and every repeat is recorded. Each
  rank's CPU time over the same window is kept beside it (process time: the rank's own
  threads, gloo's included). The runner interleaves the timed runs of many points
  (runner._measure_points).
- Peak memory (CPU): the peak of bytes live in torch's CPU allocator during the run, from the
  profiler's memory events (every allocation and free through c10's CPU allocator, kernel
  workspaces and received buffers included), relative to what was live at entry. tracemalloc
  does not see torch's allocator, and torch keeps no CPU allocator statistics. As a second,
  coarser witness the process's resident high-water mark is recorded too
  (seqshard.dist.memory's PeakWindow: VmHWM after a reset): it includes gloo's and Python's
  own memory but the kernel updates it in batches of pages, so it is only meaningful at the
  MiB scale.
  On CUDA, the caching allocator's peak is used instead (PeakWindow on the device).
  (The profiler's event list, `prof.profiler.kineto_results`, is the one semi-private torch
  API used here; the test that a 64 MiB tensor reads as exactly 64 MiB fails loudly if a
  torch release changes it.)
- Communication: `CommCounter` wraps torch.distributed's collectives for the duration of one
  run and adds up the bytes each call makes this rank send under the bandwidth-optimal
  algorithm (all-to-all: (P-1)/P of the input; all-gather: (P-1) x the input; reduce-scatter:
  (P-1)/P of the input; all-reduce: 2 (P-1)/P; point-to-point: every isend). The calls still
  go to the real collectives; only the accounting is added.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from seqshard.dist.memory import PeakWindow

def _allocator_peak(prof) -> int:
    """Largest running sum of the profiler's allocation (+) and free (-) events."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


class PeakMemory:
    """`with PeakMemory() as pm: run()`, then `pm.peak_bytes` (allocator) and `pm.rss_bytes`
    (resident high-water mark, 0 where it cannot be reset), both above the state at entry
    (see the module doc)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.peak_bytes = 0
        self.rss_bytes = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            self._allocator = PeakWindow(self.device).__enter__()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        self._resident = PeakWindow("cpu").__enter__()
        return self

    def __exit__(self, *exc):
        self._resident.__exit__(*exc)
        self.rss_bytes = self._resident.rise if self._resident.resettable else 0
        if self.device.type == "cuda":
            self._allocator.__exit__(*exc)
            self.peak_bytes = self._allocator.rise
        else:
            self._prof.__exit__(*exc)
            self.peak_bytes = _allocator_peak(self._prof)
        return False


def _group_size(kwargs, args, index) -> int:
    group = kwargs.get("group", args[index] if len(args) > index else None)
    return dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommCounter:
    """Counts bytes this rank sends through torch.distributed while active (see module doc)."""

    # name -> (position of the group argument, bytes sent given (args, kwargs, P))
    _RULES: dict[str, tuple[int, Callable]] = {
        "all_to_all_single": (4, lambda a, k, p: _nbytes(k.get("input", a[1] if len(a) > 1 else None)) * (p - 1) // p),
        "all_to_all": (2, lambda a, k, p: sum(_nbytes(t) for t in k.get("input_tensor_list", a[1])) * (p - 1) // p),
        "all_gather_into_tensor": (2, lambda a, k, p: _nbytes(k.get("input_tensor", a[1] if len(a) > 1 else None)) * (p - 1)),
        "all_gather": (2, lambda a, k, p: _nbytes(k.get("tensor", a[1] if len(a) > 1 else None)) * (p - 1)),
        "reduce_scatter_tensor": (3, lambda a, k, p: _nbytes(k.get("input", a[1] if len(a) > 1 else None)) * (p - 1) // p),
        # torch 2.13's names for the two above (seqshard.dist calls these when they exist)
        "all_gather_single": (2, lambda a, k, p: _nbytes(k.get("input_tensor", a[1] if len(a) > 1 else None)) * (p - 1)),
        "reduce_scatter_single": (3, lambda a, k, p: _nbytes(k.get("input", a[1] if len(a) > 1 else None)) * (p - 1) // p),
        "all_reduce": (2, lambda a, k, p: 2 * _nbytes(k.get("tensor", a[0] if a else None)) * (p - 1) // p),
        "send": (2, lambda a, k, p: _nbytes(k.get("tensor", a[0] if a else None))),
        "isend": (2, lambda a, k, p: _nbytes(k.get("tensor", a[0] if a else None))),
    }

    def __init__(self):
        self.bytes_sent = 0
        self.calls = 0
        self._saved: dict[str, Callable] = {}

    def _wrap(self, name: str, fn: Callable, group_pos: int, rule: Callable) -> Callable:
        def counted(*args, **kwargs):
            p = _group_size(kwargs, args, group_pos)
            self.bytes_sent += int(rule(args, kwargs, p)) if p > 1 else 0
            self.calls += 1
            return fn(*args, **kwargs)
        counted.__name__ = name
        return counted

    def _wrap_batch(self, fn: Callable) -> Callable:
        def counted(p2p_ops):
            for op in p2p_ops:
                if getattr(op.op, "__name__", "") == "isend":
                    self.bytes_sent += _nbytes(op.tensor)
            self.calls += 1
            return fn(p2p_ops)
        return counted

    def __enter__(self):
        # isend/irecv themselves are not replaced: P2POp checks them by identity
        for name, (pos, rule) in self._RULES.items():
            if name in ("isend",) or not hasattr(dist, name):  # new names: torch >= 2.13 only
                continue
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name], pos, rule))
        self._saved["batch_isend_irecv"] = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._wrap_batch(self._saved["batch_isend_irecv"])
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        return False


def barrier(group=None) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _slowest(seconds: float, group) -> float:
    """The largest of every rank's value, known to all ranks (so they decide alike)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


_PROC_STAT = Path("/proc/stat")


def host_busy_s() -> float | None:
    """CPU seconds all of the host's cores have been busy since boot (None off Linux): the
    difference over a window, less our own ranks' CPU time, is what other work took."""
    try:
        ticks = [int(x) for x in _PROC_STAT.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def time_one(run: Callable[[], None], group=None,
             device: torch.device = torch.device("cpu"), cpu_times: list | None = None,
             host_times: list | None = None) -> float:
    """One run between barriers; the slowest rank's seconds, known to every rank.

    cpu_times: if given, this rank's CPU seconds for the run are appended (wall time alone
    cannot tell computing from waiting for a peer or for a core on a busy host).
    host_times: if given, the busy CPU seconds of the whole host in the same window (0 where
    the host does not say)."""
    barrier(group)
    _sync(device)
    host_start = host_busy_s() if host_times is not None else None
    cpu_start = time.process_time()
    start = time.perf_counter()
    run()
    _sync(device)
    barrier(group)
    wall = time.perf_counter() - start
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu_start)
    if host_times is not None:
        host_end = host_busy_s()
        host_times.append(0.0 if host_start is None or host_end is None
                          else host_end - host_start)
    return _slowest(wall, group)


def wants_more(times: list[float], repeats: int, max_repeats: int, min_total_s: float) -> bool:
    """At least `repeats` runs; short ones again, up to `max_repeats`, until `min_total_s`
    seconds were timed (a few ms are the most easily disturbed)."""
    return len(times) < repeats or (len(times) < max_repeats and sum(times) < min_total_s)


def time_runs(run: Callable[[], None], *, warmup: int, repeats: int, group=None,
              device: torch.device = torch.device("cpu"), max_repeats: int | None = None,
              min_total_s: float = 0.0) -> list[float]:
    """Seconds of each timed run of one point (see `time_one` and `wants_more`); every rank
    takes the same decisions, from the agreed (slowest) times."""
    max_repeats = repeats if max_repeats is None else max_repeats
    if warmup < 0 or repeats < 1 or max_repeats < repeats:
        raise ValueError(f"warmup={warmup} must be >= 0, repeats={repeats} >= 1 and "
                         f"max_repeats={max_repeats} >= repeats")
    for _ in range(warmup):
        run()
    times: list[float] = []
    while wants_more(times, repeats, max_repeats, min_total_s):
        times.append(time_one(run, group, device))
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


@contextmanager
def measuring(device: torch.device):
    """Peak memory and communication of the enclosed block: yields (PeakMemory, CommCounter)."""
    with PeakMemory(device) as pm, CommCounter() as cc:
        yield pm, cc
