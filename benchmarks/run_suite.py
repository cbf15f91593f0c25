"""Run a `seqshard bench` suite and write benchmarks/RESULTS.md from it.

    python benchmarks/run_suite.py --suite quick            # bench-out/quick + RESULTS.md
    python benchmarks/run_suite.py --from bench-out/quick   # only re-render RESULTS.md

RESULTS.md = how it was run (exact command, machine, load before and after, wall time), the
suite's results.md (measurements, exponents, peer ratios, planner error and ranking, max
context), and the planner's predictions on 8 x H100 nodes for 1M-10M tokens.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from seqshard.launch.bench.commands import run_bench
from seqshard.launch.bench.plan_cmd import scaling_table
from seqshard.launch.bench.records import read_results
from seqshard.launch.planner import H100_NODE

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


def gpu_section() -> list[str]:
    lines = ["## Planner predictions: 8 x H100 (NVLink) nodes joined by InfiniBand", "",
             f"Profile `h100`: {H100_NODE.note}. One layer, forward + backward, batch 1; "
             "'best' is the fastest plan that fits in 80 GB. Reproduce with "
             "`seqshard plan --scaling --family FAMILY ...`.", ""]
    for family, title, shape in GPU_SHAPES:
        lines += [f"### {title}", "", scaling_table(family, shape, H100_NODE)]
    lines += ["## GPU measurements", "",
              "No GPU was lent to the session that produced this file, so the H100 profile "
              "above is uncalibrated (datasheet rates x assumed efficiencies). On a GPU "
              "machine, `seqshard bench --suite quick` records the same points with NCCL and "
              "`seqshard plan --hardware bench-out/quick/records.msgpack` uses them.", ""]
    return lines


def render(out: Path, command: str, load_before: float, load_after: float) -> str:
    results = read_results(out / "records.msgpack")
    body = (out / "results.md").read_text().split("\n", 2)[2]  # drop its title line
    lines = ["# seqshard benchmark results (CPU)", "",
             f"Produced by `{command}`, which runs `{results['command']}`; records: "
             f"`{out / 'records.msgpack'}`, plots: `{out}/*.png`.", "",
             f"- wall time of the suite: {results.get('elapsed_s', float('nan')):.0f} s",
             f"- 1-minute load average: {load_before:.1f} before, {load_after:.1f} after "
             f"(a 2-core machine; other work on it inflates and scatters times)", "",
             body, ""]
    return "\n".join(lines + gpu_section())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="quick")
    p.add_argument("--out", default=None, help="bench output folder (default bench-out/SUITE)")
    p.add_argument("--from", dest="existing", default=None,
                   help="render RESULTS.md from an existing bench output folder")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    command = "python benchmarks/run_suite.py " + " ".join(shlex.quote(a) for a in
                                                            (argv if argv is not None else sys.argv[1:]))
    load_before = os.getloadavg()[0]
    if args.existing:
        out = Path(args.existing)
    else:
        out = Path(args.out or f"bench-out/{args.suite}")
        started = time.monotonic()
        run_bench(args.suite, out, command=f"seqshard bench --suite {args.suite} --out {out}")
        print(f"suite took {time.monotonic() - started:.0f} s")
    Path(args.results).write_text(render(out, command.strip(), load_before, os.getloadavg()[0]))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
