"""seqshard.launch.perf: the performance subsystem. It measures (`seqshard bench`), models
(the cost-model planner) and predicts (`seqshard plan`); nothing here runs a training job.

- planner.py   the cost model: time, memory and traffic per strategy and mesh split
- plan_cmd.py  `seqshard plan`: the planner's ranking for a shape, a length and a world size
- model_plan.py     the whole-model plan: longest N, step time, the search over meshes
- model_memory.py   memory per rank of a whole model: ZeRO, activations, buffers
- model_validate.py real Trainer steps against the plan (`seqshard plan --validate`)
- step_model.py     the whole-model step time: rates, their fit, the calibrated profile file
- step_calibrate.py `seqshard plan --calibrate-here`: the step-time rates measured here
- bench_cmd.py `seqshard bench`: measure a suite, write records, results.md and plots
- results.py   the versioned msgpack schema of a bench run (machine, command, points); not
               launch/records.py, which keeps a training run's progress and summary
- measure.py   median timing, peak memory per rank, bytes sent per rank
- workloads.py what a point runs: sharded ops and their peers (SDPA, DeepSpeed Ulysses, ...)
- runner.py    P real gloo ranks in spawned processes, one group per world size
- suites.py    tiny / quick / full sweeps;   maxctx.py   the max-context finder
- report.py    results.md: tables, peer ratios, the planner's error; log-log PNG plots
- calibrate.py fit the planner's CPU profile to records; its error and ranking agreement

    from seqshard.launch.perf.bench_cmd import run_bench
    results = run_bench("tiny", "bench-out/tiny")      # records.msgpack, results.md, *.png
"""

from .results import SCHEMA, VERSION, read_results, validate_results, write_results

__all__ = ["SCHEMA", "VERSION", "read_results", "validate_results", "write_results"]


def register(command) -> None:
    """Add `bench` and `plan` to the `seqshard` CLI's registry (launch/cli.py's `command`)."""
    from .bench_cmd import cmd_bench
    from .plan_cmd import cmd_plan

    command("bench", "measure a benchmark suite: records, tables and plots")(cmd_bench)
    command("plan", "predict time and memory per strategy and mesh split; pick the best")(cmd_plan)
