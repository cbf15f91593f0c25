"""`seqshard bench` and `seqshard plan`.

    seqshard bench --suite quick [--out DIR] [--family attention] [--no-maxctx]
        measures the suite on real gloo ranks, writes DIR/records.msgpack, DIR/results.md and
        DIR/*.png, prints peer ratios and the planner's error on the measured points.
    seqshard plan --family attention --heads 32 --kv-heads 8 --head-dim 128 --n 1M --world 64
        [--hardware h100 | cpu | FILE.toml | records.msgpack] [--scaling]
        ranks every strategy / mesh split by predicted fwd+bwd time per layer.

Both also run as `python -m seqshard.launch.bench {bench,plan} ...`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

MiB = 2**20
SCALING_N = (1 << 20, 2 << 20, 4 << 20, 10 << 20)
SCALING_P = (8, 16, 32, 64, 128, 256, 512, 1024)


def parse_tokens(text: str) -> int:
    """'4096', '64K', '1M', '10M' -> tokens (K = 1024, M = 1024^2)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    try:
        value = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise ValueError(f"length {text!r}: expected an integer with optional K/M/G") from None
    if value < 1:
        raise ValueError(f"length {text!r} must be >= 1 token")
    return value


# --- bench -------------------------------------------------------------------------------------
def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="quick", help="tiny | quick | full (default quick)")
    p.add_argument("--out", default=None, help="output folder (default bench-out/SUITE)")
    p.add_argument("--family", action="append", default=None,
                   help="only this op family (repeatable): attention, delta_rule, fit")
    p.add_argument("--no-maxctx", action="store_true", help="skip the max-context searches")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per point")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs per point")
    p.add_argument("--previous", default=None,
                   help="records.msgpack of an earlier run of the same suite: its run-to-run "
                        "noise sets the planner ranking's tie margin")


def run_bench(suite_name: str, out: str | Path, *, families=None, maxctx: bool = True,
              repeats: int | None = None, warmup: int | None = None, command: str = "",
              log=print, earlier: dict | None = None) -> dict:
    """Measure a suite and write records, table and plots into `out`; returns the results."""
    from . import maxctx as maxctx_mod
    from .records import new_results, write_results
    from .runner import run_points
    from .suites import get_suite

    suite = get_suite(suite_name)
    specs = [s for s in suite.specs if not families or s["family"] in families]
    if not specs:
        raise ValueError(f"suite {suite_name!r} has no points for families={families}")
    out = Path(out)
    results = new_results(command or f"seqshard bench --suite {suite_name}")
    started = time.monotonic()
    log(f"seqshard bench: suite {suite_name}, {len(specs)} points -> {out}")
    results["points"] = run_points(specs, warmup=suite.warmup if warmup is None else warmup,
                                   repeats=suite.repeats if repeats is None else repeats,
                                   max_repeats=suite.max_repeats, min_total_s=suite.min_total_s,
                                   log=log)
    write_results(out / "records.msgpack", results)
    if maxctx:
        for job in suite.maxctx:
            if families and job["family"] not in families:
                continue
            log(f"  max context: {job['family']}/{job['impl']} P={job['world']}, "
                f"{job['mem_budget_mib']} MiB/rank, {job['time_budget_s']} s")
            found = maxctx_mod.find(job, log=log)
            found["mem_budget_mib"] = float(found["mem_budget_mib"])
            found["time_budget_s"] = float(found["time_budget_s"])
            results["maxctx"].append(found)
            write_results(out / "records.msgpack", results)
    results["elapsed_s"] = time.monotonic() - started
    results["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    write_results(out / "records.msgpack", results)
    write_report(results, out, log=log, earlier=earlier)
    log(f"seqshard bench: done in {results['elapsed_s']:.0f} s; see {out / 'results.md'}")
    return results


def write_report(results: dict, out: str | Path, log=print, earlier: dict | None = None) -> Path:
    """results.md and the PNG plots from a results map (also used on saved records)."""
    from . import report

    out = Path(out)
    plots = report.plot(results, out)
    ratios = report.peer_ratios(results)
    lines = [f"# seqshard bench: {results['command']}", "",
             f"Started {results['started']} on {machine_line(results['machine'])}.", "",
             "## Measurements (median of repeats, warm-up excluded; fwd+bwd unless noted)", "",
             report.markdown_table(results), "## Fitted exponents (time, memory ~ N^k)", "",
             report.exponents_table(results),
             "## Peers at the largest N (ratios > 1: seqshard faster / smaller)", "",
             report.ratios_table(report.at_largest_n(ratios)),
             "## Peers at every N", "", report.ratios_table(ratios)]
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
            lines.append(f"| {f['family']}/{f['impl']} | {f['world']} | {f['mem_budget_mib']:g} "
                         f"| {f['time_budget_s']:g} | {f['max_n']} | {probes} |")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def machine_line(m: dict) -> str:
    end = m.get("load_avg_1m_end")
    return (f"{m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} cores, "
            f"{m.get('mem_total_bytes', 0) / 2**30:.0f} GiB), torch {m.get('torch', '?')}, "
            f"one thread per rank; 1-minute load average {m.get('load_avg_1m', 0):.1f} at the "
            f"start" + ("" if end is None else f", {end:.1f} at the end"))


def planner_section(results: dict, log=print, earlier: dict | None = None) -> list[str]:
    """The calibrated CPU profile, its time error and its ranking of strategies. With an
    earlier run of the same points, pairs closer than that run-to-run noise are ties."""
    from . import calibrate

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


def cmd_bench(args) -> int:
    out = args.out or f"bench-out/{args.suite}"
    command = "seqshard " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    from .records import read_results

    earlier = read_results(args.previous) if args.previous else None
    run_bench(args.suite, out, families=args.family, maxctx=not args.no_maxctx,
              repeats=args.repeats, warmup=args.warmup, command=command, earlier=earlier)
    return 0


cmd_bench.add_arguments = bench_arguments
