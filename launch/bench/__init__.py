"""seqshard.launch.bench: context-length scaling experiments (`seqshard bench`) and the
cost-model planner's command (`seqshard plan`; the model itself is seqshard.launch.planner).

- records.py   the versioned msgpack schema (one file per run: machine, command, points)
- measure.py   median timing, peak memory per rank (VmHWM), bytes sent per rank
- workloads.py what a point runs: sharded ops and their peers (SDPA, DeepSpeed Ulysses, ...)
- runner.py    P real gloo ranks in spawned processes, one group per world size
- suites.py    tiny / quick / full sweeps;   maxctx.py   the max-context finder
- report.py    markdown tables, peer ratios, log-log PNG plots with fitted exponents
- calibrate.py fit the planner's CPU profile to records; its error and ranking agreement

    from seqshard.launch.bench.commands import run_bench
    results = run_bench("tiny", "bench-out/tiny")      # records.msgpack, results.md, *.png
"""

from .records import SCHEMA, VERSION, read_results, validate_results, write_results

__all__ = ["SCHEMA", "VERSION", "read_results", "validate_results", "write_results"]


def register(command) -> None:
    """Add `bench` and `plan` to the `seqshard` CLI's registry (launch/cli.py's `command`)."""
    from .commands import cmd_bench
    from .plan_cmd import cmd_plan

    command("bench", "measure a benchmark suite: records, tables and plots")(cmd_bench)
    command("plan", "predict time and memory per strategy and mesh split; pick the best")(cmd_plan)
