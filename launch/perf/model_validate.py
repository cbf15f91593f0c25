"""Real Trainer steps on this CPU against the model-level plan (`seqshard plan --validate`).

Each point trains a small model of one kind for a few steps on P gloo ranks (a fresh
`seqshard.dist.RankPool` per world size, 1 thread per rank, glibc's mmap threshold pinned so
the resident set follows the live tensors) and records, per rank, what the plan predicts:
  mem_bytes  the peak resident set during a timed step above the resident set just before
             the Trainer was built (imports done, DeepSpeed imported): the model's own
             memory, without the interpreter and libraries (the profile's `process_bytes`);
  step_s     the median wall seconds of the timed steps (the first step, untimed, pays
             one-off set-up);
  cpu_s      the rank's median CPU seconds of those steps.
Memory is deterministic enough to assert on (tests/test_model_plan.py); time moves with the
load of the machine, so time is compared here and written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import gc
import os
import time

from seqshard.dist import RankPool
from seqshard.dist.memory import reset_peak, peak_bytes, rss_bytes

from .runner import THREADS_PER_RANK, _bench_setup
from .step_model import StepRates, cpu_seconds, step_features

# (kind, model overrides, train overrides) at sizes that run in seconds on 2 cores
SMALL = {"dim": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 256, "mlp_ratio": 2}
KIND_EXTRA = {"transformer": {}, "deltanet": {"chunk_size": 64},
              "fit": {"group_size": 64, "num_latents": 4}}


def small_job(kind: str, n: int, **extra) -> tuple[dict, dict]:
    """(model dict, train dict) of a small validation point: 2 layers x 64, vocab 256."""
    trained = ("activation_checkpointing", "layout", "strategy", "zero_stage")
    model = {**SMALL, **KIND_EXTRA[kind], **{k: v for k, v in extra.items() if k not in trained}}
    train = {"seq_len": n, "steps": 4, "task": "random", "vocab_size": 256, "warmup_steps": 1,
             **{k: v for k, v in extra.items() if k in trained}}
    return model, train


def measure_steps(rank: int, world: int, kind: str, model: dict, train: dict,
                  steps: int = 2, timed: int = 1) -> dict:
    """Per-rank {mem_bytes, step_s, cpu_s} of Trainer steps (see above): `steps` - 1 untimed
    steps, then `timed` more, each measured: the largest peak, the median wall and CPU
    seconds (one step's CPU time moves by a third on a loaded host; the median of three is
    steadier). Runs inside a rank process (RankPool / tests/harness.py run_ranks)."""
    import deepspeed  # noqa: F401  (imported before the base is read: library, not model)
    import torch

    from seqshard.dist import Mesh
    from seqshard.models import Trainer

    mesh = Mesh.from_env(ulysses=1) if world > 1 else None
    gc.collect()
    base = rss_bytes()
    trainer = Trainer(kind, model, train, mesh)
    for _ in range(steps - 1):
        trainer.step()
    runs = []
    for _ in range(timed):
        gc.collect()
        reset_peak(torch.device("cpu"))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        metrics = trainer.step()
        runs.append({"mem_bytes": peak_bytes(torch.device("cpu")) - base,
                     "step_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
                     "loss": metrics["loss"]})
    mid = len(runs) // 2
    out = {"mem_bytes": max(r["mem_bytes"] for r in runs),
           "step_s": sorted(r["step_s"] for r in runs)[mid],
           "cpu_s": sorted(r["cpu_s"] for r in runs)[mid], "loss": runs[-1]["loss"]}
    del trainer
    gc.collect()
    return out


TIMED_STEPS = 3  # the validation's measured steps per point (their median)


def run_points(points: list[tuple[int, str, dict, dict]], timeout_s: float = 900.0) -> list:
    """[(world, kind, model, train)] -> per point the per-rank results, one pool per world."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = []
    for world in sorted({p[0] for p in points}):
        pool = RankPool(world, threads=THREADS_PER_RANK, timeout_s=timeout_s,
                        start_timeout_s=180.0, setup=_bench_setup)
        try:
            # a throw-away point first: the runtime's one-off allocations (DeepSpeed's and
            # torch's lazy set-up) belong to the process, not to the first measured model
            pool.run(measure_steps, ("transformer", *small_job("transformer", 256)),
                     timeout_s=timeout_s, fail_fast=True)
            for w, kind, model, train in points:
                if w == world:
                    out.append(((w, kind, model, train),
                                pool.run(measure_steps, (kind, model, train, 2,
                                                         TIMED_STEPS),
                                         timeout_s=timeout_s, fail_fast=True)))
        finally:
            pool.close()
    return out


def default_points() -> list[tuple[int, str, dict, dict]]:
    """Each model kind with and without checkpointing on 1 and 2 ranks, DeltaNet's mixer also
    in pieces: seconds each on 2 cores."""
    pts = []
    for ckpt in (False, True):
        pts.append((1, "transformer", *small_job("transformer", 4096,
                                                  activation_checkpointing=ckpt)))
        pts.append((2, "transformer", *small_job("transformer", 8192, layout="zigzag",
                                                  strategy="ring",
                                                  activation_checkpointing=ckpt)))
        for pieces in (0, 4096):
            pts.append((2, "deltanet", *small_job("deltanet", 32768, mixer_piece_tokens=pieces,
                                                   activation_checkpointing=ckpt)))
        pts.append((2, "fit", *small_job("fit", 32768, activation_checkpointing=ckpt)))
    return pts


def choice_of(spec, world: int):
    """The model_plan.Choice a Trainer of `spec` runs on `world` ranks (dp 1, ring = world)."""
    from .model_plan import Choice

    c = spec.config
    if spec.kind == "transformer":
        strategy = c.strategy if c.strategy != "auto" else "ring"
    else:
        strategy = c.schedule if spec.kind == "deltanet" else "fit"
    return Choice(1, 1, world, strategy, c.activation_checkpointing, c.tokenwise_piece_tokens,
                  getattr(c, "mixer_piece_tokens", 0), c.layout)


def predicted(world: int, kind: str, model: dict, train: dict, hw,
              rates=None) -> tuple[float, float]:
    """(memory bytes per rank, CPU seconds per rank) the plan gives a measured point."""
    from . import model_plan as mp

    spec = mp.spec_of(kind, model, train)
    ch = choice_of(spec, world)
    split, _ = mp.memory(spec, train["seq_len"], ch, world, hw)
    return split["total"], planned_cpu(world, kind, model, train, hw, rates)


def point_features(world: int, kind: str, model: dict, train: dict, hw) -> dict:
    """step_model.step_features of a measured point (with 'sp', for fit_rates)."""
    from . import model_plan as mp

    spec = mp.spec_of(kind, model, train)
    ch = choice_of(spec, world)
    return dict(step_features(spec, train["seq_len"], ch, world, hw), sp=ch.sp)


def planned_cpu(world: int, kind: str, model: dict, train: dict, hw, rates=None) -> float:
    """The CPU seconds per rank the plan gives a point: the step less the waiting on the
    other ranks' serial chains (what process_time measures)."""
    f = point_features(world, kind, model, train, hw)
    return cpu_seconds(f, rates or StepRates.from_hardware(hw), f["sp"])


def samples_of(measured: list, hw) -> list[tuple[dict, float]]:
    """step_model.fit_rates' samples from `run_points`' results: the busier rank's CPU s."""
    return [(point_features(*point, hw), max(r["cpu_s"] for r in ranks))
            for point, ranks in measured]


def validate_report(hw, points=None, rates=None, measured=None) -> str:
    """Measure `points` (default_points()) and tabulate them against the plan, uncalibrated
    (`hw`'s datasheet rates) and with `rates` (a calibrated StepRates) where given. Time is
    compared with the busier rank's CPU seconds: on a shared host the wall moves with load.
    measured: `run_points`' results, to tabulate without measuring again."""
    measured = measured if measured is not None else run_points(points or default_points())
    rows = ["| model | P | N | checkpointing | mixer pieces | MiB measured | MiB planned | "
            "ratio | step s (wall) | CPU s/rank | planned CPU s (uncalibrated) | ratio | "
            "planned CPU s (calibrated) | ratio |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (world, kind, model, train), ranks in measured:
        mem = max(r["mem_bytes"] for r in ranks)
        wall = max(r["step_s"] for r in ranks)
        cpu = max(r["cpu_s"] for r in ranks)
        pm, pt = predicted(world, kind, model, train, hw)
        cal = (f"{planned_cpu(world, kind, model, train, hw, rates):.2f} | "
               f"{planned_cpu(world, kind, model, train, hw, rates) / cpu:.2f}"
               if rates else "- | -")
        rows.append(f"| {kind} | {world} | {train['seq_len']} | "
                    f"{'on' if train.get('activation_checkpointing') else 'off'} | "
                    f"{model.get('mixer_piece_tokens', '-')} | {mem / 2**20:.1f} | "
                    f"{pm / 2**20:.1f} | {pm / mem:.2f} | {wall:.2f} | {cpu:.2f} | {pt:.2f} | "
                    f"{pt / cpu:.2f} | {cal} |")
    return "\n".join(rows) + "\n"
