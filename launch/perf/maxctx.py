"""Max-context finder: the largest N that trains (fwd+bwd) within a memory and time budget.

Grow N by doubling from `start` while a step fits; at the first failure bisect between the
last N that fit and the first that did not, in steps of `multiple` (so every N tried is a
valid length for the op and mesh) until the bracket is within `resolution` (1/8) of N. The
worker pool is warm after the first probe, so each probe is one timed fwd+bwd plus one
memory run. A step "fits" when it ran, its peak memory on every rank
is <= the memory budget and its median time is <= the time budget. Before running an N the
planner's memory model is asked first: an N predicted to need more than `guard` x the budget
is failed without running, so the search never drives a shared machine into swap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MiB = 2**20


@dataclass
class Probe:
    n: int
    ok: bool
    reason: str
    time_s: float | None = None
    mem_bytes: int | None = None


def search(fits: Callable[[int], Probe], *, start: int, multiple: int, max_n: int,
           max_probes: int = 12, resolution: float = 0.0) -> tuple[int | None, list[Probe]]:
    """(largest N with fits(N).ok, every probe in order). Pure: `fits` does the measuring.

    Bisection stops when the bracket is at most `multiple` wide, or at most `resolution` x
    the lower end (e.g. 1/8: the answer is within 12.5% of the true limit, in 3 probes)."""
    if start < multiple or start % multiple:
        raise ValueError(f"start={start} must be a positive multiple of multiple={multiple}")
    if max_n < start:
        raise ValueError(f"max_n={max_n} is below start={start}")
    probes: list[Probe] = []
    lo, hi, n = None, None, start
    while n <= max_n and len(probes) < max_probes:
        probe = fits(n)
        probes.append(probe)
        if not probe.ok:
            hi = n
            break
        lo, n = n, n * 2
    if lo is None or hi is None:
        return lo, probes  # nothing fits, or everything up to max_n fits
    while hi - lo > max(multiple, resolution * lo) and len(probes) < max_probes:
        mid = (lo + hi) // 2 // multiple * multiple
        if mid <= lo:
            break
        probe = fits(mid)
        probes.append(probe)
        lo, hi = (mid, hi) if probe.ok else (lo, mid)
    return lo, probes


def _multiple(job: dict) -> int:
    world = job["world"]
    if job["family"] == "attention":
        return 2 * world if job["shape"]["causal"] else world  # zigzag: 2P chunks
    if job["family"] == "fit" or job["impl"] == "fit":
        return world * job["shape"]["group_size"]
    return world


def find(job: dict, *, warmup: int = 0, repeats: int = 1, max_n: int = 1 << 20,
         guard: float = 4.0, resolution: float = 1 / 8, log=print) -> dict:
    """Run the search for one job dict (family, impl, world, ulysses, shape, start,
    mem_budget_mib, time_budget_s) on real ranks; returns a summary with every probe."""
    from .planner import CPU_DEFAULT, FAMILIES, predict

    from .runner import World, merge

    budget = job["mem_budget_mib"] * MiB
    world, u = job["world"], job["ulysses"]
    pool = World(world)

    def fits(n: int) -> Probe:
        nonlocal pool
        spec = {"family": job["family"], "impl": job["impl"], "n": n, "world": world,
                "ulysses": u, "ring": world // u, "shape": job["shape"]}
        guess = (predict(job["family"], job["impl"], job["shape"], n, u, world // u,
                         CPU_DEFAULT).mem_bytes if job["family"] in FAMILIES else 0.0)
        if guess > guard * budget:
            return Probe(n, False, f"predicted {guess / MiB:.0f} MiB > {guard:g} x budget")
        try:
            per_rank = pool.measure([(n, spec)], ("fwdbwd",), warmup, repeats,
                                    timeout_s=max(60.0, 20 * job["time_budget_s"]))
            point = merge(spec, [r[n] for r in per_rank], ("fwdbwd",))
        except (RuntimeError, TimeoutError) as err:
            pool.close()
            pool = World(world)
            return Probe(n, False, f"failed: {str(err).splitlines()[0][:120]}")
        m = point["fwdbwd"]
        mem, t = max(m["mem_peak_bytes"]), m["time_s"]
        reason = ("fits" if mem <= budget and t <= job["time_budget_s"] else
                  f"memory {mem / MiB:.0f} MiB > {job['mem_budget_mib']} MiB" if mem > budget
                  else f"time {t:.2f} s > {job['time_budget_s']} s")
        log(f"    N={n}: {t:.2f} s, {mem / MiB:.0f} MiB/rank -> {reason}")
        return Probe(n, mem <= budget and t <= job["time_budget_s"], reason, t, mem)

    try:
        best, probes = search(fits, start=job["start"], multiple=_multiple(job), max_n=max_n,
                              resolution=resolution)
    finally:
        pool.close()
    return {"family": job["family"], "impl": job["impl"], "world": world, "ulysses": u,
            "mem_budget_mib": job["mem_budget_mib"], "time_budget_s": job["time_budget_s"],
            "max_n": best, "probes": [vars(p) for p in probes]}
