"""Max-context finder: the largest N that trains (fwd+bwd) within a memory and time budget.

Grow N by doubling from `start` while a step fits; at the first failure bisect between the
last N that fit and the first that did not, in steps of `multiple` (so every N tried is a
valid length for the op and mesh) until the bracket is within `resolution` (1/8) of N. The
worker pool is warm after the first probe, so each probe is one timed fwd+bwd plus one
memory run. A step "fits" when it ran, its peak memory on every rank
is <= the memory budget and its median time is <= the time budget. Before running an N the
planner's memory model is asked first: an N predicted to need more than `guard` x the budget
is failed without running, so the search never drives a shared machine into swap.

Memory-only (`time_budget_s` None or inf): the time budget is off and each probe is one
untimed fwd+bwd measured for memory alone (runner.World.peak_memory). A probe that outlives
`probe_cap_s` is failed as "capped" and the search's `capped` flag says its max_n is then a
lower bound. `compare` runs such searches for the seed paper's "attention scale-up": naive
attention (scores materialised) on one process against seqshard's strategies on P ranks,
all under the same memory per rank (`seqshard bench --maxctx-memory MIB`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
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


def predicted_bytes(job: dict, n: int) -> float:
    """The planner's per-rank memory for the job at N (0 where it has no model). The naive
    peer keeps B*H*N*N fp32 scores alive several times over (scores, masked scores, weights;
    about 5.4 measured at N=1024), which the planner does not model: 4 of them are counted."""
    from .planner import CPU_DEFAULT, FAMILIES, predict

    if job["family"] not in FAMILIES:
        return 0.0
    if job["impl"] == "naive":
        s = job["shape"]
        return 4.0 * s["batch"] * s["heads"] * n * n * 4
    return predict(job["family"], job["impl"], job["shape"], n, job["ulysses"],
                   job["world"] // job["ulysses"], CPU_DEFAULT).mem_bytes


def find(job: dict, *, warmup: int = 0, repeats: int = 1, max_n: int = 1 << 20,
         guard: float = 4.0, resolution: float = 1 / 8, log=print) -> dict:
    """Run the search for one job dict (family, impl, world, ulysses, shape, start,
    mem_budget_mib, time_budget_s; optional probe_cap_s) on real ranks; returns a summary
    with every probe."""
    from .runner import World, merge

    budget = job["mem_budget_mib"] * MiB
    time_budget = job["time_budget_s"]
    memory_only = time_budget is None or math.isinf(time_budget)
    time_budget = math.inf if memory_only else time_budget
    cap = float(job.get("probe_cap_s") or (600.0 if memory_only else max(60.0, 20 * time_budget)))
    world, u = job["world"], job["ulysses"]
    pool = World(world)
    capped = False

    def fits(n: int) -> Probe:
        nonlocal pool, capped
        spec = {"family": job["family"], "impl": job["impl"], "n": n, "world": world,
                "ulysses": u, "ring": world // u, "shape": job["shape"]}
        guess = predicted_bytes(job, n)
        if guess > guard * budget:
            return Probe(n, False, f"predicted {guess / MiB:.0f} MiB > {guard:g} x budget")
        try:
            if memory_only:
                per_rank = pool.peak_memory(spec, timeout_s=cap)
                mem, t = max(r["mem"] for r in per_rank), max(r["wall_s"] for r in per_rank)
            else:
                per_rank = pool.measure([(n, spec)], ("fwdbwd",), warmup, repeats,
                                        timeout_s=cap)
                m = merge(spec, [r[n] for r in per_rank], ("fwdbwd",))["fwdbwd"]
                mem, t = max(m["mem_peak_bytes"]), m["time_s"]
        except TimeoutError:
            pool.close()
            pool = World(world)
            capped = True
            log(f"    N={n}: capped after {cap:g} s")
            return Probe(n, False, f"capped: no result within {cap:g} s")
        except RuntimeError as err:
            pool.close()
            pool = World(world)
            return Probe(n, False, f"failed: {str(err).splitlines()[0][:120]}")
        reason = ("fits" if mem <= budget and t <= time_budget else
                  f"memory {mem / MiB:.0f} MiB > {job['mem_budget_mib']:g} MiB" if mem > budget
                  else f"time {t:.2f} s > {time_budget} s")
        log(f"    N={n}: {t:.2f} s, {mem / MiB:.0f} MiB/rank -> {reason}")
        return Probe(n, mem <= budget and t <= time_budget, reason, t, mem)

    try:
        best, probes = search(fits, start=job["start"], multiple=_multiple(job), max_n=max_n,
                              resolution=resolution)
    finally:
        pool.close()
    # capped only matters when a capped probe bounds the answer from above (a timed search
    # whose probe outlived 20x its time budget simply did not fit it)
    first_fail = min((p.n for p in probes if not p.ok), default=None)
    capped = memory_only and capped and any(p.n == first_fail and p.reason.startswith("capped") for p in probes)
    return {"family": job["family"], "impl": job["impl"], "world": world, "ulysses": u,
            "mem_budget_mib": job["mem_budget_mib"], "time_budget_s": float(time_budget),
            "memory_only": memory_only, "probe_cap_s": cap, "guard": guard,
            "capped": capped, "max_n": best, "probes": [vars(p) for p in probes]}


# --- the seed paper's "attention scale-up": naive on 1 process vs seqshard on P ----------------
# causal fp32 MHA of a 70B-class model (64 heads of 128): wide heads make each token's
# memory large and so keep the largest N, and the CPU time to reach it, small
SCALEUP_SHAPE = {"batch": 1, "heads": 64, "kv_heads": 64, "head_dim": 128, "causal": True}


def default_strategy(world: int, heads: int) -> str:
    """The bench impl that sharded_attention's strategy='auto' runs on the default mesh of
    `world` ranks (Mesh.new(): ulysses=1, ring=world)."""
    if world == 1:
        return "seqshard"
    from seqshard.ops.attention.sharded import resolve_strategy

    # resolve_strategy reads only the mesh's sizes; no process group is needed to ask it
    sizes = SimpleNamespace(ulysses_size=1, ring_size=world, size=world)
    return resolve_strategy("auto", sizes, heads)


def scaleup_jobs(mem_mib: float, worlds, shape: dict, probe_cap_s: float) -> list[dict]:
    """naive (P=1), then seqshard on every P: each strategy that applies to the shape."""
    if not mem_mib > 0:
        raise ValueError(f"mem_mib={mem_mib}: the memory budget per rank must be > 0 MiB")
    if not worlds or any(w < 1 for w in worlds):
        raise ValueError(f"worlds={list(worlds)}: expected rank counts >= 1")
    h = shape["heads"]
    runs = [("naive", 1, 1)]
    for p in sorted(set(worlds)):
        if p == 1:
            runs.append(("seqshard", 1, 1))
            continue
        runs += [("ring", p, 1), ("allgather", p, 1)]
        if h % p == 0 and shape["kv_heads"] % p == 0:
            runs.append(("ulysses", p, p))
        if p >= 4 and p % 2 == 0 and h % 2 == 0:
            runs.append(("hybrid", p, 2))
    jobs = []
    for impl, p, u in runs:
        job = {"family": "attention", "impl": impl, "world": p, "ulysses": u, "shape": shape,
               "mem_budget_mib": mem_mib, "time_budget_s": None, "probe_cap_s": probe_cap_s}
        # the planner only picks where to start (so the first probes land near the limit);
        # the answer is always a measured probe
        step = _multiple(job)
        start = step
        while predicted_bytes(job, 2 * start) <= mem_mib * MiB / 2:
            start *= 2
        job["start"] = start
        job["default"] = impl != "naive" and impl == default_strategy(p, h)
        jobs.append(job)
    return jobs


def compare(mem_mib: float, worlds=(1, 2, 4), shape: dict | None = None, *,
            probe_cap_s: float = 600.0, resolution: float = 1 / 8, guard: float = 1.25,
            log=print) -> list[dict]:
    """Memory-only searches for naive (P=1) and seqshard (each P); each summary gains
    `default` and `ratio` = max_n / naive's max_n. guard: a probe the planner (which
    under-counts, see RESULTS.md) puts above guard x budget is failed without running."""
    shape = dict(SCALEUP_SHAPE if shape is None else shape)
    found = []
    for job in scaleup_jobs(mem_mib, worlds, shape, probe_cap_s):
        log(f"  max context (memory only): attention/{job['impl']} P={job['world']}, "
            f"{mem_mib:g} MiB/rank, from N={job['start']}")
        f = find(job, guard=guard, resolution=resolution, log=log)
        f["mem_budget_mib"], f["default"] = float(mem_mib), job["default"]
        found.append(f)
    naive = found[0]["max_n"]
    for f in found:
        f["ratio"] = (f["max_n"] / naive) if naive and f["max_n"] else None
    return found


def scaleup_table(found: list[dict]) -> list[str]:
    """Markdown rows: method, P, largest N, its peak MiB/rank, N / naive's N, probes."""
    lines = ["| method | P | max N | peak MiB/rank at max N | N / naive N (P=1) | probes |",
             "|---|---|---|---|---|---|"]
    for f in found:
        name = f["impl"] + (" (default)" if f.get("default") else "")
        peak = next((p["mem_bytes"] for p in f["probes"] if p["n"] == f["max_n"]), None)
        ratio = "-" if f.get("ratio") is None else f"{f['ratio']:.1f}x"
        probes = ", ".join(f"{p['n']}{'' if p['ok'] else ' x'}" for p in f["probes"])
        lower = " (lower bound: capped)" if f.get("capped") else ""
        lines.append(f"| {name} | {f['world']} | {f['max_n']}{lower} | "
                     f"{'-' if peak is None else f'{peak / MiB:.0f}'} | {ratio} | {probes} |")
    return lines
