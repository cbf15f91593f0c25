"""`seqshard plan`: rank strategies and mesh splits for a shape, a length and a world size.

    seqshard plan --family attention --heads 32 --kv-heads 8 --head-dim 128 --n 1M --world 64
    seqshard plan --scaling                      # 1M..10M tokens on 8..1024 H100s
    seqshard plan --hardware bench-out/quick/records.msgpack --n 4096 --world 4 \
                  --heads 8 --head-dim 64         # the CPU profile calibrated from a bench run

The whole model of a job file (launch/perf/model_plan.py): the longest N that fits, with the
mesh, strategy, checkpointing and pieces that get there, its step time and memory per rank;
or the best way to run a given N; or the plan checked against real Trainer steps here:

    seqshard plan --model launch/configs/long_1m_cpu.toml --hardware h100 --world 64 --max-context
    seqshard plan --model launch/configs/demo.toml --hardware cpu --world 2 --seq-len 64K
    seqshard plan --validate                     # small Trainer runs here against the plan
    seqshard plan --calibrate-here cpu-here.json # step-time rates measured here (seconds)
    seqshard plan --model launch/configs/demo.toml --hardware cpu-here.json --world 2

Also runs as `python -m seqshard.launch.perf plan ...`.
"""

from __future__ import annotations

import argparse

from .model_plan import fmt_bytes, fmt_time
from .planner import HARDWARE, Hardware, load_hardware, plan

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


def plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="attention", help="attention | delta_rule | fit")
    p.add_argument("--n", default="1M", help="global sequence length, e.g. 131072, 512K, 1M")
    p.add_argument("--world", type=int, default=64, help="ranks (GPUs) in the sequence group")
    p.add_argument("--hardware", default="h100",
                   help=f"{' | '.join(sorted(HARDWARE))} (datasheet rates: step times "
                        "predicted, not measured) | FILE.toml (Hardware's fields) | bench "
                        "records.msgpack (op rates fitted to a `seqshard bench` run) | "
                        "PROFILE.json (written by --calibrate-here or --calibrate-from: op "
                        "rates plus the model-level step rates measured on that machine)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads (attention, delta rule)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-causal", action="store_true", help="bidirectional attention / FIT")
    p.add_argument("--chunk", type=int, default=64, help="delta rule chunk length")
    p.add_argument("--dim", type=int, default=1024, help="FIT model width")
    p.add_argument("--group-size", type=int, default=256, help="FIT tokens per group")
    p.add_argument("--latents", type=int, default=16, help="FIT latents per group")
    p.add_argument("--depth", type=int, default=2, help="FIT blocks")
    p.add_argument("--scaling", action="store_true",
                   help="best plan for 1M..10M tokens on 8..1024 ranks")
    p.add_argument("--model", default=None, metavar="CONFIG.toml",
                   help="plan the whole model of this job file (its [model] and [train])")
    p.add_argument("--max-context", action="store_true",
                   help="with --model: the largest N that fits per rank, and how")
    p.add_argument("--seq-len", default=None,
                   help="with --model: plan at this N (default: the job's train.seq_len)")
    p.add_argument("--validate", action="store_true",
                   help="run small real Trainer steps here (10 points, the median of 3 "
                        "steps each: ~2-4 min on 2 cores) and print per point measured vs "
                        "planned memory and CPU s/rank, with the --hardware profile's "
                        "datasheet rates (default cpu) and calibrated ones (the PROFILE.json "
                        "given, else measured first as by --calibrate-here: ~1 min more)")
    p.add_argument("--calibrate-here", default=None, metavar="PROFILE.json",
                   help="measure the step-time rates on this machine (a few seconds: a "
                        "matmul, an elementwise chain, one process's attention / delta rule "
                        "/ FIT, two tiny Trainer steps; launch/perf/step_calibrate.py), write "
                        "them with the --hardware profile (default cpu) to PROFILE.json and "
                        "plan with them")
    p.add_argument("--calibrate-from", default=None, metavar="RECORDS.json",
                   help="fit every step-time rate (dense FLOP/s, elementwise bytes/s, per-op "
                        "scales, fixed s per step, optimizer s per parameter) to the Trainer "
                        "steps --validate --records wrote; with --calibrate-here's PROFILE.json "
                        "as the output (else printed only)")
    p.add_argument("--records", default=None, metavar="RECORDS.json",
                   help="with --validate: also write the measured steps here (input of "
                        "--calibrate-from)")


def shape_from_args(args) -> dict:
    causal = not args.no_causal
    if args.family == "attention":
        return {"batch": args.batch, "heads": args.heads,
                "kv_heads": args.kv_heads or args.heads, "head_dim": args.head_dim,
                "causal": causal}
    if args.family == "delta_rule":
        return {"batch": args.batch, "heads": args.heads, "dk": args.head_dim,
                "dv": args.head_dim, "chunk": args.chunk}
    if args.family == "fit":
        return {"batch": args.batch, "dim": args.dim, "heads": args.heads,
                "group_size": args.group_size, "latents": args.latents, "depth": args.depth,
                "causal": causal}
    raise ValueError(f"family={args.family!r}: expected attention, delta_rule or fit")


def hardware_from(text: str) -> Hardware:
    if text.endswith(".msgpack"):
        from .calibrate import calibrate
        from .results import read_results

        return calibrate(read_results(text))
    return load_hardware(text)


def plan_table(family: str, shape: dict, n: int, world: int, hw: Hardware) -> str:
    rows = ["| strategy | mesh u x r | fwd+bwd / layer | compute | comm | memory / rank | "
            "sent / rank | fits |", "|---|---|---|---|---|---|---|---|"]
    for p in plan(family, shape, n, world, hw):
        rows.append(f"| {p.impl} | {p.ulysses}x{p.ring} | {fmt_time(p.time_s)} | "
                    f"{fmt_time(p.compute_s)} | {fmt_time(p.comm_s)} | "
                    f"{fmt_bytes(p.mem_bytes)} | {fmt_bytes(p.sent_bytes)} | "
                    f"{'yes' if p.fits else 'NO'} |")
    return "\n".join(rows) + "\n"


def scaling_table(family: str, shape: dict, hw: Hardware, ns=SCALING_N, worlds=SCALING_P) -> str:
    """The planner's pick for every (N, P): what a user would run, and what it costs."""
    rows = ["| N | P | best | mesh u x r | fwd+bwd / layer | memory / rank | runner-up |",
            "|---|---|---|---|---|---|---|"]
    for n in ns:
        for world in worlds:
            try:
                ranked = plan(family, shape, n, world, hw)
            except ValueError as err:
                rows.append(f"| {n >> 20}M | {world} | - | - | - | - | {err} |")
                continue
            best = ranked[0]
            second = (f"{ranked[1].impl} {ranked[1].ulysses}x{ranked[1].ring} "
                      f"({fmt_time(ranked[1].time_s)})") if len(ranked) > 1 else "-"
            note = "" if best.fits else " (does not fit)"
            rows.append(f"| {n >> 20}M | {world} | {best.impl}{note} | "
                        f"{best.ulysses}x{best.ring} | {fmt_time(best.time_s)} | "
                        f"{fmt_bytes(best.mem_bytes)} | {second} |")
    return "\n".join(rows) + "\n"


def model_report(path: str, hw: Hardware, world: int, max_context: bool,
                 seq_len: str | None, rates=None) -> str:
    """`seqshard plan --model`: the model-level plan, then the per-layer tables at its N."""
    from seqshard.launch.config import load

    from . import model_plan as mp

    spec = mp.spec_from_job(load(path))
    from .step_model import StepRates

    out = [f"hardware (op-level rates): {hw.name} ({hw.note})",
           rates_line(rates or StepRates.from_hardware(hw)),
           f"model: {spec.kind}, {spec.params:,} parameters, {spec.config.num_layers} blocks, "
           f"ZeRO stage {spec.train.zero_stage}, {spec.train.dtype}, batch "
           f"{spec.train.batch_size} per replica; {world} ranks", ""]
    if max_context:
        best = mp.max_context(spec, world, hw, rates=rates)
        if best is None:
            return "\n".join(out + ["nothing fits: even the smallest N overflows a rank's "
                                    f"{mp.fmt_bytes(mp.budget(hw, world))}\n"])
        out.append("largest N that fits:")
    else:
        n = parse_tokens(seq_len) if seq_len else spec.train.seq_len
        ranked = mp.plan_at(spec, n, world, hw, rates)
        best = ranked[0]
        out.append("best way to run it:" if best.fits else "nothing fits; the fastest:")
    out.append(mp.describe(best))
    for mixer in sorted(set(spec.mixers)):  # today's per-layer tables, at the plan's N
        family, shape = mp.mixer_family(spec, mixer, hw)
        out.append(f"one {mixer} layer on the sp group of {best.choice.sp} ranks at "
                   f"N = {best.n:,} (windows: as global attention):")
        try:
            out.append(plan_table(family, shape, best.n, best.choice.sp, hw))
        except ValueError as err:
            out.append(f"({err})\n")
    return "\n".join(out)


def profile_from(text: str):
    """(Hardware, StepRates or None) of --hardware: a calibrated PROFILE.json carries both;
    the others are op-level profiles whose step rates are their datasheet's (None)."""
    if text.endswith(".json"):
        from .step_model import load_profile

        return load_profile(text)
    return hardware_from(text), None


def rates_line(rates) -> str:
    """One line naming the step-time rates and where they came from."""
    return (f"step-time rates ({rates.source}): dense {rates.dense_flops_s / 1e9:.2f} GFLOP/s, "
            f"elementwise {rates.elem_bytes_s / 1e9:.2f} GB/s, op scales "
            + ", ".join(f"{k} {v:.2f}" for k, v in rates.op_scale.items())
            + f", fixed {fmt_time(rates.fixed_s)} per step, optimizer "
            f"{rates.opt_s_per_param * 1e9:.1f} ns per parameter")


def _calibrated(args, hw: Hardware, rates):
    """The rates --calibrate-here / --calibrate-from ask for (written to PROFILE.json), else
    `rates` unchanged."""
    from .step_model import StepRates, fit_rates, save_profile

    if args.calibrate_from:
        import json

        from .model_validate import samples_of

        with open(args.calibrate_from) as f:
            measured = [(tuple(p), r) for p, r in json.load(f)]
        rates = fit_rates(samples_of(measured, hw), rates or StepRates.from_hardware(hw))
        info = {"from": args.calibrate_from, "points": len(measured)}
    elif args.calibrate_here:
        from .step_calibrate import calibrate_here

        rates, info = calibrate_here(hw)
    else:
        return rates
    print(rates_line(rates))
    if args.calibrate_here:
        save_profile(args.calibrate_here, hw, rates, info)
        print(f"profile written to {args.calibrate_here} (use it: --hardware "
              f"{args.calibrate_here})")
    return rates


def cmd_plan(args) -> int:
    here = args.validate or args.calibrate_here or args.calibrate_from
    if here and args.hardware == "h100":  # the default: measuring here means this CPU
        args.hardware = "cpu"
    if args.validate:
        import json

        from .model_validate import default_points, run_points, validate_report

        hw, rates = profile_from(args.hardware)
        if not (args.calibrate_here or args.calibrate_from or rates):
            from .step_calibrate import calibrate_here

            rates, _ = calibrate_here(hw)
        rates = _calibrated(args, hw, rates)
        measured = run_points(default_points())
        if args.records:
            with open(args.records, "w") as f:
                json.dump([[list(p), r] for p, r in measured], f)
        print(validate_report(hw, rates=rates, measured=measured))
        return 0
    hw, rates = profile_from(args.hardware)
    rates = _calibrated(args, hw, rates)
    if args.model:
        print(model_report(args.model, hw, args.world, args.max_context, args.seq_len, rates))
        return 0
    if args.calibrate_here or args.calibrate_from:
        return 0
    shape = shape_from_args(args)
    print(f"hardware: {hw.name} ({hw.note})")
    print(f"{args.family} {shape}")
    if args.scaling:
        print(scaling_table(args.family, shape, hw))
        return 0
    n = parse_tokens(args.n)
    print(f"N = {n} tokens on {args.world} ranks, one layer, forward + backward:\n")
    print(plan_table(args.family, shape, n, args.world, hw))
    return 0


cmd_plan.add_arguments = plan_arguments
