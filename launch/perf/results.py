"""A bench run's results file (records.msgpack): one schema, versioned, stored as msgpack.

(Not launch/records.py: that one keeps a training job's progress lines and summary.)

A results file is one msgpack map:

    {"schema": "seqshard.bench", "version": 1, "machine": {...}, "command": "seqshard bench ...",
     "started": "2026-11-25T10:00:00Z", "points": [POINT, ...], "maxctx": [SEARCH, ...]}

and each POINT describes one measured configuration:

    family    "attention" | "delta_rule" | "fit" | "model"
    impl      "ring" | "ulysses" | "hybrid" | "allgather" | "sdpa" | "ds_ulysses" | "scan" | ...
    n         global sequence length (tokens)
    world     ranks in the run; ulysses, ring: the mesh split (world == ulysses * ring)
    shape     op sizes, e.g. {"batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64, "causal": True}
    status    "ok" | "error" | "skipped"; error: the message when not ok
    fwd, fwdbwd   None or a MEASURE map:
        time_s       median wall time over repeats (warm-up excluded), slowest rank
        times_s      every repeat's time (slowest rank), in order
        tokens_per_s n / time_s
        mem_peak_bytes   per rank: peak bytes live in torch's allocator above the state
                         before the inputs were made (measure.PeakMemory)
        rss_peak_bytes   per rank: resident-set high-water mark above that state (coarse)
        comm_bytes       per rank: bytes this rank sent in collectives (see measure.CommCounter)
        comm_calls       per rank: collective calls made
        cpu_times_s      (optional) per rank, that rank's CPU seconds in every timed repeat
                         (process time over the same window as times_s)
        host_cpu_s       (optional) busy CPU seconds of the whole host in every repeat
                         (/proc/stat): less the ranks' own, what other work took meanwhile

and each SEARCH is a max-context search (maxctx.py): family, impl, world, ulysses, the
budgets, max_n (None when even the first N failed) and every probe (n, ok, reason, time_s,
mem_bytes).

The reader checks every field, so a file from an older or foreign writer fails loudly with a
ValueError naming what is wrong instead of plotting nonsense.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import msgpack

SCHEMA = "seqshard.bench"
VERSION = 1
FAMILIES = ("attention", "delta_rule", "fit", "model")
STATUSES = ("ok", "error", "skipped")
MODES = ("fwd", "fwdbwd")

_POINT_FIELDS = {"family": str, "impl": str, "n": int, "world": int, "ulysses": int,
                 "ring": int, "shape": dict, "status": str, "error": (str, type(None))}
_MEASURE_FIELDS = {"time_s": float, "times_s": list, "tokens_per_s": float,
                   "mem_peak_bytes": list, "rss_peak_bytes": list, "comm_bytes": list,
                   "comm_calls": list}
_SEARCH_FIELDS = {"family": str, "impl": str, "world": int, "ulysses": int,
                  "mem_budget_mib": float, "time_budget_s": float, "max_n": (int, type(None)),
                  "probes": list}
_PROBE_FIELDS = {"n": int, "ok": bool, "reason": str}


def machine() -> dict:
    """What ran the benchmark: enough to tell two machines' numbers apart."""
    import torch

    info = {"host": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count() or 1, "cpu_model": _cpu_model(),
            "mem_total_bytes": _mem_total(), "cuda": torch.cuda.is_available(),
            "load_avg_1m": os.getloadavg()[0], "threads_per_rank": 1}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def new_results(command: str, machine_info: dict | None = None) -> dict:
    return {"schema": SCHEMA, "version": VERSION,
            "machine": machine() if machine_info is None else machine_info,
            "command": command,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "points": [], "maxctx": []}


def make_point(family: str, impl: str, n: int, world: int, ulysses: int, ring: int,
               shape: dict, status: str = "ok", error: str | None = None,
               fwd: dict | None = None, fwdbwd: dict | None = None) -> dict:
    point = {"family": family, "impl": impl, "n": n, "world": world, "ulysses": ulysses,
             "ring": ring, "shape": dict(shape), "status": status, "error": error,
             "fwd": fwd, "fwdbwd": fwdbwd}
    validate_point(point)
    return point


def _check_fields(where: str, obj: dict, fields: dict) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a map, got {type(obj).__name__}")
    for name, kind in fields.items():
        if name not in obj:
            raise ValueError(f"{where}: missing field {name!r} (has {sorted(obj)})")
        value = obj[name]
        # msgpack returns ints for whole floats written by other tools; accept ints as floats
        ok_kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in ok_kinds:
            ok_kinds = ok_kinds + (int,)
        if (isinstance(value, bool) and bool not in ok_kinds) or not isinstance(value, ok_kinds):
            raise ValueError(f"{where}: field {name}={value!r} should be {kind}")


def validate_point(point: dict, where: str = "point") -> None:
    """Raise ValueError naming the first wrong field of a point."""
    _check_fields(where, point, _POINT_FIELDS)
    if point["family"] not in FAMILIES:
        raise ValueError(f"{where}: family={point['family']!r}, expected one of {FAMILIES}")
    if point["status"] not in STATUSES:
        raise ValueError(f"{where}: status={point['status']!r}, expected one of {STATUSES}")
    if point["n"] < 1 or point["world"] < 1:
        raise ValueError(f"{where}: n={point['n']} and world={point['world']} must be >= 1")
    if point["ulysses"] * point["ring"] != point["world"]:
        raise ValueError(f"{where}: ulysses={point['ulysses']} x ring={point['ring']} "
                         f"!= world={point['world']}")
    for mode in MODES:
        measure = point.get(mode, "missing")
        if measure == "missing":
            raise ValueError(f"{where}: missing field {mode!r}")
        if measure is None:
            continue
        _check_fields(f"{where}.{mode}", measure, _MEASURE_FIELDS)
        for name in ("mem_peak_bytes", "rss_peak_bytes", "comm_bytes", "comm_calls"):
            if len(measure[name]) != point["world"]:
                raise ValueError(f"{where}.{mode}.{name} has {len(measure[name])} entries for "
                                 f"world={point['world']} ranks")
        cpu = measure.get("cpu_times_s")
        if cpu is not None and (len(cpu) != point["world"] or
                                any(len(c) != len(measure["times_s"]) for c in cpu)):
            raise ValueError(f"{where}.{mode}.cpu_times_s should be {point['world']} lists of "
                             f"{len(measure['times_s'])} repeats, got {cpu!r}")
        host = measure.get("host_cpu_s")
        if host is not None and len(host) != len(measure["times_s"]):
            raise ValueError(f"{where}.{mode}.host_cpu_s has {len(host)} entries for "
                             f"{len(measure['times_s'])} repeats")
        if measure["time_s"] <= 0:
            raise ValueError(f"{where}.{mode}.time_s={measure['time_s']} must be > 0")
    if point["status"] == "ok" and point["fwd"] is None and point["fwdbwd"] is None:
        raise ValueError(f"{where}: status ok but neither fwd nor fwdbwd was measured")


def validate_results(results: dict) -> None:
    """Raise ValueError unless `results` is a complete file of this schema and version."""
    if not isinstance(results, dict):
        raise ValueError(f"results: expected a map, got {type(results).__name__}")
    if results.get("schema") != SCHEMA:
        raise ValueError(f"results: schema={results.get('schema')!r}, expected {SCHEMA!r}")
    if results.get("version") != VERSION:
        raise ValueError(f"results: version={results.get('version')!r}, this reader "
                         f"understands version {VERSION}")
    _check_fields("results", results, {"machine": dict, "command": str, "started": str,
                                       "points": list, "maxctx": list})
    for i, point in enumerate(results["points"]):
        validate_point(point, f"points[{i}]")
    for i, found in enumerate(results["maxctx"]):
        _check_fields(f"maxctx[{i}]", found, _SEARCH_FIELDS)
        for j, probe in enumerate(found["probes"]):
            _check_fields(f"maxctx[{i}].probes[{j}]", probe, _PROBE_FIELDS)


def write_results(path: str | os.PathLike, results: dict) -> Path:
    """Validate, then write atomically (a reader never sees half a file)."""
    validate_results(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(msgpack.packb(results, use_bin_type=True))
    os.replace(tmp, path)
    return path


def read_results(path: str | os.PathLike) -> dict:
    results = msgpack.unpackb(Path(path).read_bytes(), raw=False, strict_map_key=False)
    validate_results(results)
    return results


def ok_points(results: dict, mode: str = "fwdbwd") -> list[dict]:
    """Points that ran and measured `mode`."""
    return [p for p in results["points"] if p["status"] == "ok" and p.get(mode)]


def cpu_seconds(measure: dict) -> float | None:
    """CPU seconds of all ranks together in a median repeat (None for older records):
    compare with time_s x world to see how much of the wall time the ranks computed."""
    cpu = measure.get("cpu_times_s")
    if not cpu:
        return None
    import statistics

    return float(statistics.median(sum(rep) for rep in zip(*cpu)))
