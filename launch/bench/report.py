"""Records -> a markdown table, peer ratios and log-log PNG plots with fitted exponents.

A series is every ok point of one (family, impl, world, ulysses x ring) over N; its fitted
exponent is the least-squares slope of log(time) (or log(peak memory)) against log(N), so
attention should show ~2 for time and ~1 for memory, the delta rule and FIT ~1.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .records import cpu_seconds, ok_points

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
