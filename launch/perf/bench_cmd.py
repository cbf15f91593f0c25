"""`seqshard bench`: measure a suite, write its records, table and plots.

    seqshard bench --suite quick [--out DIR] [--family attention] [--no-maxctx]
        measures the suite on real gloo ranks, writes DIR/records.msgpack, DIR/results.md and
        DIR/*.png, prints peer ratios and the planner's error on the measured points.
    seqshard bench --maxctx-memory MIB [--maxctx-worlds 1,2,4] [--maxctx-probe-cap S]
        instead, the seed paper's "attention scale-up" as memory-only max-context searches
        (maxctx.compare): naive attention on 1 process vs seqshard on P ranks, MIB per rank;
        writes DIR/records.msgpack and DIR/maxctx.md (DIR default bench-out/maxctx).

Also runs as `python -m seqshard.launch.perf bench ...`. `seqshard plan` is plan_cmd.py.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path


def positive_mib(text: str) -> float:
    """--maxctx-memory's type: a MiB count > 0 (argparse reports the ValueError's text)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"--maxctx-memory={text}: expected a positive number of MiB per rank")
    return value


def world_list(text: str) -> tuple[int, ...]:
    try:
        worlds = tuple(int(w) for w in text.split(","))
    except ValueError:
        worlds = ()
    if not worlds or any(w < 1 for w in worlds):
        raise argparse.ArgumentTypeError(
            f"--maxctx-worlds={text}: expected rank counts >= 1 separated by commas, e.g. 1,2,4")
    return worlds


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="quick", help="tiny | quick | full (default quick)")
    p.add_argument("--out", default=None, help="output folder (default bench-out/SUITE)")
    p.add_argument("--family", action="append", default=None,
                   help="only this op family (repeatable): attention, delta_rule, fit")
    p.add_argument("--no-maxctx", action="store_true", help="skip the max-context searches")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per point")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs per point")
    p.add_argument("--maxctx-memory", type=positive_mib, default=None, metavar="MIB",
                   help="only the memory-only scale-up search: naive attention (P=1) vs "
                        "seqshard (each P), MIB of memory per rank, no time budget")
    p.add_argument("--maxctx-worlds", type=world_list, default=(1, 2, 4),
                   help="rank counts for --maxctx-memory (default 1,2,4)")
    p.add_argument("--maxctx-probe-cap", type=float, default=600.0, metavar="S",
                   help="seconds one --maxctx-memory probe may run before it counts as "
                        "failed; reported, the answer is then a lower bound (default 600)")
    p.add_argument("--previous", default=None,
                   help="records.msgpack of an earlier run of the same suite: its run-to-run "
                        "noise sets the planner ranking's tie margin")


def run_bench(suite_name: str, out: str | Path, *, families=None, maxctx: bool = True,
              repeats: int | None = None, warmup: int | None = None, command: str = "",
              log=print, earlier: dict | None = None) -> dict:
    """Measure a suite and write records, table and plots into `out`; returns the results."""
    from . import maxctx as maxctx_mod
    from . import report
    from .results import new_results, write_results
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
    report.write_report(results, out, log=log, earlier=earlier)
    log(f"seqshard bench: done in {results['elapsed_s']:.0f} s; see {out / 'results.md'}")
    return results


def run_scaleup(mem_mib: float, worlds, out: str | Path, *, probe_cap_s: float = 600.0,
                command: str = "", log=print) -> dict:
    """maxctx.compare under `mem_mib` per rank; writes records.msgpack and maxctx.md."""
    from . import maxctx
    from .report import machine_line
    from .results import new_results, write_results

    out = Path(out)
    results = new_results(command or f"seqshard bench --maxctx-memory {mem_mib:g}")
    started = time.monotonic()
    shape = maxctx.SCALEUP_SHAPE
    log(f"seqshard bench: memory-only max context, {mem_mib:g} MiB/rank, P in {list(worlds)}, "
        f"shape {shape}, fp32 -> {out}")
    results["maxctx"] = maxctx.compare(mem_mib, worlds, shape, probe_cap_s=probe_cap_s, log=log)
    results["elapsed_s"] = time.monotonic() - started
    write_results(out / "records.msgpack", results)
    lines = [f"# Attention scale-up at {mem_mib:g} MiB per rank (memory only)", "",
             f"`{results['command']}`, started {results['started']} on "
             f"{machine_line(results['machine'])}; {results['elapsed_s']:.0f} s.", "",
             f"Causal fwd+bwd, fp32, {shape}. Peak: bytes live in torch's allocator above the "
             f"state before the inputs (measure.PeakMemory), the largest over ranks. A probe "
             f"past {probe_cap_s:g} s counts as failed (capped).", ""]
    lines += maxctx.scaleup_table(results["maxctx"]) + [""]
    (out / "maxctx.md").write_text("\n".join(lines))
    log("\n".join(lines))
    return results


def cmd_bench(args) -> int:
    command = "seqshard " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    if args.maxctx_memory is not None:
        run_scaleup(args.maxctx_memory, args.maxctx_worlds, args.out or "bench-out/maxctx",
                    probe_cap_s=args.maxctx_probe_cap, command=command)
        return 0
    out = args.out or f"bench-out/{args.suite}"
    from .results import read_results

    earlier = read_results(args.previous) if args.previous else None
    run_bench(args.suite, out, families=args.family, maxctx=not args.no_maxctx,
              repeats=args.repeats, warmup=args.warmup, command=command, earlier=earlier)
    return 0


cmd_bench.add_arguments = bench_arguments
