"""Which sweep points run side by side: the `[sweep] parallel` knob and the resource count.

    parallel = "auto"   as many points at once as the cluster's CPUs and GPUs seat
    parallel = N        at most N at once, and only as they fit (1: one after another)

A point needs mesh.workers x launch.cpus_per_worker CPUs and mesh.workers x
launch.gpus_per_worker GPUs: what its placement group reserves. The packer counts the
cluster's totals (`ray.cluster_resources()` when the sweep starts) minus what the points it
started still hold, and starts points in sweep order: the next point starts as soon as it fits
beside the running ones; a later, smaller point never jumps the queue (the order of sweep.md
is the order of starts). A point bigger than the whole cluster starts alone, so its launch
fails with the launcher's placement error and the sweep records it.

The count is by totals, not per node: on a multi-node cluster a point whose bundles fit the
total but not the free room of its nodes waits in Ray's placement (up to the launcher's
PLACEMENT_TIMEOUT_S) rather than here.
"""

from __future__ import annotations

AUTO = "auto"
UNITS = ("CPU", "GPU")


def parse_parallel(value, where: str = "[sweep] parallel"):
    """'auto' or a positive int, from TOML (str / int) or the command line (str); ValueError
    naming the value otherwise."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    count = int(value.strip()) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where} = {value!r}: expected \"auto\" (as many points at once as "
                         f"fit) or a positive integer (1: one after another)")
    return count


def need(cfg) -> dict[str, float]:
    """What one point's placement group reserves: {'CPU': ..., 'GPU': ...}."""
    lc, n = cfg.launch, cfg.mesh.workers
    return {"CPU": n * lc.cpus_per_worker, "GPU": n * lc.gpus_per_worker}


def embedded_cpus(cfgs: list, parallel, cores: int) -> int:
    """Logical CPUs for an embedded Ray the sweep starts itself: the biggest point's need (at
    least the cores); with parallel = N, the N biggest points' needs together, so an explicit
    N runs N at once on one machine even beyond its cores (they share them, slower)."""
    needs = sorted((need(c)["CPU"] for c in cfgs), reverse=True)
    take = 1 if parallel == AUTO else parallel
    return max(cores, int(sum(needs[:take]) + 0.999))


class Packer:
    """Decides, in sweep order, when the next point may start (see the module docstring)."""

    def __init__(self, capacity: dict[str, float], parallel):
        self.capacity = {u: float(capacity.get(u, 0.0)) for u in UNITS}
        self.limit = parallel
        self.held: dict[int, dict[str, float]] = {}
        """point index -> what it holds while running."""

    def fits(self, want: dict[str, float]) -> bool:
        if not self.held:
            return True  # alone, even when too big: its launch says why it cannot be placed
        if self.limit != AUTO and len(self.held) >= self.limit:
            return False
        used = {u: sum(h[u] for h in self.held.values()) for u in UNITS}
        return all(used[u] + want[u] <= self.capacity[u] + 1e-9 for u in UNITS)

    def start(self, index: int, want: dict[str, float]) -> None:
        self.held[index] = want

    def finish(self, index: int) -> None:
        self.held.pop(index, None)

    def at_once(self, wants: list[dict[str, float]]) -> int:
        """How many of these points (in order, from the first) would run at once on an idle
        cluster: what sweep.md reports as the packing."""
        probe = Packer(self.capacity, self.limit)
        for i, want in enumerate(wants):
            if not probe.fits(want):
                break
            probe.start(i, want)
        return max(1, len(probe.held))
