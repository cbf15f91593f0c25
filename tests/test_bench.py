"""seqshard bench: record schema, measurements, a tiny sweep on real gloo ranks, the report.

One module-scoped sweep (P = 1 and 2, every family, peers included) feeds most checks, so the
rank processes start once. Sizes are tiny and awkward (head dim 48, N = 96/192, groups of 24).
"""

from __future__ import annotations

import math

import pytest
import torch

from seqshard.launch.perf import results
from seqshard.launch.perf.measure import CommCounter, PeakMemory, time_runs
from seqshard.launch.perf.planner import CPU_DEFAULT, terms
from seqshard.launch.perf.suites import spec
from dataclasses import replace

MiB = 2**20
ATTN = {"batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 48, "causal": True}
DELTA = {"batch": 1, "heads": 2, "dk": 32, "dv": 48, "chunk": 32}
FIT = {"batch": 1, "dim": 48, "heads": 2, "group_size": 24, "latents": 3, "depth": 1,
       "causal": True}


# --- the schema --------------------------------------------------------------------------------
def _measure(world: int) -> dict:
    return {"time_s": 0.5, "times_s": [0.4, 0.5, 0.6], "tokens_per_s": 2.0,
            "mem_peak_bytes": [10] * world, "rss_peak_bytes": [12] * world, "comm_bytes": [3] * world, "comm_calls": [1] * world}


def test_records_roundtrip_and_rejections(tmp_path):
    res = results.new_results("seqshard bench --suite x", machine_info={"cpu_count": 2})
    res["points"].append(results.make_point("attention", "ring", 64, 2, 1, 2, ATTN,
                                            fwd=_measure(2), fwdbwd=_measure(2)))
    res["points"].append(results.make_point("fit", "fit", 64, 1, 1, 1, FIT, status="error",
                                            error="boom"))
    path = results.write_results(tmp_path / "r.msgpack", res)
    back = results.read_results(path)
    assert back["points"] == res["points"] and back["version"] == results.VERSION
    assert back["command"] == "seqshard bench --suite x"

    bad_cases = [
        (lambda r: r.update(version=99), "version=99"),
        (lambda r: r.update(schema="other"), "schema='other'"),
        (lambda r: r["points"][0].pop("impl"), "missing field 'impl'"),
        (lambda r: r["points"][0].update(ulysses=2), "ulysses=2 x ring=2 != world=2"),
        (lambda r: r["points"][0]["fwd"].update(comm_bytes=[1]), "has 1 entries for world=2"),
        (lambda r: r["points"][0].update(family="conv"), "family='conv'"),
        (lambda r: r["points"][0]["fwd"].update(time_s=0.0), "time_s=0.0"),
        (lambda r: r["points"][0]["fwd"].update(cpu_times_s=[[0.1] * 3]),
         "cpu_times_s should be 2 lists of 3 repeats"),
        (lambda r: r["points"][0]["fwd"].update(host_cpu_s=[0.1]),
         "host_cpu_s has 1 entries for 3 repeats"),
    ]
    for mutate, message in bad_cases:
        broken = results.read_results(path)
        mutate(broken)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            results.validate_results(broken)


def test_peak_memory_sees_a_torch_allocation_and_timing_checks_arguments():
    with PeakMemory() as pm:
        x = torch.ones(16 * MiB // 4 * 4)  # 64 MiB of float32, written so pages are resident
        del x
    assert pm.peak_bytes == 64 * MiB, pm.peak_bytes  # the allocator's count is exact
    assert 60 * MiB <= pm.rss_bytes <= 100 * MiB, pm.rss_bytes  # the kernel's is coarse
    with PeakMemory() as small:
        a = torch.ones(1000)
        b = torch.ones(3000)
        del a, b
        c = torch.ones(500)
    assert small.peak_bytes == 16000, small.peak_bytes
    del c
    calls = []
    times = time_runs(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeats=0"):
        time_runs(lambda: None, warmup=0, repeats=0)
    # short runs are repeated until enough was timed, but never past max_repeats
    calls.clear()
    times = time_runs(lambda: calls.append(1), warmup=0, repeats=2, max_repeats=6,
                      min_total_s=10.0)
    assert len(times) == 6 == len(calls)
    with CommCounter() as cc:  # no group: nothing is sent, nothing counted
        pass
    assert cc.bytes_sent == 0 and cc.calls == 0


# --- a tiny sweep on real ranks ----------------------------------------------------------------
def _specs() -> list[dict]:
    out = [spec("attention", "sdpa", 96, 1, ATTN), spec("attention", "seqshard", 96, 1, ATTN),
           spec("attention", "sdpa", 192, 1, ATTN),
           spec("delta_rule", "naive", 64, 1, DELTA), spec("delta_rule", "chunk", 64, 1, DELTA),
           spec("fit", "naive", 96, 1, FIT), spec("fit", "fit", 96, 1, FIT)]
    for n in (96, 192):
        out += [spec("attention", "ring", n, 2, ATTN),
                spec("attention", "ulysses", n, 2, ATTN, ulysses=2)]
    out += [spec("attention", "allgather", 96, 2, ATTN),
            spec("attention", "ds_ulysses", 96, 2, ATTN, ulysses=2),
            spec("delta_rule", "scan", 64, 2, DELTA), spec("delta_rule", "pass", 64, 2, DELTA),
            spec("fit", "fit", 96, 2, FIT),
            # never runs: 3 heads do not split over 2 Ulysses ranks
            spec("attention", "ulysses", 96, 2, dict(ATTN, heads=3, kv_heads=3), ulysses=2),
            # fails inside the op on every rank (zigzag needs N % 2P == 0): recorded, not hung
            spec("attention", "ring", 98, 2, ATTN)]
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from seqshard.launch.perf.runner import run_points

    specs = _specs()
    res = results.new_results("pytest tiny sweep")
    res["points"] = run_points(specs, warmup=0, repeats=1, point_timeout_s=120, log=lambda s: None)
    return specs, res, tmp_path_factory.mktemp("bench")


def test_sweep_records_every_point_with_its_status(sweep):
    specs, res, _ = sweep
    results.validate_results(res)
    by_status = [p["status"] for p in res["points"]]
    assert by_status[:-2] == ["ok"] * (len(specs) - 2), [
        (p["impl"], p["error"]) for p in res["points"] if p["status"] != "ok"]
    skipped, failed = res["points"][-2:]
    assert skipped["status"] == "skipped" and "heads=3" in skipped["error"]
    assert failed["status"] == "error" and "98" in failed["error"]
    for p in res["points"][:-2]:
        for mode in results.MODES:
            m = p[mode]
            assert m["time_s"] > 0 and m["tokens_per_s"] == pytest.approx(p["n"] / m["time_s"])
            assert len(m["mem_peak_bytes"]) == p["world"]
            # every rank's CPU seconds and the host's busy seconds, per repeat
            assert [len(c) for c in m["cpu_times_s"]] == [len(m["times_s"])] * p["world"]
            assert len(m["host_cpu_s"]) == len(m["times_s"])
            assert all(c >= 0 for rank in m["cpu_times_s"] for c in rank)
            assert results.cpu_seconds(m) > 0


def test_counted_bytes_match_the_planner_model(sweep):
    """The planner's analytic traffic per rank equals what the collectives really sent."""
    _, res, _ = sweep
    hw = replace(CPU_DEFAULT, dtype_bytes=4)
    checked = 0
    for p in res["points"]:
        if p["status"] != "ok" or p["world"] == 1:
            continue
        model = terms(p["family"], p["impl"], p["shape"], p["n"], p["ulysses"], p["ring"], hw)
        sent = p["fwdbwd"]["comm_bytes"]
        # the model counts the busiest rank
        assert max(sent) == model.bytes_intra, (
            p["family"], p["impl"], p["n"], sent, model.bytes_intra)
        if p["family"] == "attention":  # attention traffic is the same on every rank
            assert min(sent) == max(sent), (p["impl"], sent)
        checked += 1
    assert checked >= 9


def test_peak_memory_per_rank_holds_the_inputs_and_falls_with_ranks(sweep):
    _, res, _ = sweep
    pts = {(p["impl"], p["n"], p["world"]): p for p in res["points"] if p["status"] == "ok"}
    for key in (("ring", 192, 2), ("ulysses", 192, 2), ("sdpa", 192, 1)):
        p = pts[key]
        n_local = p["n"] // p["world"]
        inputs = (ATTN["heads"] + 2 * ATTN["kv_heads"]) * n_local * ATTN["head_dim"] * 4
        # inputs, their gradients and the output are all alive at the peak
        assert min(p["fwdbwd"]["mem_peak_bytes"]) >= 2 * inputs, (key, p["fwdbwd"])
    assert max(pts[("ring", 192, 2)]["fwdbwd"]["mem_peak_bytes"]) < \
        max(pts[("sdpa", 192, 1)]["fwdbwd"]["mem_peak_bytes"])


def test_report_writes_table_and_valid_pngs(sweep):
    from seqshard.launch.perf.report import peer_ratios, write_report

    _, res, out = sweep
    path = write_report(res, out, log=lambda s: None)
    text = path.read_text()
    assert "| attention | ring | 1x2 | 192 | 2 |" in text
    assert "fwd+bwd min ms | fwd+bwd CPU ms, all ranks" in text
    assert "skipped: " in text and "Fitted exponents" in text
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"attention_time.png", "attention_memory.png",
                                      "delta_rule_time.png", "fit_memory.png"}
    import matplotlib.image

    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    ratios = peer_ratios(res)
    pairs = {(r["impl"], r["peer"], r["n"]) for r in ratios}
    assert pairs >= {("ring", "sdpa", 192), ("ulysses", "ds_ulysses", 96),
                     ("seqshard", "sdpa", 96), ("chunk", "naive", 64), ("scan", "chunk", 64),
                     ("fit", "naive", 96)}
    assert all(r["time_ratio"] > 0 and math.isfinite(r["time_ratio"]) for r in ratios)


# --- memory-only max context: the seed paper's "attention scale-up" (issue 18) ----------------
TINY_MHA = {"batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 16, "causal": True}


@pytest.mark.parametrize("impl,world,start,budget_mib", [("naive", 1, 128, 1.0),
                                                         ("ring", 2, 512, 1.0)])
def test_memory_only_search_stops_where_the_next_grid_step_does_not_fit(impl, world, start,
                                                                         budget_mib):
    from seqshard.launch.perf import maxctx

    job = {"family": "attention", "impl": impl, "world": world, "ulysses": 1,
           "shape": TINY_MHA, "start": start, "mem_budget_mib": budget_mib,
           "time_budget_s": None, "probe_cap_s": 120}
    found = maxctx.find(job, resolution=0.0, log=lambda s: None)
    step = maxctx._multiple(job)  # naive: 2 (one process, causal), ring P=2: 4 (zigzag 2P)
    by_n = {p["n"]: p for p in found["probes"]}
    best = found["max_n"]
    assert found["memory_only"] and found["time_budget_s"] == math.inf and not found["capped"]
    assert best is not None and best % step == 0, found
    assert by_n[best]["ok"] and by_n[best]["mem_bytes"] <= budget_mib * MiB
    over = by_n[best + step]  # the next grid step was measured, and memory failed it
    assert not over["ok"] and over["reason"].startswith("memory"), over
    assert over["mem_bytes"] > budget_mib * MiB
    res = results.new_results("pytest maxctx")
    res["maxctx"].append(dict(found, mem_budget_mib=float(budget_mib)))
    results.validate_results(res)  # the record schema accepts a search with no time budget


def test_scaleup_jobs_cover_each_strategy_and_mark_the_default():
    from seqshard.launch.perf import maxctx

    jobs = maxctx.scaleup_jobs(1024, (1, 2, 4), maxctx.SCALEUP_SHAPE, 300.0)
    got = [(j["impl"], j["world"], j["ulysses"], j["default"]) for j in jobs]
    assert got == [("naive", 1, 1, False), ("seqshard", 1, 1, True),
                   ("ring", 2, 1, False), ("allgather", 2, 1, False), ("ulysses", 2, 2, True),
                   ("ring", 4, 1, False), ("allgather", 4, 1, False), ("ulysses", 4, 4, True),
                   ("hybrid", 4, 2, False)]
    assert all(j["time_budget_s"] is None and j["start"] % maxctx._multiple(j) == 0
               for j in jobs)
    # heads that do not split over P ranks: no Ulysses, and the default is the ring
    odd = [(j["impl"], j["default"]) for j in
           maxctx.scaleup_jobs(64, (2,), dict(TINY_MHA, heads=3, kv_heads=3), 60.0)]
    assert odd == [("naive", False), ("ring", True), ("allgather", False)]
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"mem_mib={bad}: the memory budget"):
            maxctx.scaleup_jobs(bad, (1, 2), TINY_MHA, 60.0)


def test_maxctx_memory_flag_parses_and_rejects_non_positive_values(capsys):
    import argparse

    from seqshard.launch.perf.bench_cmd import bench_arguments

    parser = argparse.ArgumentParser(prog="seqshard bench")
    bench_arguments(parser)
    args = parser.parse_args(["--maxctx-memory", "1024", "--maxctx-worlds", "1,4",
                              "--maxctx-probe-cap", "90"])
    assert (args.maxctx_memory, args.maxctx_worlds, args.maxctx_probe_cap) == (1024.0, (1, 4),
                                                                               90.0)
    assert parser.parse_args([]).maxctx_memory is None  # off unless asked for
    for bad in ("0", "-5", "lots", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--maxctx-memory", bad])
        assert f"--maxctx-memory={bad}: expected a positive number of MiB" in \
            capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--maxctx-worlds", "0,2"])
    assert "--maxctx-worlds=0,2: expected rank counts >= 1" in capsys.readouterr().err
