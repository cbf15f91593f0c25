"""`seqshard bench`: measure a suite, write its records, table and plots.

    seqshard bench --suite quick [--out DIR] [--family attention] [--no-maxctx]
        measures the suite on real gloo ranks, writes DIR/records.msgpack, DIR/results.md and
        DIR/*.png, prints peer ratios and the planner's error on the measured points.

Also runs as `python -m seqshard.launch.perf bench ...`. `seqshard plan` is plan_cmd.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path


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


def cmd_bench(args) -> int:
    out = args.out or f"bench-out/{args.suite}"
    command = "seqshard " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    from .results import read_results

    earlier = read_results(args.previous) if args.previous else None
    run_bench(args.suite, out, families=args.family, maxctx=not args.no_maxctx,
              repeats=args.repeats, warmup=args.warmup, command=command, earlier=earlier)
    return 0


cmd_bench.add_arguments = bench_arguments
