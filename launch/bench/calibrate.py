"""Fit the planner's CPU profile to measured records, and score the planner against them.

Time is linear in the planner's features (flops per implementation, bytes, messages, steps, one
call), so calibration is a non-negative least-squares fit with each row divided by its measured
time: it minimises *relative* error, so a 5 ms point counts as much as a 5 s one. Every
implementation gets its own compute rate (its kernel path's efficiency on this machine: the
zigzag all-gather plan runs more, smaller kernels than the ring, say); bandwidth, latency and
overheads are shared by all. Memory gets one
multiplier per family (geometric mean of measured / modelled).

`evaluate` then reports, for every calibrated point, predicted vs measured time and memory,
and whether the planner orders the strategies of each (family, N, P) like the measurements
do. A pair of strategies counts only when their measured medians differ by more than `tie`
(10%); closer pairs are noise on a shared CPU and count neither for nor against the planner.
(The runner interleaves the repeats of all points, so their medians saw the same load.)
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import numpy as np

from seqshard.launch.planner import (
    CANDIDATE_IMPLS, CPU_DEFAULT, FAMILIES, Hardware, features, predict, terms)

from .records import ok_points

_SHARED = ["bytes", "msgs", "steps", "call"]


def _usable(results: dict, mode: str) -> list[dict]:
    return [p for p in ok_points(results, mode) if p["family"] in FAMILIES]


_ONE_PROCESS_NAMES = {"sdpa", "seqshard", "naive", "chunk"}  # already their own kinds


def _kind(point: dict) -> str:
    """The compute rate a point shares: one per implementation, and a sharded op run on one
    process (mesh None: local kernels, no masks across shards) separately as 'impl@1'."""
    kind = f"{point['family']}/{point['impl']}"
    if point["world"] == 1 and point["impl"] not in _ONE_PROCESS_NAMES:
        kind += "@1"
    return kind


def _row(point: dict, hw: Hardware, kinds: list[str]) -> list[float]:
    t = terms(point["family"], point["impl"], point["shape"], point["n"], point["ulysses"],
              point["ring"], hw)
    f = features(t, point["world"], hw)
    row = [f["flops"] if _kind(point) == kind else 0.0 for kind in kinds]
    return row + [f["bytes_intra"] + f["bytes_inter"], f["msgs"], f["steps"], 1.0]


def _lawson_hanson(a: np.ndarray, y: np.ndarray, max_iter: int) -> np.ndarray:
    """min ||a x - y|| subject to x >= 0 (Lawson & Hanson's active-set method; numpy only)."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)  # coefficients free to be positive
    tol = 10 * np.finfo(float).eps * np.linalg.norm(a, 1) * max(a.shape)
    for _ in range(max_iter):
        w = a.T @ (y - a @ x)  # descent direction for the bound coefficients
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], y, rcond=None)[0]
            if z[passive].min() > 0:
                x = z
                break
            # step back to the boundary and release the coefficients that hit zero
            shrinking = passive & (z <= 0)
            gap = x[shrinking] - z[shrinking]  # >= 0; 0 only where both are already 0
            alpha = np.min(np.where(gap > 0, x[shrinking] / np.where(gap > 0, gap, 1.0), 0.0))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(a).max(axis=0), 1e-300)  # columns span 1 .. 1e12
    return _lawson_hanson(a / scale, y, max_iter=50 * a.shape[1]) / scale


def base_profile(results: dict) -> Hardware:
    m = results["machine"]
    return replace(CPU_DEFAULT, name=f"cpu-{m.get('cpu_count', 2)}core",
                   shared_cores=int(m.get("cpu_count", 2)),
                   memory_bytes=float(m.get("mem_total_bytes") or CPU_DEFAULT.memory_bytes))


def calibrate(results: dict, base: Hardware | None = None, mode: str = "fwdbwd",
              exclude=None) -> Hardware:
    """A Hardware whose rates reproduce the measured times of `results` (see module doc).

    On a shared host the number of cores the ranks really got is fitted too (a grid from 1 to
    the core count, the best median relative error wins): other work on the machine leaves the
    ranks fewer cores than `nproc` says, which shows as P = 2 running slower than the ideal.
    """
    base = base or base_profile(results)
    if not base.shared_cores:
        return _calibrate(results, base, mode, exclude)
    best = None
    for cores in np.arange(1.0, base.shared_cores + 1e-9, 0.1):
        hw = _calibrate(results, replace(base, shared_cores=float(cores)), mode, exclude)
        err = _fit_error(results, hw, mode, exclude)
        if best is None or err < best[0]:
            best = (err, hw)
    return best[1]


def _fit_error(results, hw, mode, exclude) -> float:
    errs = [abs(_prediction(p, hw).time_s / p[mode]["time_s"] - 1)
            for p in _usable(results, mode) if not (exclude and exclude(p))]
    return float(np.median(errs))


def _calibrate(results: dict, base: Hardware, mode: str, exclude) -> Hardware:
    points = [p for p in _usable(results, mode) if not (exclude and exclude(p))]
    kinds = sorted({_kind(p) for p in points})
    columns = kinds + _SHARED
    if len(points) < len(columns):
        raise ValueError(f"calibrate: {len(points)} usable points for {len(columns)} "
                         f"coefficients (run a bigger suite)")
    a = np.array([_row(p, base, kinds) for p in points])
    y = np.array([p[mode]["time_s"] for p in points])
    coef = _nnls(a / y[:, None], np.ones(len(points)))
    c = dict(zip(columns, coef))
    rates = {k: 1.0 / c[k] for k in kinds if c[k] > 0}
    if not rates:
        raise ValueError("calibrate: no compute coefficient came out positive")
    # the reference rate: single-process attention (torch's fused kernel) when measured
    ref = next((rates[k] for k in ("attention/sdpa", "attention/seqshard") if k in rates),
               max(rates.values()))
    efficiency = {k: r / ref for k, r in rates.items()}
    for fam in FAMILIES:  # a family's default: its fastest measured sharded implementation
        mine = [e for k, e in efficiency.items() if k.startswith(fam + "/") and "@" not in k]
        efficiency[fam] = max(mine) if mine else 1.0
    bw = 1.0 / c["bytes"] if c["bytes"] > 0 else 1e15  # traffic too cheap to resolve here
    scale = {}
    for fam in FAMILIES:
        logs = [math.log(max(p[mode]["mem_peak_bytes"]) /
                         terms(fam, p["impl"], p["shape"], p["n"], p["ulysses"], p["ring"],
                               base).mem_bytes)
                for p in points if p["family"] == fam and max(p[mode]["mem_peak_bytes"]) > 0]
        scale[fam] = math.exp(sum(logs) / len(logs)) if logs else 1.0
    return replace(base, flops=ref, efficiency=efficiency, intra_bw=bw, inter_bw=bw,
                   intra_latency=c["msgs"], inter_latency=c["msgs"], step_overhead=c["steps"],
                   call_overhead=c["call"], memory_scale=scale,
                   note=f"calibrated on {len(points)} measured points ({mode}); the ranks "
                        f"got {base.shared_cores:.1f} of the host's cores")


def _prediction(p: dict, hw: Hardware):
    return predict(p["family"], p["impl"], p["shape"], p["n"], p["ulysses"], p["ring"], hw)


def evaluate(results: dict, hw: Hardware, mode: str = "fwdbwd", tie: float = 0.10,
             only=None) -> dict:
    """Prediction errors and ranking agreement of `hw`'s model on the measured points."""
    rows = []
    for p in _usable(results, mode):
        if only and not only(p):
            continue
        pred = _prediction(p, hw)
        meas_t, meas_m = p[mode]["time_s"], max(p[mode]["mem_peak_bytes"])
        rows.append({"family": p["family"], "impl": p["impl"], "n": p["n"],
                     "world": p["world"], "split": f"{p['ulysses']}x{p['ring']}",
                     "time_s": meas_t, "pred_time_s": pred.time_s,
                     "spread": (min(p[mode]["times_s"]), max(p[mode]["times_s"])),
                     "time_err": pred.time_s / meas_t - 1,
                     "mem_bytes": meas_m, "pred_mem_bytes": pred.mem_bytes,
                     "mem_err": pred.mem_bytes / meas_m - 1 if meas_m else float("nan")})
    errs = [abs(r["time_err"]) for r in rows]
    return {"rows": rows, "ranking": ranking(rows, tie),
            "median_abs_time_err": float(np.median(errs)) if errs else float("nan"),
            "max_abs_time_err": max(errs) if errs else float("nan"),
            "within_30": sum(e <= 0.30 for e in errs), "count": len(errs)}


def _apart(a: dict, b: dict, tie: float) -> bool:
    """Measurably different: medians more than `tie` apart."""
    lo, hi = sorted((a["time_s"], b["time_s"]))
    return hi > lo * (1 + tie)


def ranking(rows: list[dict], tie: float = 0.10) -> dict:
    """Pairwise order agreement among seqshard's strategies for each (family, N, P)."""
    groups = defaultdict(list)
    for r in rows:
        if r["impl"] in CANDIDATE_IMPLS.get(r["family"], ()) and r["world"] > 1:
            groups[(r["family"], r["n"], r["world"])].append(r)
    agree = decisive = top_agree = top_total = 0
    details = []
    for key, rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                a, b = rs[i], rs[j]
                if not _apart(a, b, tie):
                    continue
                decisive += 1
                agree += (a["time_s"] < b["time_s"]) == (a["pred_time_s"] < b["pred_time_s"])
        best_meas = min(rs, key=lambda r: r["time_s"])
        best_pred = min(rs, key=lambda r: r["pred_time_s"])
        # the top pick is right when it is the measured best or within `tie` of it
        ok = best_pred is best_meas or not _apart(best_pred, best_meas, tie)
        top_total += 1
        top_agree += ok
        details.append({"family": key[0], "n": key[1], "world": key[2],
                        "measured_best": f"{best_meas['impl']} {best_meas['split']}",
                        "predicted_best": f"{best_pred['impl']} {best_pred['split']}",
                        "ok": ok})
    return {"pairs_agree": agree, "pairs_decisive": decisive, "top_agree": top_agree,
            "top_total": top_total, "groups": details}


def holdout(results: dict, mode: str = "fwdbwd") -> dict | None:
    """Calibrate without each series' largest N, then score only those largest-N points."""
    largest = defaultdict(int)
    for p in _usable(results, mode):
        key = (p["family"], p["impl"], p["world"], p["ulysses"])
        largest[key] = max(largest[key], p["n"])

    def is_top(p):
        return p["n"] == largest[(p["family"], p["impl"], p["world"], p["ulysses"])]

    try:
        hw = calibrate(results, mode=mode, exclude=is_top)
    except ValueError:
        return None
    return evaluate(results, hw, mode, only=is_top)


def reproducibility(results: dict, earlier: dict, mode: str = "fwdbwd") -> dict:
    """How well two runs of the same points agree: the yardstick for the planner's error
    (no model can predict a machine closer than the machine repeats itself)."""
    def key(p):
        return p["family"], p["impl"], p["n"], p["world"], p["ulysses"]

    before = {key(p): p for p in ok_points(earlier, mode)}
    ratios = [p[mode]["time_s"] / before[key(p)][mode]["time_s"]
              for p in ok_points(results, mode) if key(p) in before]
    diffs = [abs(r - 1) for r in ratios]
    return {"count": len(diffs), "within_30": sum(d <= 0.30 for d in diffs),
            "median_abs_diff": float(np.median(diffs)) if diffs else float("nan"),
            "earlier_started": earlier["started"]}
