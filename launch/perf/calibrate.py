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

from .planner import (CANDIDATE_IMPLS, CPU_DEFAULT, FAMILIES, Hardware, features, predict,
                      terms, work_features, work_time)
from .results import ok_points

_SHARED = ["bytes", "gather_bytes", "copy_bytes", "msgs", "steps", "call"]
# peers that run a different algorithm, not the family's kernel: their own compute rate
OWN_KERNEL = {("delta_rule", "naive"), ("fit", "naive")}


def _usable(results: dict, mode: str) -> list[dict]:
    return [p for p in ok_points(results, mode) if p["family"] in FAMILIES]


def measured(point: dict, mode: str = "fwdbwd") -> float:
    """The time a point is scored by: the fastest repeat. On a shared host other work only
    ever adds time, so the least disturbed repeat is the best estimate of the op's own cost
    (the median is kept in the records and tables too)."""
    return min(point[mode]["times_s"])


def _kind(point: dict) -> str:
    """The compute rate a point shares: its family's kernel, or its own for OWN_KERNEL."""
    if (point["family"], point["impl"]) in OWN_KERNEL:
        return f"{point['family']}/{point['impl']}"
    return point["family"]


def _row(point: dict, hw: Hardware, kinds: list[str]) -> list[float]:
    t = terms(point["family"], point["impl"], point["shape"], point["n"], point["ulysses"],
              point["ring"], hw)
    f = features(t, point["world"], hw)
    row = [f["flops"] if _kind(point) == kind else 0.0 for kind in kinds]
    return row + [f["bytes_intra"] + f["bytes_inter"], f["gather_bytes"], f["copy_bytes"],
                  f["msgs"], f["steps"], f["call"]]


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

    Records with every rank's CPU time are fitted in two stages: the *work* coefficients
    (kernel rates, memory passes, gloo's CPU per byte, per-call overheads) from the busiest
    rank's CPU time, which other work on a shared host hardly moves; then, from wall time,
    only what waiting adds: message latency and the cores the ranks really got (a grid from
    1/2 to the host's count, the best median relative error wins: other work leaves the ranks
    fewer cores than `nproc` says). Older records fit everything to wall time at once.
    """
    base = base or base_profile(results)
    points = [p for p in _usable(results, mode) if not (exclude and exclude(p))]
    kinds = sorted({_kind(p) for p in points})
    if len(points) < len(kinds) + len(_SHARED):
        raise ValueError(f"calibrate: {len(points)} usable points for "
                         f"{len(kinds) + len(_SHARED)} coefficients (run a bigger suite)")
    work = _fit_work(points, base, mode, kinds) if all(
        busiest_cpu(p, mode) for p in points) else None
    if not base.shared_cores:
        return (_fit_wall(points, base, mode, kinds, work) if work else
                _calibrate(points, base, mode, kinds))
    grid = np.arange(0.3, base.shared_cores + 1e-9, 0.1)
    if not work:  # one core count for the whole run, fitted with everything else
        fits = [_calibrate(points, replace(base, shared_cores=float(c)), mode, kinds)
                for c in grid]
        return min(fits, key=lambda hw: _median_error(points, hw, mode))
    # The suite measures each rank count in its own time window, and other work on the host
    # changes between windows: the cores the ranks got are fitted per rank count (a measured
    # condition of the run, the same for every strategy compared at that count).
    worlds = sorted({p["world"] for p in points})
    # first guess: the CPU the ranks got per second of wall time (waiting counts against it)
    cores = {w: float(np.clip(np.median([w * busiest_cpu(p, mode) / measured(p, mode)
                                         for p in points if p["world"] == w]),
                              grid[0], grid[-1])) for w in worlds}
    hw = _fit_wall(points, replace(base, cores_by_world=dict(cores)), mode, kinds, work)
    for _ in range(6):  # alternate: each window's cores, then the latency they imply
        for w in worlds:
            mine = [p for p in points if p["world"] == w]
            cores[w] = float(min(grid, key=lambda c: _median_error(
                mine, replace(hw, cores_by_world={**cores, w: float(c)}), mode)))
        hw = _fit_wall(points, replace(base, cores_by_world=dict(cores)), mode, kinds, work)
    top = max(worlds)
    return replace(hw, shared_cores=cores[top],
                   note=hw.note.split(";")[0] + "; the ranks got " + ", ".join(
                       f"{cores[w]:.1f} cores at P={w}" for w in worlds))


def _median_error(points, hw, mode) -> float:
    return float(np.median([abs(_prediction(p, hw).time_s / measured(p, mode) - 1)
                            for p in points]))


def busiest_cpu(point: dict, mode: str = "fwdbwd") -> float | None:
    """The busiest rank's CPU seconds in its median repeat (None for records without)."""
    cpu = point[mode].get("cpu_times_s")
    return max(float(np.median(c)) for c in cpu) if cpu else None


_WORK = ["bytes", "gather_bytes", "copy_bytes", "steps", "msgs", "call"]


def _fit_work(points, base, mode, kinds) -> dict:
    """Stage 1: CPU seconds = sum of work features x coefficients (relative NNLS)."""
    rows = []
    for p in points:
        f = work_features(terms(p["family"], p["impl"], p["shape"], p["n"], p["ulysses"],
                                p["ring"], base), p["world"])
        rows.append([f["flops"] if _kind(p) == kind else 0.0 for kind in kinds]
                    + [f[k] for k in _WORK])
    a, y = np.array(rows), np.array([busiest_cpu(p, mode) for p in points])
    return dict(zip(kinds + _WORK, _nnls(a / y[:, None], np.ones(len(points)))))


def _fit_wall(points, base, mode, kinds, c) -> Hardware:
    """Stage 2: with the work fixed, the latency per message that best explains wall time."""
    hw = _profile(points, base, mode, kinds, dict(c, latency=0.0))
    pred = np.array([_prediction(p, hw).time_s for p in points])
    msgs = np.array([(lambda t: t.msgs_intra + t.msgs_inter)(
        terms(p["family"], p["impl"], p["shape"], p["n"], p["ulysses"], p["ring"], base))
        for p in points])
    y = np.array([measured(p, mode) for p in points])
    a, b = pred / y, msgs / y  # relative error a + b * latency - 1, least squares
    latency = max(0.0, float(b @ (1 - a) / (b @ b))) if b @ b > 0 else 0.0
    return _profile(points, base, mode, kinds, dict(c, latency=latency))


def _calibrate(points, base: Hardware, mode: str, kinds) -> Hardware:
    """Everything from wall time at once (records without CPU times)."""
    a = np.array([_row(p, base, kinds) for p in points])
    y = np.array([measured(p, mode) for p in points])
    coef = _nnls(a / y[:, None], np.ones(len(points)))
    c = dict(zip(kinds + _SHARED, coef))
    return _profile(points, base, mode, kinds, dict(c, latency=c["msgs"], msgs=0.0))


def _profile(points, base: Hardware, mode: str, kinds, c: dict) -> Hardware:
    """The Hardware with coefficients `c` (seconds per unit of each feature)."""
    rates = {k: 1.0 / c[k] for k in kinds if c[k] > 0}
    if not rates:
        raise ValueError("calibrate: no compute coefficient came out positive")
    # the reference rate: the attention kernel (torch's fused one) when measured
    ref = rates.get("attention", max(rates.values()))
    efficiency = {k: r / ref for k, r in rates.items()}
    for fam in FAMILIES:
        efficiency.setdefault(fam, 1.0)
    bw = 1.0 / c["bytes"] if c["bytes"] > 0 else 1e15  # traffic too cheap to resolve here
    slowdown = 1.0 + c["gather_bytes"] * bw
    scale = {}
    for fam in FAMILIES:
        logs = [math.log(max(p[mode]["mem_peak_bytes"]) /
                         terms(fam, p["impl"], p["shape"], p["n"], p["ulysses"], p["ring"],
                               base).mem_bytes)
                for p in points if p["family"] == fam and max(p[mode]["mem_peak_bytes"]) > 0]
        scale[fam] = math.exp(sum(logs) / len(logs)) if logs else 1.0
    mem_bw = 1.0 / c["copy_bytes"] if c["copy_bytes"] > 0 else 1e15
    return replace(base, flops=ref, efficiency=efficiency, intra_bw=bw, inter_bw=bw,
                   mem_bw=mem_bw, gather_slowdown=slowdown,
                   intra_latency=c["latency"], inter_latency=c["latency"], msg_cpu=c["msgs"],
                   step_overhead=c["steps"],
                   call_overhead=c["call"], memory_scale=scale,
                   note=f"calibrated on {len(points)} measured points ({mode}); the ranks "
                        f"got {base.shared_cores:.1f} of the host's cores")


def _prediction(p: dict, hw: Hardware):
    return predict(p["family"], p["impl"], p["shape"], p["n"], p["ulysses"], p["ring"], hw)


def evaluate(results: dict, hw: Hardware, mode: str = "fwdbwd", tie: float = 0.10,
             only=None, work_tie: float | None = None) -> dict:
    """Prediction errors and ranking agreement of `hw`'s model on the measured points."""
    rows = []
    for p in _usable(results, mode):
        if only and not only(p):
            continue
        pred = _prediction(p, hw)
        meas_t, meas_m = measured(p, mode), max(p[mode]["mem_peak_bytes"])
        rows.append({"family": p["family"], "impl": p["impl"], "n": p["n"],
                     "world": p["world"], "split": f"{p['ulysses']}x{p['ring']}",
                     "time_s": meas_t, "median_s": p[mode]["time_s"],
                     "pred_time_s": pred.time_s, "cpu_s": busiest_cpu(p, mode),
                     "pred_cpu_s": work_time(p["family"], p["impl"], p["shape"], p["n"],
                                             p["ulysses"], p["ring"], hw),
                     "spread": (min(p[mode]["times_s"]), max(p[mode]["times_s"])),
                     "time_err": pred.time_s / meas_t - 1,
                     "mem_bytes": meas_m, "pred_mem_bytes": pred.mem_bytes,
                     "mem_err": pred.mem_bytes / meas_m - 1 if meas_m else float("nan")})
    errs = [abs(r["time_err"]) for r in rows]
    work_errs = [abs(r["pred_cpu_s"] / r["cpu_s"] - 1) for r in rows if r["cpu_s"]]
    # the same check on work alone: the busiest rank's measured CPU time against the model's
    # work_time; other work on the host hardly moves CPU time, so this order is steadier
    work = [dict(r, time_s=r["cpu_s"], pred_time_s=r["pred_cpu_s"]) for r in rows
            if r["cpu_s"] is not None]
    return {"rows": rows, "ranking": ranking(rows, tie),
            "work_ranking": (ranking(work, tie if work_tie is None else work_tie)
                             if work and len(work) == len(rows) else None),
            "median_abs_time_err": float(np.median(errs)) if errs else float("nan"),
            "max_abs_time_err": max(errs) if errs else float("nan"),
            "within_30": sum(e <= 0.30 for e in errs), "count": len(errs),
            "work_within_30": sum(e <= 0.30 for e in work_errs), "work_count": len(work_errs),
            "median_abs_work_err": float(np.median(work_errs)) if work_errs else float("nan")}


def _apart(a: dict, b: dict, tie: float) -> bool:
    """Measurably different: measured times more than `tie` apart."""
    lo, hi = sorted((a["time_s"], b["time_s"]))
    return hi > lo * (1 + tie)


def _groups(rows: list[dict]) -> dict:
    """seqshard's own strategies of each (family, N, P > 1): the choices the planner makes."""
    groups = defaultdict(list)
    for r in rows:
        if r["impl"] in CANDIDATE_IMPLS.get(r["family"], ()) and r["world"] > 1:
            groups[(r["family"], r["n"], r["world"])].append(r)
    return groups


def _label(r: dict) -> str:
    return f"{r['impl']} {r['split']}"


def ranking(rows: list[dict], tie: float = 0.10) -> dict:
    """Pairwise order agreement among seqshard's strategies for each (family, N, P).

    A pair counts ("decisive") when its measured times differ by more than `tie`; closer
    pairs are within run-to-run noise (see `noise_tie`) and count neither way. `pairs` lists
    every decisive pair with both times, so a disagreement can be read off."""
    agree = decisive = top_agree = top_total = 0
    details, pairs = [], []
    for key, rs in sorted(_groups(rows).items()):
        if len(rs) < 2:
            continue
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                a, b = rs[i], rs[j]
                if not _apart(a, b, tie):
                    continue
                decisive += 1
                ok = (a["time_s"] < b["time_s"]) == (a["pred_time_s"] < b["pred_time_s"])
                agree += ok
                pairs.append({"family": key[0], "n": key[1], "world": key[2],
                              "a": _label(a), "b": _label(b), "ok": ok,
                              "measured": (a["time_s"], b["time_s"]),
                              "predicted": (a["pred_time_s"], b["pred_time_s"])})
        best_meas = min(rs, key=lambda r: r["time_s"])
        best_pred = min(rs, key=lambda r: r["pred_time_s"])
        # the top pick is right when it is the measured best or within `tie` of it
        ok = best_pred is best_meas or not _apart(best_pred, best_meas, tie)
        top_total += 1
        top_agree += ok
        details.append({"family": key[0], "n": key[1], "world": key[2],
                        "measured_best": _label(best_meas), "predicted_best": _label(best_pred),
                        "ok": ok})
    return {"pairs_agree": agree, "pairs_decisive": decisive, "top_agree": top_agree,
            "top_total": top_total, "groups": details, "pairs": pairs, "tie": tie}


TIE_GRID = tuple(round(0.05 * i, 2) for i in range(1, 11))  # 5% .. 50%


def noise_tie(results: dict, earlier: dict, mode: str = "fwdbwd", grid=TIE_GRID,
              cpu: bool = False) -> dict:
    """The tie rule from two runs of the same points: the smallest margin t (from `grid`)
    such that no pair of strategies that either run measured more than t apart is ordered
    the other way by the other run. Pairs closer than t cannot be told apart on this
    machine, so the ranking check leaves them out. Returns the margin, and per margin how
    many pairs were decisive and how many of them flipped (the justification). cpu: the same
    for the busiest rank's CPU time (the work ranking's margin)."""
    def times(res):
        return {(r["family"], r["n"], r["world"], _label(r)): r["cpu_s" if cpu else "time_s"]
                for r in evaluate_rows(res, mode) if r["cpu_s" if cpu else "time_s"]}

    now, before = times(results), times(earlier)
    pairs = []
    for (fam, n, world), rs in _groups([{"family": k[0], "n": k[1], "world": k[2],
                                         "impl": k[3].split()[0], "label": k[3]}
                                        for k in now]).items():
        labels = sorted(r["label"] for r in rs)
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                ka, kb = (fam, n, world, labels[i]), (fam, n, world, labels[j])
                if ka in before and kb in before:
                    pairs.append((math.log(now[ka] / now[kb]),
                                  math.log(before[ka] / before[kb])))
    table = []
    for t in grid:
        cut = math.log(1 + t)
        decisive = [(x, y) for x, y in pairs if abs(x) > cut or abs(y) > cut]
        flipped = sum(x * y < 0 for x, y in decisive)
        table.append({"tie": t, "decisive": len(decisive), "flipped": flipped})
    tie = next((row["tie"] for row in table if row["flipped"] == 0), grid[-1])
    return {"tie": tie, "table": table, "pairs": len(pairs),
            "earlier_started": earlier["started"]}


def agreement_by_margin(results: dict, earlier: dict, hw: Hardware, mode: str = "fwdbwd",
                        grid=TIE_GRID) -> list[dict]:
    """For each margin: the pairs of strategies `results` measured further apart than it, how
    many the planner orders the same way, and how many a second run of the same points
    (`earlier`) orders the same way -- the planner cannot be expected to agree with a
    measurement more often than the measurement agrees with itself. Wall time and work
    (the busiest rank's CPU time) each."""
    before = {(r["family"], r["n"], r["world"], _label(r)): r for r in evaluate_rows(earlier, mode)}
    table = []
    for tie in grid:
        ev = evaluate(results, hw, mode, tie=tie, work_tie=tie)
        row = {"tie": tie}
        for name, key, field in (("wall", "ranking", "time_s"), ("work", "work_ranking", "cpu_s")):
            rk = ev[key]
            if rk is None:
                continue
            rerun = 0
            for q in rk["pairs"]:
                a, b = (before.get((q["family"], q["n"], q["world"], x)) for x in (q["a"], q["b"]))
                if a and b and a[field] and b[field]:
                    rerun += (a[field] < b[field]) == (q["measured"][0] < q["measured"][1])
            row[name] = (rk["pairs_decisive"], rk["pairs_agree"], rerun)
        table.append(row)
    return table


def evaluate_rows(results: dict, mode: str = "fwdbwd") -> list[dict]:
    """The measured side of `evaluate`'s rows (no model needed)."""
    return [{"family": p["family"], "impl": p["impl"], "n": p["n"], "world": p["world"],
             "split": f"{p['ulysses']}x{p['ring']}", "time_s": measured(p, mode),
             "cpu_s": busiest_cpu(p, mode)}
            for p in _usable(results, mode)]


def holdout(results: dict, mode: str = "fwdbwd", tie: float = 0.10) -> dict | None:
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
    return evaluate(results, hw, mode, tie=tie, only=is_top)


def reproducibility(results: dict, earlier: dict, mode: str = "fwdbwd") -> dict:
    """How well two runs of the same points agree: the yardstick for the planner's error
    (no model can predict a machine closer than the machine repeats itself)."""
    def key(p):
        return p["family"], p["impl"], p["n"], p["world"], p["ulysses"]

    before = {key(p): p for p in ok_points(earlier, mode)}
    ratios = [measured(p, mode) / measured(before[key(p)], mode)
              for p in ok_points(results, mode) if key(p) in before]
    diffs = [abs(r - 1) for r in ratios]
    return {"count": len(diffs), "within_30": sum(d <= 0.30 for d in diffs),
            "median_abs_diff": float(np.median(diffs)) if diffs else float("nan"),
            "earlier_started": earlier["started"]}
