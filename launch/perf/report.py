"""A bench run's report: results.md (measurements, fitted exponents, peer ratios, the
planner's calibrated profile and its error, max-context searches) and log-log PNG plots.

A series is every ok point of one (family, impl, world, ulysses x ring) over N; its fitted
exponent is the least-squares slope of log(time) (or log(peak memory)) against log(N), so
attention should show ~2 for time and ~1 for memory, the delta rule and FIT ~1.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from . import calibrate
from .results import cpu_seconds, ok_points

MiB = 2**20
# (family, ours, peer): ratios are peer time / our time at the same N (and P where the peer
# is sharded too); > 1 means seqshard is faster.
PEERS = {
    "attention": ("sdpa", "ds_ulysses"),
    "delta_rule": ("naive", "chunk"),
    "fit": ("naive",),
}
PEER_ONLY = {"sdpa", "ds_ulysses", "naive"}  # never "ours" in a ratio


def series_key(point: dict) -> tuple:
    return point["family"], point["impl"], point["world"], point["ulysses"], point["ring"]


def series_label(key: tuple) -> str:
    family, impl, world, u, r = key
    split = f" {u}x{r}" if impl == "hybrid" else ""
    return f"{impl}{split} P={world}"


def fit_exponent(ns: list[int], values: list[float]) -> float | None:
    """Slope of log(value) vs log(n); None with fewer than two distinct N."""
    pairs = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v > 0]
    if len({x for x, _ in pairs}) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx


def group_series(results: dict, mode: str = "fwdbwd") -> dict[tuple, list[dict]]:
    series: dict[tuple, list[dict]] = defaultdict(list)
    for p in ok_points(results, mode):
        series[series_key(p)].append(p)
    for points in series.values():
        points.sort(key=lambda p: p["n"])
    return dict(series)


def _fmt_ms(measure: dict | None) -> str:
    return "-" if not measure else f"{measure['time_s'] * 1e3:.1f}"


def markdown_table(results: dict) -> str:
    """One row per point, in the order measured; failed points show their status."""
    head = ("| family | impl | mesh u x r | N | P | fwd ms | fwd+bwd ms | fwd+bwd min ms | "
            "fwd+bwd CPU ms, all ranks | tokens/s | peak MiB/rank | sent MiB/rank | status |")
    rows = [head, "|" + "---|" * 13]
    for p in results["points"]:
        m = p.get("fwdbwd") or p.get("fwd")
        tok = f"{m['tokens_per_s']:.0f}" if m else "-"
        mem = f"{max(m['mem_peak_bytes']) / MiB:.1f}" if m else "-"
        sent = f"{max(m['comm_bytes']) / MiB:.2f}" if m else "-"
        status = p["status"] if p["status"] == "ok" else f"{p['status']}: {(p['error'] or '').splitlines()[0][:60]}"
        fb = p.get("fwdbwd")
        low = f"{min(fb['times_s']) * 1e3:.1f}" if fb else "-"
        cpu = cpu_seconds(fb) if fb else None
        cpu = "-" if cpu is None else f"{cpu * 1e3:.1f}"
        rows.append(f"| {p['family']} | {p['impl']} | {p['ulysses']}x{p['ring']} | {p['n']} | "
                    f"{p['world']} | {_fmt_ms(p.get('fwd'))} | {_fmt_ms(fb)} | {low} | {cpu} | "
                    f"{tok} | {mem} | {sent} | {status} |")
    return "\n".join(rows) + "\n"


def exponents_table(results: dict) -> str:
    rows = ["| family | series | N range | time exponent | memory exponent |", "|---|---|---|---|---|"]
    for key, pts in sorted(group_series(results).items()):
        ns = [p["n"] for p in pts]
        t = fit_exponent(ns, [p["fwdbwd"]["time_s"] for p in pts])
        m = fit_exponent(ns, [max(p["fwdbwd"]["mem_peak_bytes"]) for p in pts])
        if t is None:
            continue
        rows.append(f"| {key[0]} | {series_label(key)} | {min(ns)}..{max(ns)} | {t:.2f} | "
                    f"{'-' if m is None else f'{m:.2f}'} |")
    return "\n".join(rows) + "\n"


def peer_ratios(results: dict, mode: str = "fwdbwd") -> list[dict]:
    """For every seqshard point, its peers' time / its time and memory ratio at the same N.

    A single-process peer (sdpa, naive, chunk) is compared at the same N whatever P; a
    sharded peer (ds_ulysses) at the same N and P.
    """
    pts = ok_points(results, mode)
    out = []
    for p in pts:
        for peer in PEERS.get(p["family"], ()):
            if p["impl"] == peer or p["impl"] in PEER_ONLY:
                continue
            for q in pts:
                same_p = q["world"] == p["world"] if peer == "ds_ulysses" else q["world"] == 1
                if q["family"] == p["family"] and q["impl"] == peer and q["n"] == p["n"] and same_p:
                    out.append({
                        "family": p["family"], "impl": p["impl"], "world": p["world"],
                        "split": f"{p['ulysses']}x{p['ring']}", "n": p["n"], "peer": peer,
                        "time_ratio": q[mode]["time_s"] / p[mode]["time_s"],
                        "mem_ratio": max(q[mode]["mem_peak_bytes"]) /
                        max(1, max(p[mode]["mem_peak_bytes"]))})
    return out


def at_largest_n(ratios: list[dict]) -> list[dict]:
    """Each (ours, P, peer) pair's ratio at the largest N both measured: the headline row."""
    best: dict[tuple, dict] = {}
    for r in ratios:
        key = (r["family"], r["impl"], r["split"], r["world"], r["peer"])
        if key not in best or r["n"] > best[key]["n"]:
            best[key] = r
    return list(best.values())


def ratios_table(ratios: list[dict]) -> str:
    rows = ["| family | ours | P | N | peer | peer time / ours | peer mem / ours (per rank) |",
            "|---|---|---|---|---|---|---|"]
    for r in ratios:
        rows.append(f"| {r['family']} | {r['impl']} {r['split']} | {r['world']} | {r['n']} | "
                    f"{r['peer']} | {r['time_ratio']:.2f} | {r['mem_ratio']:.2f} |")
    return "\n".join(rows) + "\n"


_STYLE = {  # one colour and marker per implementation, the same in every panel
    "sdpa": ("tab:gray", "s"), "seqshard": ("tab:blue", "o"), "ring": ("tab:orange", "o"),
    "ulysses": ("tab:green", "^"), "hybrid": ("tab:red", "D"), "allgather": ("tab:purple", "v"),
    "ds_ulysses": ("tab:brown", "x"), "naive": ("tab:gray", "s"), "chunk": ("tab:blue", "o"),
    "scan": ("tab:orange", "^"), "pass": ("tab:green", "v"), "fit": ("tab:blue", "o"),
    "transformer": ("tab:blue", "o"), "deltanet": ("tab:orange", "^"),
}


def plot(results: dict, out_dir: str | Path, mode: str = "fwdbwd") -> list[Path]:
    """Per family: `{family}_time.png` and `{family}_memory.png`, log-log, one panel per rank
    count P (shared y axis), the fitted exponent of each series in its legend."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a worker or in CI
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_family: dict[str, dict] = defaultdict(dict)
    for key, pts in group_series(results, mode).items():
        by_family[key[0]][key] = pts
    written = []
    for family, series in sorted(by_family.items()):
        worlds = sorted({key[2] for key in series})
        for what, value, unit in (("time", lambda m: m["time_s"], "seconds (median)"),
                                  ("memory", lambda m: max(m["mem_peak_bytes"]) / MiB,
                                   "peak MiB per rank")):
            fig, axes = plt.subplots(1, len(worlds), figsize=(4.2 * len(worlds) + 1, 4.4),
                                     sharey=True, squeeze=False)
            for ax, world in zip(axes[0], worlds):
                for key, pts in sorted(series.items()):
                    if key[2] != world:
                        continue
                    ns = [p["n"] for p in pts]
                    ys = [value(p[mode]) for p in pts]
                    slope = fit_exponent(ns, ys)
                    tag = "" if slope is None else f" ~N^{slope:.2f}"
                    color, marker = _STYLE.get(key[1], (None, "o"))
                    ax.plot(ns, ys, marker=marker, color=color,
                            label=series_label(key).rsplit(" P=", 1)[0] + tag)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"P = {world}")
                ax.set_xlabel("sequence length N (tokens)")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
            axes[0][0].set_ylabel(unit)
            fig.suptitle(f"{family}: {'forward+backward' if mode == 'fwdbwd' else 'forward'} "
                         f"{what} vs N")
            fig.tight_layout()
            path = out_dir / f"{family}_{what}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


# --- results.md ------------------------------------------------------------------------------
def write_report(results: dict, out: str | Path, log=print, earlier: dict | None = None) -> Path:
    """results.md and the PNG plots from a results map (also used on saved records)."""
    out = Path(out)
    plots = plot(results, out)
    ratios = peer_ratios(results)
    lines = [f"# seqshard bench: {results['command']}", "",
             f"Started {results['started']} on {machine_line(results['machine'])}.", "",
             "## Measurements (median of repeats, warm-up excluded; fwd+bwd unless noted)", "",
             markdown_table(results), "## Fitted exponents (time, memory ~ N^k)", "",
             exponents_table(results),
             "## Peers at the largest N (ratios > 1: seqshard faster / smaller)", "",
             ratios_table(at_largest_n(ratios)),
             "## Peers at every N", "", ratios_table(ratios)]
    for r in ratios:
        log(f"  ratio {r['family']}/{r['impl']} {r['split']} P={r['world']} N={r['n']}: "
            f"{r['peer']} time / ours = {r['time_ratio']:.2f}, memory = {r['mem_ratio']:.2f}")
    lines += planner_section(results, log, earlier)
    if results["maxctx"]:
        lines += ["## Max context (largest N whose fwd+bwd fits the budgets)", "",
                  "| op | P | memory budget MiB/rank | time budget s | max N | probes |",
                  "|---|---|---|---|---|---|"]
        for f in results["maxctx"]:
            probes = ", ".join(f"{p['n']}{'' if p['ok'] else ' x'}" for p in f["probes"])
            budgets = [_budget(f["mem_budget_mib"]), _budget(f["time_budget_s"])]
            lines.append(f"| {f['family']}/{f['impl']} | {f['world']} | {budgets[0]} "
                         f"| {budgets[1]} | {f['max_n']} | {probes} |")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def _budget(value: float) -> str:
    """A max-context budget: 'off' where the search did not use it (an infinite budget)."""
    return "off" if value == float("inf") else f"{value:g}"


def machine_line(m: dict) -> str:
    end = m.get("load_avg_1m_end")
    return (f"{m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} cores, "
            f"{m.get('mem_total_bytes', 0) / 2**30:.0f} GiB), torch {m.get('torch', '?')}, "
            f"one thread per rank; 1-minute load average {m.get('load_avg_1m', 0):.1f} at the "
            f"start" + ("" if end is None else f", {end:.1f} at the end"))


def planner_section(results: dict, log=print, earlier: dict | None = None) -> list[str]:
    """The calibrated CPU profile, its time error and its ranking of strategies. With an
    earlier run of the same points, pairs closer than that run-to-run noise are ties."""
    try:
        hw = calibrate.calibrate(results)
    except ValueError as err:
        return ["## Planner", "", f"not calibrated: {err}", ""]
    noise = calibrate.noise_tie(results, earlier) if earlier else None
    tie = noise["tie"] if noise else 0.10
    try:
        work_noise = calibrate.noise_tie(results, earlier, cpu=True) if earlier else None
    except (KeyError, TypeError, ZeroDivisionError):  # an earlier run without CPU times
        work_noise = None
    work_tie = work_noise["tie"] if work_noise else tie
    ev = calibrate.evaluate(results, hw, tie=tie, work_tie=work_tie)
    rk = ev["ranking"]
    log(f"  planner: {ev['within_30']}/{ev['count']} calibrated points within 30% "
        f"(median |err| {ev['median_abs_time_err']:.0%}); strategy pairs ordered right "
        f"{rk['pairs_agree']}/{rk['pairs_decisive']} (tie {tie:.0%}), best pick "
        f"{rk['top_agree']}/{rk['top_total']}")
    rates = ", ".join(f"{k} {hw.flops * v / 1e9:.1f}" for k, v in sorted(hw.efficiency.items()))
    lines = ["## Planner: calibrated CPU profile and its error on these runs", "",
             "Scored against each point's fastest repeat (other work on the host only adds "
             "time). Fitted: kernel rates in GFLOP/s per core " + rates
             + f"; causal diagonal tile {hw.causal_tile} keys (ATen's CPU flash kernel); "
             f"memory passes {hw.mem_bw / 1e9:.2f} GB/s; gloo {hw.intra_bw / 1e9:.2f} GB/s "
             f"(all-gather / reduce-scatter {hw.gather_slowdown:.1f}x slower per byte), "
             f"{hw.msg_cpu * 1e6:.0f} us of CPU and {hw.intra_latency * 1e6:.0f} us of "
             f"waiting per message; {hw.step_overhead * 1e3:.3f} ms per "
             f"kernel call or ring step, {hw.call_overhead * 1e3:.2f} ms per op call; "
             "memory x " + ", ".join(f"{k} {v:.2f}" for k, v in hw.memory_scale.items())
             + "; the ranks got " + (", ".join(f"{c:.1f} cores at P={w}" for w, c in
                                              sorted(hw.cores_by_world.items()))
                                    or f"{hw.shared_cores:.1f} cores")
             + " of the host (each P is timed in its own window; other work changes between "
             "them).", "",
             f"Time within 30%: **{ev['within_30']}/{ev['count']}** points, median |error| "
             f"{ev['median_abs_time_err']:.1%}, max {ev['max_abs_time_err']:.1%}."
             + (f" Work (the busiest rank's CPU time against the model's work terms) within "
                f"30%: **{ev['work_within_30']}/{ev['work_count']}**, median |error| "
                f"{ev['median_abs_work_err']:.1%}." if ev["work_count"] else ""), ""]
    if noise:
        lines += [f"Tie rule from two runs (this one and the run started "
                  f"{noise['earlier_started']}, same code): a pair of strategies counts when "
                  f"its times differ by more than **{tie:.0%}**, the smallest margin at which "
                  "no pair that either run measured further apart is ordered the other way by "
                  f"the other run (work: **{work_tie:.0%}**, the same rule on CPU time). At "
                  "every margin, the pairs this run measured further apart, and how many of "
                  "them the planner and the other run order the same way (the planner cannot "
                  "beat the measurement's own reproducibility):", "",
                  "| margin | wall: pairs | planner agrees | other run agrees | work: pairs | "
                  "planner agrees | other run agrees | pairs flipped between the runs (wall, "
                  "either run decisive) |", "|---|---|---|---|---|---|---|---|"]
        flips = {row["tie"]: row["flipped"] for row in noise["table"]}
        for row in calibrate.agreement_by_margin(results, earlier, hw):
            wall, work = row.get("wall", (0, 0, 0)), row.get("work", ("-", "-", "-"))
            lines.append(f"| {row['tie']:.0%} | {wall[0]} | {wall[1]} | {wall[2]} | {work[0]} | "
                         f"{work[1]} | {work[2]} | {flips.get(row['tie'], '-')} |")
        lines.append("")
    lines += [f"Ranking: **{rk['pairs_agree']}/{rk['pairs_decisive']}** pairs of strategies "
              f"ordered as measured (pairs more than {tie:.0%} apart); the planner's pick is "
              f"the measured best or within {tie:.0%} of it in "
              f"**{rk['top_agree']}/{rk['top_total']}** (family, N, P) groups.", ""]
    wk = ev["work_ranking"]
    if wk:
        lines += [f"The same check on work alone (the busiest rank's measured CPU time, which "
                  f"other work on the host hardly moves, against the model's work terms): "
                  f"**{wk['pairs_agree']}/{wk['pairs_decisive']}** pairs more than "
                  f"{work_tie:.0%} apart ordered as measured"
                  + ("" if not work_noise else
                     f" (that margin from the same two runs' CPU times: "
                     + ", ".join(f"{row['tie']:.0%}: {row['flipped']}/{row['decisive']} flipped"
                                 for row in work_noise["table"][:6]) + ")") + ".", ""]
    wrong = [q for q in rk["pairs"] if not q["ok"]]
    if wrong:
        lines += ["Pairs ordered differently from the measurement:", "",
                  "| family | N | P | a | b | measured ms (a, b) | predicted ms (a, b) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {q['family']} | {q['n']} | {q['world']} | {q['a']} | {q['b']} | "
                  f"{q['measured'][0] * 1e3:.1f}, {q['measured'][1] * 1e3:.1f} | "
                  f"{q['predicted'][0] * 1e3:.1f}, {q['predicted'][1] * 1e3:.1f} |"
                  for q in wrong] + [""]
    held = calibrate.holdout(results, tie=tie)
    if held:
        hr = held["ranking"]
        lines += [f"Held-out check (calibrated without each series' largest N, then "
                  f"predicting those points): {held['within_30']}/{held['count']} within 30%, "
                  f"median |error| {held['median_abs_time_err']:.1%}; ranking "
                  f"{hr['pairs_agree']}/{hr['pairs_decisive']} pairs.", ""]
    lines += ["| op | mesh | N | P | fastest ms | median ms | predicted ms | error | "
              "busiest rank CPU ms | predicted work ms | measured MiB | predicted MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ev["rows"]:
        cpu = "-" if r["cpu_s"] is None else f"{r['cpu_s'] * 1e3:.1f}"
        lines.append(f"| {r['family']}/{r['impl']} | {r['split']} | {r['n']} | {r['world']} | "
                     f"{r['time_s'] * 1e3:.1f} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['pred_time_s'] * 1e3:.1f} | {r['time_err']:+.0%} | {cpu} | "
                     f"{r['pred_cpu_s'] * 1e3:.1f} | "
                     f"{r['mem_bytes'] / MiB:.1f} | {r['pred_mem_bytes'] / MiB:.1f} |")
    lines += ["", "| family | N | P | measured best | planner's pick | ok |", "|---|---|---|---|---|---|"]
    for g in rk["groups"]:
        lines.append(f"| {g['family']} | {g['n']} | {g['world']} | {g['measured_best']} | "
                     f"{g['predicted_best']} | {'yes' if g['ok'] else 'no'} |")
    return lines + [""]
