"""Run a `seqshard bench` suite and write benchmarks/RESULTS.md from it.

    python benchmarks/run_suite.py --suite quick   # benchmarks/out/quick + RESULTS.md
    python benchmarks/run_suite.py --from benchmarks/out/quick   # only re-render RESULTS.md

RESULTS.md = how it was run (exact command, machine, load before and after, wall time), the
suite's results.md (measurements, exponents, peer ratios, planner error and ranking, max
context), and the planner's predictions on 8 x H100 nodes for 1M-10M tokens; then, kept
as they are by a re-render, the hand-run per-op sections (from the HAND_RUN line to the end).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from seqshard.launch.perf.bench_cmd import run_bench
from seqshard.launch.perf.plan_cmd import scaling_table
from seqshard.launch.perf.planner import H100_NODE
from seqshard.launch.perf.report import write_report
from seqshard.launch.perf.results import read_results

HERE = Path(__file__).resolve().parent
GPU_SHAPES = [
    ("attention", "Llama-3-8B-like attention layer: 32 query heads, 8 KV heads, head dim 128, "
     "causal, bf16",
     {"batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "causal": True}),
    ("delta_rule", "DeltaNet layer: 16 heads, d_k = d_v = 128, chunk 64",
     {"batch": 1, "heads": 16, "dk": 128, "dv": 128, "chunk": 64}),
    ("fit", "FIT stack: width 1024, 16 heads, groups of 256 tokens, 16 latents, depth 2",
     {"batch": 1, "dim": 1024, "heads": 16, "group_size": 256, "latents": 16, "depth": 2,
      "causal": True}),
]


METHOD = """## How the numbers are taken

- Every rank is a spawned process in a real gloo group (`Mesh.from_env`), one thread each (one
  rank = one core, as one rank = one GPU); P = 4 on this 2-core machine therefore shares cores.
- Time: one untimed warm-up, then at least 4 timed runs between barriers (the slowest rank's
  wall time; short points repeat up to 7 times until a second was timed). All points of one P
  are interleaved: every timing round runs each point once, so a burst of other work slows
  them alike. Every repeat is in the records; tables show the median and the fastest repeat.
  Each rank's CPU time over the same window is recorded beside it (the table shows all ranks'
  sum): wall x P much above it means the ranks waited (for each other or for a core).
- Peak memory per rank: bytes live in torch's CPU allocator (profiler memory events) above
  the state before the inputs were made, so inputs, gradients, outputs, saved activations and
  received buffers count. The resident high-water mark (VmHWM) is recorded too, as a coarse
  cross-check.
- Bytes sent per rank: counted at torch.distributed for the collectives the op really made,
  under bandwidth-optimal algorithms; tests check that they equal the planner's formulas.
- Planner: the CPU profile is fitted to these same points, scored against each point's
  fastest repeat (relative least squares: one kernel rate per family, a memory-pass rate,
  gloo bandwidth and latency, per-kernel-call and per-op overheads, and the cores the ranks
  really got). Strategies differ only by what the model counts for them (flops incl. the
  causal diagonal tiles, kernel calls of their plans, merge / sum / all-to-all memory passes,
  bytes, messages), never by a fitted per-strategy rate. The held-out line refits without
  each series' largest N and predicts those points.
"""


PLANNER_NOTES = """## What the planner counts, and why the earlier ranking disagreed

The run of 11:08 (previous session) ordered 16/22 strategy pairs like the measurement. The six
misses, read from its records: two involved one disturbed point (Ulysses at N=4096, P=2: repeats
783..4046 ms, median 1173 ms; scored on its fastest repeat it is within 10% of ring and
all-gather), one pair had repeats spread over 4x (N=512, P=4, all-gather 68..267 ms, hybrid
66..791 ms), and three (N=1024: ring against all-gather and hybrid) came from the model
itself: it fitted one compute rate *per strategy* (ring's came out 1.65x the fused kernel's,
which is no physical rate, only the fit absorbing ring's costs) and counted ring steps but not
the kernel calls and memory passes each strategy's plan makes. Two runs of the same points
also showed that a fixed 10% margin is far inside this machine's run-to-run noise.

The model now has one kernel rate per op family and counts, per rank, what the code does:
flops (plus the causal diagonal tiles the fused kernel computes whole: 512 keys on the CPU),
the kernel calls of the busiest rank's plan (ring P+2 blocks, all-gather 2P+1 on the last rank,
hybrid 2u^2 r - (u-1)(u-2) blocks per step set, times the backward's head groups), the fp32
memory passes of LSE merges, gradient sums and all-to-all packing, bytes by point-to-point /
all-to-all and by all-gather / reduce-scatter (gloo's are slower per byte: measured 2-4x),
messages, and the delta rule's serial chain for "pass". On the CPU the chains are one fused C
call (no kernel calls per chunk), and their flops count at that kernel's measured speed (5x
the family rate per flop). Calibration fits the work from every
rank's CPU time (other work on the host hardly moves it) and only latency and the cores the
ranks got from wall time. The tie margin of the ranking check comes from two runs of the
same points (table below).
"""


UNMEASURED = "predicted from datasheet rates, not measured"
# Everything from this line to the end of RESULTS.md is written by hand (measurements taken
# with the per-op benchmarks and their commands); a re-render keeps it as it is.
HAND_RUN = "# Hand-run measurements, per op"


def gpu_section() -> list[str]:
    lines = ["## Planner predictions: 8 x H100 (NVLink) nodes joined by InfiniBand "
             f"({UNMEASURED})", "",
             f"Profile `h100`: {H100_NODE.note}. One layer, forward + backward, batch 1; "
             "'best' is the fastest plan that fits in 80 GB. Reproduce with "
             "`seqshard plan --scaling --family FAMILY ...`.", ""]
    for family, title, shape in GPU_SHAPES:
        lines += [f"### {title} -- {UNMEASURED}", "", scaling_table(family, shape, H100_NODE)]
    lines += ["## GPU measurements", "",
              "None yet: the H100 profile above is uncalibrated (datasheet rates x assumed "
              "efficiencies). On a GPU machine, `python benchmarks/gpu_check.py` measures the "
              "kernels, the sharded ops, the largest context and a training step of each "
              "model; `seqshard bench --suite quick` records the suite's points with NCCL and "
              "`seqshard plan --hardware bench-out/quick/records.msgpack` uses them.", ""]
    return lines


def hand_run_part(path: Path) -> str:
    """The hand-written tail of an existing RESULTS.md (from HAND_RUN on), or ''."""
    text = path.read_text() if path.exists() else ""
    at = text.find("\n" + HAND_RUN + "\n")
    return text[at + 1:] if at >= 0 else ""


def _shown(path: Path) -> str:
    """Paths inside the repository as the repository sees them."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def render(out: Path, command: str, previous: str | None = None,
           kept: Path | None = None, note: str | None = None) -> str:
    results = read_results(out / "records.msgpack")
    m = results["machine"]
    repro = []
    if previous:
        from seqshard.launch.perf.calibrate import reproducibility

        r = reproducibility(results, read_results(previous))
        repro = [f"- run-to-run yardstick: the same {r['count']} points measured by an earlier "
                 f"run (started {r['earlier_started']}) agree within 30% for "
                 f"**{r['within_30']}/{r['count']}**, median difference "
                 f"{r['median_abs_diff']:.0%}; the planner's error below is to be read "
                 "against this"]
    text = (out / "results.md").read_text()
    body = text[text.index("## Measurements"):]  # its title and machine line are above
    where = (f"`{_shown(out)}/*.png` (regenerated by the command; not committed)" if kept is None
             else f"`{_shown(out)}/*.png`; the records and plots of this run are kept in "
                  f"`{_shown(kept)}/`")
    if kept is not None:  # the plots as RESULTS.md (beside `kept`) reaches them
        rel = os.path.relpath(kept, HERE)
        body = re.sub(r"!\[([^]]*)\]\(([^/)]*\.png)\)", rf"![\1]({rel}/\2)", body)
    lines = ["# seqshard benchmark results (CPU)", "",
             f"Measured by `{results['command']}`, rendered by `{command}`; records: "
             f"`{_shown(out)}/records.msgpack`, table: `{_shown(out)}/results.md`, plots: "
             f"{where}.", "",
             f"- started {results['started']}; wall time of the suite: "
             f"{results.get('elapsed_s', float('nan')):.0f} s",
             f"- machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores, "
             f"{m.get('mem_total_bytes', 0) / 2**30:.0f} GiB, torch {m.get('torch')}, "
             f"python {m.get('python')}; one thread per rank",
             f"- 1-minute load average: {m.get('load_avg_1m', 0):.1f} at the start, "
             f"{m.get('load_avg_1m_end', float('nan')):.1f} at the end (other work on this "
             "2-core machine inflates and scatters the times)"]
    lines += repro + ([f"- {note}"] if note else []) + ["", METHOD, PLANNER_NOTES, body, ""]
    return "\n".join(lines + gpu_section())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="quick")
    p.add_argument("--out", default=None,
                   help="bench output folder (default benchmarks/out/SUITE, git-ignored)")
    p.add_argument("--from", dest="existing", default=None,
                   help="render RESULTS.md from an existing bench output folder")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--previous", default=None,
                   help="records.msgpack of an earlier run of the same suite (run-to-run check)")
    p.add_argument("--note", default=None,
                   help="one more line for the run's header (e.g. which commit was measured)")
    p.add_argument("--keep", default=None,
                   help="copy the records and plots into this folder (e.g. benchmarks/results) "
                        "and link RESULTS.md's plots there")
    args = p.parse_args(argv)
    command = "python benchmarks/run_suite.py " + " ".join(shlex.quote(a) for a in
                                                            (argv if argv is not None else sys.argv[1:]))
    earlier = read_results(args.previous) if args.previous else None
    if args.existing:
        out = Path(args.existing)
        write_report(read_results(out / "records.msgpack"), out, log=lambda line: None,
                     earlier=earlier)
    else:
        out = Path(args.out or HERE / "out" / args.suite)
        started = time.monotonic()
        previous = f" --previous {_shown(args.previous)}" if args.previous else ""
        run_bench(args.suite, out, earlier=earlier,
                  command=f"seqshard bench --suite {args.suite} --out {_shown(out)}{previous}")
        print(f"suite took {time.monotonic() - started:.0f} s")
    kept = None
    if args.keep:
        kept = Path(args.keep).resolve()
        kept.mkdir(parents=True, exist_ok=True)
        for f in [out / "records.msgpack", *sorted(out.glob("*.png"))]:
            if f.resolve() != (kept / f.name).resolve():
                shutil.copyfile(f, kept / f.name)
    results = Path(args.results)
    hand = hand_run_part(results)  # read before the rewrite: it is kept as it is
    results.write_text(render(out, command.strip(), args.previous, kept, args.note)
                       + ("\n" + hand if hand else ""))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
