"""The model-level plan's step time (launch/perf/step_model.py): additive and monotone, its
rates recovered by the fit from synthetic measurements, the calibrated profile's file.
(No timed asserts: how close the plan comes to real steps is `seqshard plan --validate`'s
table in benchmarks/RESULTS.md.)"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from seqshard.launch.perf import model_plan as mp
from seqshard.launch.perf.model_validate import choice_of, point_features, small_job
from seqshard.launch.perf.plan_cmd import model_report
from seqshard.launch.perf.planner import CPU_DEFAULT, H100_NODE
from seqshard.launch.perf.step_model import (
    OPS, StepRates, cpu_seconds, fit_rates, load_profile, save_profile, step_features,
    step_seconds)

RATES = StepRates(40e9, 2e9, {"attention": 0.4, "delta_rule": 4.0, "fit": 1.5}, 0.07, 3e-8,
                  "known")


def _points():
    """Validation-like points of every kind: (world, kind, model, train)."""
    out = []
    for ckpt in (False, True):
        out.append((1, "transformer", *small_job("transformer", 2048,
                                                  activation_checkpointing=ckpt)))
        out.append((2, "transformer", *small_job("transformer", 4096, layout="zigzag",
                                                  strategy="ring", dim=128,
                                                  activation_checkpointing=ckpt)))
        for pieces in (0, 2048):
            out.append((2, "deltanet", *small_job("deltanet", 16384, mixer_piece_tokens=pieces,
                                                   activation_checkpointing=ckpt)))
        out.append((2, "fit", *small_job("fit", 8192, activation_checkpointing=ckpt)))
        out.append((1, "fit", *small_job("fit", 2048, dim=128, activation_checkpointing=ckpt)))
    return out


def test_fit_recovers_known_rates_from_synthetic_steps():
    samples = []
    for pt in _points():
        f = point_features(*pt, CPU_DEFAULT)
        samples.append((f, cpu_seconds(f, RATES, f["sp"])))
    got = fit_rates(samples, StepRates.from_hardware(CPU_DEFAULT))
    assert got.dense_flops_s == pytest.approx(RATES.dense_flops_s, rel=1e-4)
    assert got.elem_bytes_s == pytest.approx(RATES.elem_bytes_s, rel=1e-4)
    for o in OPS:
        assert got.op_scale[o] == pytest.approx(RATES.op_scale[o], rel=1e-4)
    assert got.fixed_s == pytest.approx(RATES.fixed_s, rel=1e-4)
    assert got.opt_s_per_param == pytest.approx(RATES.opt_s_per_param, rel=1e-3)
    # coefficients held at the base's: the rest is fitted to what they leave
    base = replace(RATES, fixed_s=0.0, opt_s_per_param=0.0)
    held = fit_rates(samples, base, keep=("dense_flops", "elem_bytes",
                                          *(f"op_s.{o}" for o in OPS)))
    assert held.dense_flops_s == RATES.dense_flops_s
    assert held.fixed_s == pytest.approx(RATES.fixed_s, rel=1e-4)
    # collinear columns (every sample one shape: the dense work a fixed multiple of the
    # kernel's) cannot be told apart: the one fitted to 0 is held at the base's rate, not
    # read as infinitely fast, and the other explains the time
    one = {"dense_flops": 1e9, "elem_bytes": 0.0, "op_s.attention": 0.1, "serial": {}}
    flat = [(dict(one, dense_flops=k * 1e9, **{"op_s.attention": k * 0.1}), k * 0.125)
            for k in (1, 2, 3)]
    got = fit_rates(flat, replace(RATES, fixed_s=0.0, opt_s_per_param=0.0))
    assert (got.dense_flops_s, got.op_scale["attention"]) in (
        (RATES.dense_flops_s, pytest.approx((0.125 - 1 / 40) / 0.1)),
        (pytest.approx(1e9 / (0.125 - 0.04)), RATES.op_scale["attention"]))
    assert "held" in got.source
    with pytest.raises(ValueError, match="no samples"):
        fit_rates([], RATES)
    with pytest.raises(ValueError, match="> 0"):
        fit_rates([(samples[0][0], 0.0)], RATES)


def _spec(kind="transformer", **model):
    base = {"dim": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 256, "mlp_ratio": 2,
            **small_job(kind, 1024)[0], **model}
    return mp.spec_of(kind, base, {"seq_len": 4096})


def test_step_time_is_the_sum_of_its_terms_and_grows_where_it_must():
    for kind in ("transformer", "deltanet", "fit"):
        spec = _spec(kind)
        ch = choice_of(spec, 2)
        f = step_features(spec, 8192, ch, 2, CPU_DEFAULT)
        step, serial, blocks = step_seconds(f, RATES)
        head = 6 * spec.config.dim * spec.config.vocab_size * 4096 * (4 / 3)
        rest = (head / RATES.dense_flops_s + f["comm_s"] + f["opt_params"]
                * RATES.opt_s_per_param + RATES.fixed_s)
        assert step == pytest.approx(sum(blocks) + rest)  # additive: blocks + the rest
        assert 0 <= serial <= step
        # the fixed cost adds itself, once
        more = step_seconds(f, replace(RATES, fixed_s=RATES.fixed_s + 1.0))[0]
        assert more == pytest.approx(step + 1.0)
        # monotone: longer sequences, checkpointing, a slower machine all cost more
        longer = step_seconds(step_features(spec, 16384, ch, 2, CPU_DEFAULT), RATES)[0]
        ckpt = step_seconds(step_features(spec, 8192, replace(ch, checkpointing=True), 2,
                                          CPU_DEFAULT), RATES)[0]
        slower = step_seconds(f, replace(RATES, dense_flops_s=RATES.dense_flops_s / 2,
                                         elem_bytes_s=RATES.elem_bytes_s / 2))[0]
        assert longer > step and ckpt > step and slower >= step, kind
    # the uncalibrated rates are the profile's datasheet ones: no fixed cost on a GPU
    h = StepRates.from_hardware(H100_NODE)
    assert h.fixed_s == 0 and h.dense_flops_s == H100_NODE.flops * 0.45
    # a rank's CPU excludes the wait for the other ranks' serial chains
    spec = _spec("deltanet")
    ch = replace(choice_of(spec, 2), mixer_piece_tokens=2048)
    f = step_features(spec, 16384, ch, 2, CPU_DEFAULT)
    step, serial, _ = step_seconds(f, RATES)
    assert serial > 0 and cpu_seconds(f, RATES, 2) == pytest.approx(step - serial / 2)


def test_profile_round_trips_through_its_file(tmp_path):
    path = str(tmp_path / "p.json")
    hw = replace(CPU_DEFAULT, cores_by_world={2: 1.5})
    save_profile(path, hw, RATES, {"note": "synthetic"})
    got_hw, got = load_profile(path)
    assert got == RATES and got_hw == hw
    # and the plan uses it: `--hardware PROFILE.json`
    job = tmp_path / "job.toml"
    job.write_text('[model]\nkind = "transformer"\ndim = 64\nnum_layers = 2\nnum_heads = 2\n'
                   '[train]\nseq_len = 4096\n')
    text = model_report(str(job), got_hw, 2, False, None, got)
    assert "step-time rates (known): dense 40.00 GFLOP/s" in text


@pytest.mark.parametrize("edit, key", [
    (lambda d: d["step"].pop("dense_flops_s"), "step.dense_flops_s"),
    (lambda d: d["step"].update(elem_bytes_s="fast"), "step.elem_bytes_s"),
    (lambda d: d["step"].update(fixed_s=-1.0), "step.fixed_s"),
    (lambda d: d["step"]["op_scale"].update(attention=None), "step.op_scale.attention"),
    (lambda d: d["step"]["op_scale"].update(mamba=1.0), "mamba"),
    (lambda d: d["step"].update(dense_flop_s=1.0), "dense_flop_s"),
    (lambda d: d["hardware"].update(flops="many"), "flops"),
    (lambda d: d["hardware"].update(flopz=1.0), "flopz"),
    (lambda d: d.pop("step"), "'step'"),
])
def test_bad_profile_names_the_key(tmp_path, edit, key):
    path = tmp_path / "p.json"
    save_profile(str(path), CPU_DEFAULT, RATES)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_profile(str(path))


def test_calibrate_from_validation_records_writes_a_profile(tmp_path, capsys):
    """`seqshard plan --calibrate-from RECORDS.json --calibrate-here PROFILE.json`: the rates
    fitted to (here synthetic) --validate records, written where --hardware reads them."""
    from seqshard.launch import cli

    base = StepRates.from_hardware(CPU_DEFAULT)
    records = []
    for pt in _points():
        f = point_features(*pt, CPU_DEFAULT)
        cpu = cpu_seconds(f, RATES, f["sp"])
        records.append([list(pt), [{"cpu_s": cpu, "mem_bytes": 1, "step_s": cpu}] * pt[0]])
    rec, out = tmp_path / "records.json", tmp_path / "profile.json"
    rec.write_text(json.dumps(records))
    assert cli.main(["plan", "--calibrate-from", str(rec), "--calibrate-here", str(out)]) == 0
    assert f"fitted to {len(records)} measured steps" in capsys.readouterr().out
    hw, got = load_profile(str(out))
    assert hw == CPU_DEFAULT and got.fixed_s == pytest.approx(RATES.fixed_s, rel=1e-4)
    assert got.dense_flops_s == pytest.approx(RATES.dense_flops_s, rel=1e-4) != base.dense_flops_s
    # a bad profile is a clean error naming the key, before anything runs
    data = json.loads(out.read_text())
    data["step"]["fixed_s"] = "soon"
    out.write_text(json.dumps(data))
    assert cli.main(["plan", "--hardware", str(out), "--model", "x.toml"]) != 0
    assert "step.fixed_s" in capsys.readouterr().err


def test_calibrate_here_rates_from_its_measurements():
    """step_calibrate.rates_from: the micro-benchmarks' rates as measured, and the fixed and
    optimizer costs recovered from the two tiny Trainer steps (here synthetic, from known
    rates: what the tiny steps would measure on a machine that runs exactly at them)."""
    from seqshard.launch.perf import step_calibrate as sc

    tiny = []
    for width in sc.TINY_WIDTHS:
        f = point_features(2, "transformer", *sc._tiny_job(width, 2), CPU_DEFAULT)
        tiny.append({"dim": width, "cpu_s": cpu_seconds(f, RATES, 2)})
    m = {"dense_flops": 8e9, "dense_s": 8e9 / RATES.dense_flops_s, "elem_bytes": 4e8,
         "elem_s": 4e8 / RATES.elem_bytes_s, "op_scale": dict(RATES.op_scale), "tiny": tiny,
         "world": 2}
    got = sc.rates_from(m, CPU_DEFAULT)
    assert got.dense_flops_s == pytest.approx(RATES.dense_flops_s)
    assert got.elem_bytes_s == pytest.approx(RATES.elem_bytes_s)
    assert got.op_scale == RATES.op_scale
    assert got.fixed_s == pytest.approx(RATES.fixed_s, rel=1e-3)
    assert got.opt_s_per_param == pytest.approx(RATES.opt_s_per_param, rel=1e-3)
    # the slowest rank's measurement is the one kept
    slow = dict(m, dense_s=2 * m["dense_s"], op_scale={**m["op_scale"], "fit": 9.0})
    assert sc.busiest([m, slow])["dense_s"] == slow["dense_s"]
    assert sc.busiest([m, slow])["op_scale"]["fit"] == 9.0
