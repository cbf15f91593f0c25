"""`seqshard plan --calibrate-here`: the model-level step time's rates, measured on this machine
in a few seconds (launch/perf/step_model.py says what each rate prices).

Rank processes (1 thread each, like the bench and validation ranks; two side by side by
default, as a 2-rank Trainer runs on a 2-core host: a rank's rates while its neighbour
computes too) each measure, as CPU seconds (process_time, the median of 5 repeats; the
slowest rank's):
  dense       F.linear forward + backward, [4096, 128] x [128, 256]: 6 T C F flops
  elementwise RMSNorm, SiLU, product and residual forward + backward over [4096, 128]; its
              bytes are counted as the plan counts a block's: 4 x what autograd saved
              (saved-tensor hooks), so the rate is per byte *of that count*
  op scales   one process's attention, delta rule (chunk) and FIT forward + backward at
              small sizes, each over planner.work_time of the same point under the op-level
              profile: how much slower (> 1) or faster this machine runs each kernel
  fixed, opt  two tiny Trainer steps (TransformerLM, 256 tokens a rank, widths 64 and 256):
              with the rates above fixed, what is left of each is fixed_s + params x
              opt_s_per_param (step_model.fit_rates on those two)
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from . import planner
from .planner import CPU_DEFAULT, Hardware
from .step_model import OPS, StepRates, fit_rates, step_features

REPEATS = 5
DENSE = (4096, 128, 256)                       # tokens, in, out
ELEM = (4096, 128)                             # tokens, width
# (family, impl, shape, n): one process, small enough for ~0.1 s each
OP_POINTS = (
    ("attention", "seqshard", {"batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 32,
                               "causal": True}, 2048),
    ("delta_rule", "chunk", {"batch": 1, "heads": 2, "dk": 32, "dv": 32, "chunk": 64}, 4096),
    ("fit", "fit", {"batch": 1, "dim": 64, "heads": 2, "group_size": 64, "latents": 4,
                    "depth": 2, "causal": True, "mlp_ratio": 2}, 4096),
)
TINY_N = 256
TINY_WIDTHS = (64, 256)


def _median_cpu(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up: lazy set-up, allocator
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return sorted(times)[len(times) // 2]


def _dense() -> tuple[float, float]:
    """(flops, CPU seconds) of one linear layer's forward + backward."""
    import torch

    t, c, f = DENSE
    x = torch.randn(t, c, requires_grad=True)
    w = torch.randn(f, c, requires_grad=True)

    def run():
        x.grad = w.grad = None
        torch.nn.functional.linear(x, w).sum().backward()

    return 6.0 * t * c * f, _median_cpu(run)


def _elementwise() -> tuple[float, float]:
    """(4 x bytes autograd saved, CPU seconds) of a block's elementwise chain."""
    import torch

    t, c = ELEM
    x = torch.randn(t, c, requires_grad=True)
    g = torch.ones(c, requires_grad=True)

    def forward():
        h = torch.nn.functional.rms_norm(x, (c,), g)
        return x + torch.nn.functional.silu(h) * h

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda s: saved.append(s.numel() * s.element_size()) or s, lambda s: s):
        forward()

    def run():
        x.grad = g.grad = None
        forward().sum().backward()

    return 4.0 * sum(saved), _median_cpu(run)


def _op_scale(family: str, impl: str, shape: dict, n: int, hw: Hardware) -> float:
    """Measured CPU seconds of one process's op over what the op-level profile prices."""
    import torch

    from .workloads import build

    spec = {"family": family, "impl": impl, "n": n, "world": 1, "ulysses": 1, "ring": 1,
            "shape": shape}
    # one process: the op takes no mesh; the workload asks only where to allocate
    work = build(spec, SimpleNamespace(device=torch.device("cpu")))
    inputs = work.make_inputs()
    measured = _median_cpu(lambda: work.run(inputs, True))
    return measured / planner.work_time(family, "chunk" if impl == "chunk" else impl, shape,
                                        n, 1, 1, hw)


def _tiny_job(width: int, world: int) -> tuple[dict, dict]:
    """A tiny TransformerLM step's (model, train): TINY_N tokens a rank, the ring on zigzag
    shards over `world` ranks (the validation's transformer points)."""
    from .model_validate import small_job

    extra = {"layout": "zigzag", "strategy": "ring"} if world > 1 else {}
    return small_job("transformer", TINY_N * world, dim=width, **extra)


def measure_here(rank: int = 0, world: int = 1, hw: Hardware = CPU_DEFAULT) -> dict:
    """Every measurement above, in this process (run it in a 1-thread rank; on `world`
    ranks at once, each measures while the others do, as a Trainer's ranks compute)."""
    from .model_validate import measure_steps

    flops, dense_s = _dense()
    elem_b, elem_s = _elementwise()
    scales = {fam: _op_scale(fam, impl, shape, n, hw) for fam, impl, shape, n in OP_POINTS}
    tiny = []
    for width in TINY_WIDTHS:
        model, train = _tiny_job(width, world)
        # one Trainer (its set-up costs seconds): the median of 3 steps after a first
        r = measure_steps(rank, world, "transformer", model, train, steps=2, timed=3)
        tiny.append({"dim": width, "cpu_s": r["cpu_s"]})
    return {"dense_flops": flops, "dense_s": dense_s, "elem_bytes": elem_b, "elem_s": elem_s,
            "op_scale": scales, "tiny": tiny, "world": world}


def busiest(per_rank: list[dict]) -> dict:
    """One record of `measure_here`'s per-rank ones: each time the slowest rank's."""
    out = dict(per_rank[0])
    for key in ("dense_s", "elem_s"):
        out[key] = max(r[key] for r in per_rank)
    out["op_scale"] = {k: max(r["op_scale"][k] for r in per_rank) for k in out["op_scale"]}
    out["tiny"] = [dict(t, cpu_s=max(r["tiny"][i]["cpu_s"] for r in per_rank))
                   for i, t in enumerate(out["tiny"])]
    return out


def rates_from(m: dict, hw: Hardware = CPU_DEFAULT) -> StepRates:
    """StepRates from `measure_here`'s measurements (fixed and optimizer costs fitted to the
    tiny steps with everything else held at the measured rates)."""
    from . import model_plan as mp
    from .model_validate import choice_of

    rates = StepRates(m["dense_flops"] / m["dense_s"], m["elem_bytes"] / m["elem_s"],
                      {o: m["op_scale"].get(o, 1.0) for o in OPS}, 0.0, 0.0,
                      "measured here")
    samples, world = [], m.get("world", 1)
    for t in m["tiny"]:
        model, train = _tiny_job(t["dim"], world)
        spec = mp.spec_of("transformer", model, train)
        ch = choice_of(spec, world)
        f = step_features(spec, TINY_N * world, ch, world, hw)
        samples.append((dict(f, sp=ch.sp), t["cpu_s"]))
    keep = ("dense_flops", "elem_bytes", *(f"op_s.{o}" for o in OPS))
    fitted = fit_rates(samples, rates, keep=keep)
    return StepRates(rates.dense_flops_s, rates.elem_bytes_s, rates.op_scale, fitted.fixed_s,
                     fitted.opt_s_per_param,
                     "measured here: micro-benchmarks and two tiny Trainer steps")


def calibrate_here(hw: Hardware = CPU_DEFAULT, world: int = 2,
                   timeout_s: float = 300.0) -> tuple[StepRates, dict]:
    """(rates, raw measurements), measured in `world` fresh 1-thread rank processes running
    side by side (default 2: a 2-rank Trainer's condition on a 2-core host; each rate is
    the slowest rank's median)."""
    from seqshard.dist import RankPool

    from .runner import THREADS_PER_RANK, _bench_setup

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pool = RankPool(world, threads=THREADS_PER_RANK, timeout_s=timeout_s,
                    start_timeout_s=180.0, setup=_bench_setup)
    try:
        m = busiest(pool.run(measure_here, (hw,), timeout_s=timeout_s, fail_fast=True))
    finally:
        pool.close()
    return rates_from(m, hw), m
