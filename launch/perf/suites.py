"""Named sweeps: which points a suite measures, with how many repeats.

- tiny:  seconds; what the tests run (every family, P in {1, 2}, two lengths).
- quick: under 10 minutes on a 2-core CPU; every strategy and peer at P in {1, 2, 4}, four
  or five lengths per family, plus a max-context search.
- full:  longer sweeps for a real machine (more lengths, P up to 8), whole language models
  (one training step: loss + backward) and the largest context each model trains at.

Awkward sizes on purpose: head dim 48 in the tiny suite, group sizes that are not powers of two.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Suite:
    name: str
    specs: list[dict]
    warmup: int = 1
    repeats: int = 3
    max_repeats: int = 3       # short points: repeated up to this many times ...
    min_total_s: float = 0.0   # ... until this many seconds were timed
    maxctx: list[dict] = field(default_factory=list)  # max-context searches (see maxctx.py)


def spec(family: str, impl: str, n: int, world: int, shape: dict, ulysses: int = 1) -> dict:
    return {"family": family, "impl": impl, "n": n, "world": world, "ulysses": ulysses,
            "ring": world // ulysses, "shape": dict(shape)}


def attention_specs(shape: dict, ns, worlds) -> list[dict]:
    out = []
    for n in ns:
        for world in worlds:
            if world == 1:
                out += [spec("attention", "sdpa", n, 1, shape),
                        spec("attention", "seqshard", n, 1, shape)]
                continue
            # the layout each strategy runs (recorded with the point): zigzag balances causal
            # work around a ring; after Ulysses' all-to-all each rank has the whole sequence
            ring = dict(shape, layout="zigzag" if shape["causal"] else "contiguous")
            flat = dict(shape, layout="contiguous")
            out += [spec("attention", "ring", n, world, ring),
                    spec("attention", "ulysses", n, world, flat, ulysses=world),
                    spec("attention", "allgather", n, world, ring),
                    spec("attention", "ds_ulysses", n, world, flat, ulysses=world)]
            for u in range(2, world):
                if world % u == 0:
                    out.append(spec("attention", "hybrid", n, world, ring, ulysses=u))
    return out


def delta_specs(shape: dict, ns, worlds, naive_ns) -> list[dict]:
    # the token loop is slow: it runs at its own (short) lengths, each beside the chunk form
    out = [spec("delta_rule", impl, n, 1, shape) for n in naive_ns if n not in ns
           for impl in ("naive", "chunk")]
    out += [spec("delta_rule", "naive", n, 1, shape) for n in naive_ns if n in ns]
    for n in ns:
        for world in worlds:
            if world == 1:
                out.append(spec("delta_rule", "chunk", n, 1, shape))
            else:
                out += [spec("delta_rule", "scan", n, world, shape),
                        spec("delta_rule", "pass", n, world, shape)]
    return out


def fit_specs(shape: dict, ns, worlds, naive_ns) -> list[dict]:
    out = [spec("fit", "naive", n, 1, shape) for n in naive_ns]
    return out + [spec("fit", "fit", n, w, shape) for n in ns for w in worlds]


ATTN_TINY = {"batch": 1, "heads": 4, "kv_heads": 4, "head_dim": 48, "causal": True}
DELTA_TINY = {"batch": 1, "heads": 2, "dk": 32, "dv": 48, "chunk": 32}
FIT_TINY = {"batch": 1, "dim": 48, "heads": 2, "group_size": 24, "latents": 3, "depth": 1,
            "causal": True}

ATTN = {"batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64, "causal": True}
DELTA = {"batch": 1, "heads": 4, "dk": 64, "dv": 64, "chunk": 64}
FIT = {"batch": 1, "dim": 128, "heads": 4, "group_size": 64, "latents": 4, "depth": 2,
       "causal": True}


def tiny() -> Suite:
    ns = (192, 384)
    return Suite("tiny", attention_specs(ATTN_TINY, ns, (1, 2))
                 + delta_specs(DELTA_TINY, ns, (1, 2), naive_ns=(96,))
                 + fit_specs(FIT_TINY, ns, (1, 2), naive_ns=(192,)), warmup=1, repeats=2)


def quick() -> Suite:
    return Suite(
        "quick",
        attention_specs(ATTN, (512, 1024, 2048, 4096), (1, 2, 4))
        + delta_specs(DELTA, (1024, 2048, 4096, 8192), (1, 2, 4), naive_ns=(256,))
        + fit_specs(FIT, (1024, 2048, 4096, 8192), (1, 2, 4), naive_ns=(1024, 2048)),
        # 4 repeats at least: the fastest repeat is what the planner is scored against, and
        # on a shared host a 4th draw makes an undisturbed one much likelier (see RESULTS.md)
        warmup=1, repeats=4, max_repeats=7, min_total_s=1.0,
        # the same budget, one process vs two: how much further does sharding reach?
        maxctx=[{"family": "attention", "impl": "sdpa", "world": 1, "ulysses": 1,
                 "shape": ATTN, "start": 2048, "mem_budget_mib": 64, "time_budget_s": 4.0},
                {"family": "attention", "impl": "ring", "world": 2, "ulysses": 1,
                 "shape": ATTN, "start": 2048, "mem_budget_mib": 64, "time_budget_s": 4.0}])


LM = {"batch": 1, "vocab_size": 256, "dim": 256, "num_layers": 2, "num_heads": 8}
FIT_LM = dict(LM, group_size=64, num_latents=4)


def model_specs(ns, worlds) -> list[dict]:
    return [spec("model", kind, n, w, FIT_LM if kind == "fit" else LM)
            for kind in ("transformer", "deltanet", "fit") for n in ns for w in worlds]


def full() -> Suite:
    lm_search = [{"family": "model", "impl": kind, "world": 4, "ulysses": 1,
                  "shape": FIT_LM if kind == "fit" else LM, "start": 4096,
                  "mem_budget_mib": 1024, "time_budget_s": 30.0}
                 for kind in ("transformer", "deltanet", "fit")]
    return Suite(
        "full",
        attention_specs(ATTN, (1024, 2048, 4096, 8192, 16384), (1, 2, 4, 8))
        + delta_specs(DELTA, (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8), naive_ns=(512, 1024))
        + fit_specs(FIT, (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8), naive_ns=(2048, 4096))
        + model_specs((4096, 16384), (1, 4)),
        warmup=2, repeats=5, max_repeats=9, min_total_s=2.0, maxctx=quick().maxctx + lm_search)


SUITES = {"tiny": tiny, "quick": quick, "full": full}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"suite={name!r}: expected one of {sorted(SUITES)}")
    return SUITES[name]()
