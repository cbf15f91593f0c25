"""The model-level plan (`seqshard plan --model`): its memory split against real Trainer steps
on 2 gloo ranks (within 30%), the search for the longest N, the DeltaNet pieces schedule's
time, and the command line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from seqshard.launch.perf import model_plan as mp
from seqshard.launch.perf import planner
from seqshard.launch.perf.model_validate import (
    choice_of, measure_steps, predicted, small_job)
from seqshard.launch.perf.plan_cmd import model_report
from seqshard.launch.perf.planner import CPU_DEFAULT, H100_NODE

from .harness import run_ranks

# (kind, N, overrides): every mixer's memory path at a size that runs in seconds
POINTS = [
    ("transformer", 8192, {"layout": "zigzag", "strategy": "ring"}),
    ("transformer", 8192, {"layout": "zigzag", "strategy": "ring",
                           "activation_checkpointing": True}),
    ("deltanet", 16384, {}),
    ("deltanet", 16384, {"mixer_piece_tokens": 2048, "activation_checkpointing": True}),
    ("fit", 16384, {}),
    ("fit", 16384, {"activation_checkpointing": True}),
]


def _measure_all(rank, world, points):
    """Every point's last Trainer step on these ranks, malloc pinned so the resident set
    follows the live tensors (an isolated pool: the setting stays in these processes)."""
    from seqshard.launch.perf.runner import _pin_malloc

    _pin_malloc()
    measure_steps(rank, world, "transformer", *small_job("transformer", 256))  # warm-up
    return [measure_steps(rank, world, kind, *small_job(kind, n, **extra))
            for kind, n, extra in points]


def test_memory_within_30_percent_of_real_trainer_steps():
    per_rank = run_ranks(_measure_all, 2, POINTS, isolated=True, timeout=900)
    errors = []
    for i, (kind, n, extra) in enumerate(POINTS):
        measured = max(r[i]["mem_bytes"] for r in per_rank)
        planned, _ = predicted(2, kind, *small_job(kind, n, **extra), CPU_DEFAULT)
        ratio = planned / measured
        errors.append(f"{kind} N={n} {extra}: planned {planned / 2**20:.1f} MiB, measured "
                      f"{measured / 2**20:.1f} MiB ({ratio:.2f}x)")
        assert 0.7 <= ratio <= 1.3, "\n".join(errors)
    print("\n".join(errors))  # the ratios, for -s


def _spec(kind="transformer", **train):
    model = {"dim": 256, "num_layers": 4, "num_heads": 4, "vocab_size": 1024}
    return mp.spec_of(kind, model, {"seq_len": 4096, **train})


def test_parameters_counted_exactly_and_zero_partitions_them():
    spec = _spec()
    # embedding + head 2 x 1024 x 256; per block q, k, v, o 4 x 256^2, SwiGLU 3 x 256 x 688,
    # two norms; the final norm
    assert spec.params == 2 * 1024 * 256 + 4 * (4 * 256**2 + 3 * 256 * 688 + 2 * 256) + 256
    ch = mp.Choice(1, 1, 8, "ring", False, 8192, 0, "zigzag")
    split0, _ = mp.memory(spec, 8192, ch, 8, H100_NODE)
    split3, _ = mp.memory(replace(spec, train=replace(spec.train, zero_stage=3)), 8192, ch, 8,
                          H100_NODE)
    assert split0["parameters"] == 4 * spec.params and split0["optimizer"] == 8 * spec.params
    assert split3["parameters"] == split0["parameters"] / 8
    assert split3["optimizer"] == 12 * spec.params / 8  # Adam's moments + the fp32 partition
    assert split3["activations"] == split0["activations"]


def test_max_context_is_the_largest_n_that_fits():
    spec = _spec()
    best = mp.max_context(spec, 8, H100_NODE)
    assert best is not None and best.fits
    ch, q = best.choice, mp.quantum(spec, best.choice)
    assert mp.memory(spec, best.n + q, ch, 8, H100_NODE)[0]["total"] > best.budget
    # no other choice fits a longer sequence
    for other in mp.choices(spec, 8):
        longer = best.n + mp.quantum(spec, other)
        if longer % mp.quantum(spec, other) == 0:
            assert mp.memory(spec, longer, other, 8, H100_NODE)[0]["total"] > best.budget
    # checkpointing buys length: the best without it is shorter
    plain = [c for c in mp.choices(spec, 8) if not c.checkpointing]
    assert max(mp._largest(spec, c, 8, H100_NODE, 1 << 34) for c in plain) < best.n


def test_pieces_schedule_serial_part_is_p_times_one_shards_chain():
    """Issue 19: a DeltaNet layer in pieces is serial across ranks only in its state chains."""
    shape = {"batch": 1, "heads": 4, "dk": 64, "dv": 64, "chunk": 64}
    n, hw = 1 << 20, CPU_DEFAULT
    serial, parallel = mp.delta_pieces_time(shape, n, 2, hw)
    one = planner.terms("delta_rule", "chunk", shape, n // 2, 1, 1, hw)  # one shard alone
    chain = 3.0 * shape["heads"] * (n // 2) * 6 * 64 * 64 / planner.FUSED_CHAIN_SPEEDUP
    rate = hw.flops * planner.efficiency(hw, "delta_rule", "pass", 2)
    assert serial == pytest.approx(2 * chain / rate)
    # the rest runs side by side at each rank's share of the host, with a forward recomputed
    rest = (one.flops_par - chain) / min(1, hw.shared_cores / 2)
    assert parallel == pytest.approx(4 / 3 * rest / rate, rel=0.02)
    # the chain is small next to the layer, so wall / CPU per rank stays near 1, where the
    # old turns over whole layers cost ~2x (benchmarks/RESULTS.md, issue 19's table)
    cpu = parallel + serial / 2  # what one rank computes itself
    assert (serial + parallel) / cpu < 1.1
    # taking turns, each rank would also wait out the other's whole layer: 2 x cpu
    assert serial + parallel < 0.55 * (2 * cpu)


def test_model_report_from_a_job_file(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[mesh]\nworkers = 2\n[model]\nkind = "deltanet"\ndim = 64\nnum_layers = 2\n'
                   'num_heads = 2\nattn_layers = [1]\n[train]\nseq_len = 1024\n')
    text = model_report(str(job), CPU_DEFAULT, 2, True, None)
    assert "largest N that fits" in text and "| parameters |" in text
    assert "| 1 | attention |" in text and "one delta layer" in text
    text = model_report(str(job), CPU_DEFAULT, 2, False, "64K")
    assert "N = 65,536 tokens" in text and "tokens/s" in text
    with pytest.raises(ValueError, match="length '0'"):
        model_report(str(job), CPU_DEFAULT, 2, False, "0")
    with pytest.raises(ValueError, match="world=0"):
        model_report(str(job), CPU_DEFAULT, 0, True, None)
    with pytest.raises(ValueError, match="missing.toml"):
        model_report(str(tmp_path / "missing.toml"), CPU_DEFAULT, 2, True, None)


def test_choice_of_follows_the_trainer():
    spec = mp.spec_of("deltanet", small_job("deltanet", 4096)[0],
                      {"seq_len": 4096, "activation_checkpointing": True})
    ch = choice_of(spec, 2)
    from seqshard.models.config import DeltaNetConfig

    assert (ch.ring, ch.strategy, ch.checkpointing, ch.mixer_piece_tokens) == (
        2, "scan", True, DeltaNetConfig().mixer_piece_tokens)  # the Trainer's default pieces
