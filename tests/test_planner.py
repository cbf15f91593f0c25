"""The planner's cost model, its calibration and ranking check, the max-context search and
`seqshard plan` (pure Python: no ranks are started here)."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest

from seqshard.launch.perf import planner
from seqshard.launch.perf import calibrate, maxctx, results
from seqshard.launch.perf.plan_cmd import parse_tokens
from seqshard.launch.perf.planner import H100_NODE, candidates, plan, predict

LLAMA = {"batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "causal": True}
ATTN = {"batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 48, "causal": True}
DELTA = {"batch": 1, "heads": 4, "dk": 48, "dv": 64, "chunk": 64}
FIT = {"batch": 1, "dim": 96, "heads": 4, "group_size": 48, "latents": 3, "depth": 2,
       "causal": True}


def test_candidates_follow_the_head_count():
    got = set(candidates("attention", ATTN, 4))
    assert got == {("ring", 1, 4), ("allgather", 1, 4), ("hybrid", 2, 2), ("ulysses", 4, 1)}
    six = set(candidates("attention", dict(ATTN, heads=6, kv_heads=6), 4))
    assert ("ulysses", 4, 1) not in six and ("hybrid", 2, 2) in six
    assert candidates("delta_rule", DELTA, 8) == [("scan", 1, 8), ("pass", 1, 8)]


def test_bad_input_raises_with_the_values():
    with pytest.raises(ValueError, match="heads=6 do not divide by the Ulysses degree 4"):
        predict("attention", "ulysses", dict(ATTN, heads=6), 4096, 4, 1, H100_NODE)
    with pytest.raises(ValueError, match="N=1001 is not divisible by P=4"):
        predict("attention", "ring", ATTN, 1001, 1, 4, H100_NODE)
    with pytest.raises(ValueError, match="family='conv'"):
        plan("conv", ATTN, 1024, 2, H100_NODE)
    with pytest.raises(ValueError, match="hardware='tpu'"):
        planner.load_hardware("tpu")
    with pytest.raises(ValueError, match="N=4000 is not a multiple of P=2 x group_size=48"):
        predict("fit", "fit", FIT, 4000, 1, 2, H100_NODE)
    with pytest.raises(ValueError, match="length '12Q'"):
        parse_tokens("12Q")
    assert parse_tokens("1M") == 1 << 20 and parse_tokens("96K") == 96 * 1024


def test_memory_per_rank_falls_as_one_over_p_and_plans_are_sorted():
    n = 1 << 20
    m8 = predict("attention", "ring", LLAMA, n, 1, 8, H100_NODE).mem_bytes
    m64 = predict("attention", "ring", LLAMA, n, 1, 64, H100_NODE).mem_bytes
    assert m8 / m64 == pytest.approx(8.0)
    # all-gather keeps the whole K/V on every rank: it stops falling
    a8 = predict("attention", "allgather", LLAMA, n, 1, 8, H100_NODE).mem_bytes
    a64 = predict("attention", "allgather", LLAMA, n, 1, 64, H100_NODE).mem_bytes
    assert a8 / a64 < 2.0
    ranked = plan("attention", LLAMA, 10 * n, 16, H100_NODE)
    fits = [p.fits for p in ranked]
    assert fits == sorted(fits, reverse=True)
    times = [p.time_s for p in ranked if p.fits]
    assert times == sorted(times)
    # across nodes (P > 8) a Ulysses group that stays inside a node beats one that does not
    hyb = predict("attention", "hybrid", LLAMA, n, 8, 8, H100_NODE)
    uly = predict("attention", "ulysses", dict(LLAMA, heads=64, kv_heads=64), n, 64, 1,
                  H100_NODE)
    assert hyb.comm_s < uly.comm_s


def test_scan_sends_match_the_exclusive_scan_pattern():
    # P = 4: round 0 sends to +1, round 1 to +2, forward and reversed; rank 1 is busiest
    assert [planner.scan_sends(p) for p in (1, 2, 3, 4, 8)] == [0, 1, 2, 3, 5]


def _synthetic(hw, cpu: bool = False) -> dict:
    """Records whose times are exactly what `hw` predicts (the fit must recover them); with
    `cpu`, every rank's CPU time is what the model says it computes itself."""
    res = results.new_results("synthetic", machine_info={"cpu_count": hw.shared_cores,
                                                         "mem_total_bytes": 24 << 30})
    for family, shape, impls, ns in (
            ("attention", ATTN, (("ring", 1, 2), ("ulysses", 2, 1), ("allgather", 1, 2),
                                 ("ring", 1, 4), ("hybrid", 2, 2), ("ring", 1, 1)),
             (512, 1024, 2048)),
            ("delta_rule", DELTA, (("scan", 1, 2), ("pass", 1, 2), ("chunk", 1, 1)),
             (1024, 4096)),
            ("fit", FIT, (("fit", 1, 1), ("fit", 1, 2)), (1536, 3072))):
        for impl, u, r in impls:
            for n in ns:
                pred = predict(family, impl, shape, n, u, r, hw)
                m = {"time_s": pred.time_s, "times_s": [pred.time_s],
                     "tokens_per_s": n / pred.time_s, "mem_peak_bytes": [int(pred.mem_bytes)] * (u * r),
                     "rss_peak_bytes": [0] * (u * r), "comm_bytes": [0] * (u * r),
                     "comm_calls": [0] * (u * r)}
                if cpu:
                    work = planner.work_time(family, impl, shape, n, u, r, hw)
                    m["cpu_times_s"] = [[work]] * (u * r)
                res["points"].append(results.make_point(family, impl, n, u * r, u, r, shape,
                                                        fwd=m, fwdbwd=m))
    return res


def test_calibration_recovers_a_known_machine_and_ranks_like_it():
    truth = replace(planner.CPU_DEFAULT, shared_cores=2, flops=40e9, intra_bw=1.5e9,
                    inter_bw=1.5e9, intra_latency=80e-6, inter_latency=80e-6,
                    step_overhead=0.4e-3, call_overhead=2e-3, mem_bw=3e9,
                    efficiency={"attention": 1.0, "delta_rule": 0.3, "fit": 0.6},
                    memory_scale={"attention": 1.3, "delta_rule": 0.8, "fit": 2.0})
    res = _synthetic(truth)
    hw = calibrate.calibrate(res)
    ev = calibrate.evaluate(res, hw)
    assert ev["within_30"] == ev["count"] and ev["max_abs_time_err"] < 0.02, ev["rows"][:3]
    # one kernel rate per family (strategies differ by what is counted, not by a fitted rate)
    assert set(hw.efficiency) == {"attention", "delta_rule", "fit"}
    assert hw.efficiency["delta_rule"] == pytest.approx(0.3, rel=0.05)
    assert hw.mem_bw == pytest.approx(3e9, rel=0.05)
    assert hw.step_overhead == pytest.approx(0.4e-3, rel=0.05)
    assert hw.memory_scale["fit"] == pytest.approx(2.0, rel=1e-3)
    rk = ev["ranking"]
    assert rk["pairs_agree"] == rk["pairs_decisive"] > 0 and rk["top_agree"] == rk["top_total"]
    # a model that gets the order wrong is caught: swap the measured times of ring and allgather
    rows = [dict(r) for r in ev["rows"] if r["family"] == "attention" and r["world"] == 2]
    for r in rows:
        r["time_s"], r["pred_time_s"] = r["pred_time_s"], 1.0 / r["pred_time_s"]
    flipped = calibrate.ranking(rows)
    assert flipped["pairs_agree"] < flipped["pairs_decisive"]
    # every decisive pair is listed with both times, the wrong ones marked
    assert len(flipped["pairs"]) == flipped["pairs_decisive"]
    assert sum(not q["ok"] for q in flipped["pairs"]) == (flipped["pairs_decisive"]
                                                          - flipped["pairs_agree"])


def test_two_stage_calibration_separates_work_from_waiting():
    """With every rank's CPU time recorded, the work coefficients come from CPU time and only
    latency and cores from wall time: a machine with CPU cost per message *and* waiting per
    message, whose P=2 window got 1.2 cores and P=4 window 1.5, is recovered term by term."""
    truth = replace(planner.CPU_DEFAULT, shared_cores=1.5, cores_by_world={2: 1.2},
                    flops=40e9, intra_bw=1.5e9,
                    inter_bw=1.5e9, intra_latency=300e-6, inter_latency=300e-6,
                    msg_cpu=100e-6, step_overhead=0.4e-3, call_overhead=2e-3, mem_bw=3e9,
                    gather_slowdown=2.5,
                    efficiency={"attention": 1.0, "delta_rule": 0.3, "fit": 0.6},
                    memory_scale={"attention": 1.3, "delta_rule": 0.8, "fit": 2.0})
    base = replace(planner.CPU_DEFAULT, shared_cores=2)
    hw = calibrate.calibrate(_synthetic(truth, cpu=True), base=base)
    assert hw.shared_cores == pytest.approx(1.5)
    assert hw.cores_by_world[2] == pytest.approx(1.2) and hw.cores_by_world[4] == pytest.approx(1.5)
    assert hw.intra_latency == pytest.approx(300e-6, rel=0.05)
    assert hw.msg_cpu == pytest.approx(100e-6, rel=0.05)
    assert hw.gather_slowdown == pytest.approx(2.5, rel=0.05)
    assert hw.efficiency["delta_rule"] == pytest.approx(0.3, rel=0.05)
    ev = calibrate.evaluate(_synthetic(truth, cpu=True), hw)
    assert ev["max_abs_time_err"] < 0.01


def test_attention_pieces_equal_the_real_plans():
    """The planner's closed forms count the blocks of ops/attention/plan.py's plans (busiest
    rank): kernel calls exactly, and the query + key rows the merges and sums touch."""
    from seqshard.dist import get_layout
    from seqshard.ops.attention.plan import build_plan

    zigzag, contiguous = get_layout("zigzag"), get_layout("contiguous")
    for p in range(2, 9):
        splits = [(u, p // u) for u in range(1, p + 1) if p % u == 0] + [("allgather", p)]
        for u, r in splits:
            impl = ("allgather" if u == "allgather" else "ring" if u == 1 else
                    "ulysses" if r == 1 else "hybrid")
            u = 1 if impl == "allgather" else u
            n, unit = 2 * p * 3, 2 * 3 * u  # 3-token zigzag chunks; rows per local length
            members = [tuple(range(i * u, (i + 1) * u)) for i in range(r)]
            per_rank = []
            for i in range(p if impl == "allgather" else r):
                if impl == "allgather":
                    steps = [build_plan(zigzag, n, p, (i,), tuple(range(p)), causal=True)]
                else:
                    layout = contiguous if impl == "ulysses" else zigzag
                    steps = [build_plan(layout, n, p, members[i], members[(i - s) % r],
                                        causal=True) for s in range(r)]
                pieces = [x for step in steps for x in step]
                per_rank.append((len(pieces), sum(x.q_len + x.k_len for x in pieces) / unit))
            calls, q_rows, k_rows = planner.attention_pieces(impl, p, u, r)
            busiest = max(c for c, _ in per_rank)
            assert calls == busiest, (impl, u, r, per_rank)
            if impl != "ulysses":  # one block covering every row: nothing merged
                rows = [x for c, x in per_rank if c == busiest]
                assert rows == pytest.approx([q_rows + k_rows] * len(rows)), (impl, u, r,
                                                                              per_rank)


def test_head_groups_follow_the_ring_module(monkeypatch):
    """The planner counts the head groups ops/attention/ring.py streams (the Ulysses stage's
    groups, the ring backward's slices) with ring.py's own rule, not a copy of it: change the
    rule there and the planner's messages change with it."""
    from seqshard.ops.attention import ring

    shape = {"batch": 2, "heads": 8, "kv_heads": 8, "head_dim": 64, "causal": True}
    n = 1 << 16  # a rank's K block: 2 x 8 heads x 16K tokens x 64 x 2 bytes = 32 MiB

    def hybrid_messages() -> float:  # hybrid 2 x 2: 12 all-to-alls per group, ring exchanges
        t = planner.terms("attention", "hybrid", shape, n, 2, 2, H100_NODE)
        return t.msgs_intra + t.msgs_inter - 3  # less the argument check's 3 peers

    # as built: 4 groups of 4 heads per rank; the backward splits each group's one head per
    # batch element (2 slices): 12 x 4 + 4 x (1 + 2 x 2) messages
    assert hybrid_messages() == 68
    with monkeypatch.context() as patch:
        patch.setattr(ring, "HEAD_GROUPS", 2)  # 2 groups of 2 heads, 2 slices
        assert hybrid_messages() == 12 * 2 + 2 * (1 + 2 * 2)
    with monkeypatch.context() as patch:
        patch.setattr(ring, "STREAM_MIN_BYTES", 64 << 20)  # no streaming: 1 group, 4 slices
        assert hybrid_messages() == 12 * 1 + 1 * (1 + 2 * 4)


def test_noise_tie_comes_from_two_runs():
    """Pairs that two runs of the same points order differently are noise: the tie margin
    is the smallest one at which no decisive pair flips."""
    truth = replace(planner.CPU_DEFAULT, shared_cores=2)
    first, second = _synthetic(truth), _synthetic(truth)

    def times(res):
        return {(p["family"], p["impl"], p["n"], p["world"], p["ulysses"]): p
                for p in res["points"]}

    a = times(first)[("delta_rule", "scan", 4096, 2, 1)]["fwdbwd"]
    b = times(second)[("delta_rule", "scan", 4096, 2, 1)]["fwdbwd"]
    other = times(first)[("delta_rule", "pass", 4096, 2, 1)]["fwdbwd"]["times_s"][0]
    # run 1: scan 18% faster than pass; run 2: 18% slower -> the pair is noise
    a["times_s"] = [other / 1.18]
    b["times_s"] = [other * 1.18]
    got = calibrate.noise_tie(first, second)
    assert got["tie"] == 0.2, got["table"]
    flips = {row["tie"]: row["flipped"] for row in got["table"]}
    assert flips[0.15] >= 1 and flips[0.2] == 0
    # by margin: the planner (exact here) and the other run agree on every pair but the
    # flipped one, which counts up to 15% and is the other run's single disagreement
    hw = calibrate.calibrate(second)
    by_margin = {row["tie"]: row["wall"] for row in calibrate.agreement_by_margin(first, second, hw)}
    pairs, planner_ok, rerun_ok = by_margin[0.15]
    assert rerun_ok == pairs - 1 and planner_ok >= pairs - 1
    pairs, planner_ok, rerun_ok = by_margin[0.2]
    assert rerun_ok == pairs
    # the fastest repeat is what is scored (other work on a host only ever adds time)
    p = dict(first["points"][0], fwdbwd=dict(first["points"][0]["fwdbwd"],
                                             times_s=[0.3, 0.2, 0.9], time_s=0.3))
    assert calibrate.measured(p) == 0.2


def test_max_context_search_doubles_then_bisects():
    tried = []

    def fits_below(limit):
        def fits(n):
            tried.append(n)
            return maxctx.Probe(n, n <= limit, "fits" if n <= limit else "too big")
        return fits

    best, probes = maxctx.search(fits_below(5000), start=1024, multiple=64, max_n=1 << 20)
    assert best == 4992  # the largest multiple of 64 that fits
    assert tried[:4] == [1024, 2048, 4096, 8192] and all(n % 64 == 0 for n in tried)
    tried.clear()
    assert maxctx.search(fits_below(100), start=1024, multiple=64, max_n=4096)[0] is None
    assert maxctx.search(fits_below(10**9), start=1024, multiple=64, max_n=4096)[0] == 4096
    with pytest.raises(ValueError, match="start=1000 must be a positive multiple of multiple=64"):
        maxctx.search(fits_below(1), start=1000, multiple=64, max_n=4096)


def test_plan_command_prints_a_ranked_table_and_the_scaling_grid(capsys):
    from seqshard.launch.perf.__main__ import main

    assert main(["plan", "--n", "1M", "--world", "16", "--heads", "32", "--kv-heads", "8"]) == 0
    out = capsys.readouterr().out
    assert "| hybrid | 2x8 |" in out and "| ring | 1x16 |" in out
    assert main(["plan", "--scaling", "--family", "delta_rule", "--heads", "16"]) == 0
    out = capsys.readouterr().out
    assert out.count("| 10M |") == 8 and "| 1M | 1024 |" in out
    assert main(["plan", "--world", "3", "--n", "1000"]) == 2  # 1000 % 3: a clear error
    assert "not divisible" in capsys.readouterr().err


def test_hardware_profile_from_toml(tmp_path):
    path = tmp_path / "a100.toml"
    path.write_text('name = "a100-node"\nflops = 312e12\nmemory_bytes = 80e9\n'
                    'devices_per_node = 8\nintra_bw = 250e9\nintra_latency = 1e-5\n'
                    'inter_bw = 25e9\ninter_latency = 2e-5\nmem_bw = 1.4e12\n')
    hw = planner.load_hardware(str(path))
    assert hw.name == "a100-node" and hw.devices_per_node == 8
    slow = predict("attention", "ring", LLAMA, 1 << 20, 1, 8, hw).compute_s
    fast = predict("attention", "ring", LLAMA, 1 << 20, 1, 8, H100_NODE).compute_s
    # compute-bound: the kernels' flop rates set the ratio (memory passes are < 1% here)
    assert slow / fast == pytest.approx(989 / 312, rel=0.01)
    path.write_text('name = "x"\nflops = 1.0\n')
    with pytest.raises(ValueError, match="missing hardware fields \\['memory_bytes'"):
        planner.load_hardware(str(path))
    path.write_text('name = "x"\nflops = 1.0\nwarp_speed = 9\nmem_bww = 1.0\n')
    with pytest.raises(ValueError, match="a100.toml: unknown config key.* mem_bww \\(did you "
                                         "mean mem_bw\\?\\), warp_speed;"):
        planner.load_hardware(str(path))


def test_plan_from_bench_records_uses_the_calibrated_cpu(tmp_path, capsys):
    from seqshard.launch.perf.__main__ import main

    truth = replace(planner.CPU_DEFAULT, shared_cores=2, flops=30e9)
    path = results.write_results(tmp_path / "records.msgpack", _synthetic(truth))
    assert main(["plan", "--hardware", str(path), "--n", "2048", "--world", "4",
                 "--heads", "8", "--head-dim", "48"]) == 0
    out = capsys.readouterr().out
    assert "calibrated on" in out and "| hybrid | 2x2 |" in out
    # the calibrated profile predicts the synthetic machine's own time for a measured point
    hw = calibrate.calibrate(results.read_results(path))
    want = predict("attention", "ring", ATTN, 2048, 1, 4, truth).time_s
    assert predict("attention", "ring", ATTN, 2048, 1, 4, hw).time_s == pytest.approx(want, rel=0.02)


def test_reproducibility_compares_the_same_points_of_two_runs():
    truth = replace(planner.CPU_DEFAULT, shared_cores=2)
    first, second = _synthetic(truth), _synthetic(truth)
    for i, p in enumerate(second["points"]):
        factor = 1.1 if i % 2 else 1.5  # half the points 10% slower, half 50% slower
        m = p["fwdbwd"]  # the runs are compared by their fastest repeats
        p["fwdbwd"] = dict(m, time_s=m["time_s"] * factor,
                           times_s=[t * factor for t in m["times_s"]])
    second["points"] = second["points"][:-1]  # a point only one run has is left out
    r = calibrate.reproducibility(second, first)
    n = len(second["points"])
    diffs = [0.1 if i % 2 else 0.5 for i in range(n)]
    assert r["count"] == n and r["within_30"] == diffs.count(0.1)
    assert r["median_abs_diff"] == pytest.approx(statistics.median(diffs))
