"""Sweep points side by side: the `parallel` knob, the packer's count, and a real Ray sweep
whose three 2-worker points (one killed) run at once on 6 logical CPUs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from seqshard.launch import sweep
from seqshard.launch.sweep_pack import Packer, embedded_cpus, need, parse_parallel
from tests.test_sweep import PROBE as SWEEP_PROBE

# test_sweep's 2-worker probe job (3 steps, no restarts), at most three points at once
PROBE = SWEEP_PROBE + "[sweep]\nparallel = 3\n"


def _cfg(workers, cpus=1.0, gpus=0.0):
    return SimpleNamespace(mesh=SimpleNamespace(workers=workers),
                           launch=SimpleNamespace(cpus_per_worker=cpus, gpus_per_worker=gpus))


def test_parallel_knob_parses_auto_or_a_positive_count_and_names_bad_values(tmp_path):
    assert parse_parallel("auto") == "auto" and parse_parallel(" AUTO ") == "auto"
    assert parse_parallel(3) == 3 and parse_parallel("2") == 2
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(ValueError, match=r"\[sweep\] parallel = "):
            parse_parallel(bad)
    config = tmp_path / "s.toml"
    config.write_text(PROBE)
    assert sweep.config_parallel(config) == 3
    assert sweep.config_parallel(config, "auto") == "auto"
    with pytest.raises(ValueError, match="--parallel = '0'"):
        sweep.config_parallel(config, "0")
    config.write_text(PROBE.replace("parallel = 3", 'parallel = "many"'))
    with pytest.raises(ValueError, match="parallel = 'many'"):
        sweep.plan(config, ["fault.rank=1,-1"], [], str(tmp_path / "never"))


def test_packer_starts_points_in_order_as_they_fit():
    two, four, gpu = need(_cfg(2)), need(_cfg(4)), need(_cfg(2, gpus=1.0))
    assert two == {"CPU": 2.0, "GPU": 0.0} and gpu == {"CPU": 2.0, "GPU": 2.0}
    # this machine's case: 2 cores, 2-worker points -> one at a time
    assert Packer({"CPU": 2.0}, "auto").at_once([two, two, two]) == 1
    assert Packer({"CPU": 4.0}, "auto").at_once([two, two, two]) == 2
    assert Packer({"CPU": 8.0}, 1).at_once([two, two]) == 1  # 1: one after another
    assert Packer({"CPU": 8.0, "GPU": 2.0}, "auto").at_once([gpu, gpu]) == 1  # GPUs bind
    packer = Packer({"CPU": 6.0}, "auto")
    packer.start(0, four)
    assert not packer.fits(four) and packer.fits(two)
    packer.finish(0)
    assert packer.fits(need(_cfg(16)))  # too big for the cluster: starts alone (and fails there)
    # an embedded Ray is sized for the biggest point, or the N biggest with parallel = N
    assert embedded_cpus([_cfg(2), _cfg(4)], "auto", 2) == 4
    assert embedded_cpus([_cfg(2), _cfg(4), _cfg(2)], 2, 2) == 6


def test_three_points_side_by_side_on_ray_one_killed(tmp_path):
    ray = pytest.importorskip("ray")
    from seqshard.launch import ray_connect
    from seqshard.launch.records import read_records
    from seqshard.launch.sweep_run import run_sweep

    config = tmp_path / "probe.toml"
    config.write_text(PROBE)
    out = tmp_path / "sweep"
    # (rank 1 killed after step 1, no restart), then two good points: at_step 5 > steps never
    # fires, rank -1 is no fault; the good two train the same job, so their states must agree
    root, points = sweep.plan(config, ["fault.rank=1,-1", "fault.at_step=1,5"], [], str(out))
    points = points[:3]
    ray_connect.start_embedded(6)  # more logical CPUs than cores: three 2-worker points fit
    try:
        code = run_sweep(root, points, parallel=sweep.config_parallel(config))
    finally:
        ray.shutdown()
    assert code == 1  # a point failed
    data = json.loads((out / "sweep.json").read_text())
    assert data["parallel"].startswith("3: up to 3 point(s) at once on 6 CPUs")
    killed, good1, good2 = data["points"]
    assert killed["status"] == "failed" and "worker process died" in killed["error"]
    assert good1["status"] == good2["status"] == "completed"
    spans = [(r["start_s"], r["end_s"]) for r in (killed, good1, good2)]
    for i, (s1, e1) in enumerate(spans):  # every pair ran at the same time
        for s2, e2 in spans[i + 1:]:
            assert s1 < e2 and s2 < e1, spans
    finals = []
    for r in (good1, good2):
        assert r["steps"] == 3 and r["final_loss"] > 0
        (final,) = [x for x in read_records(r["out"]) if x["type"] == "final"]
        assert final["status"] == "completed" and final["steps"] == 3
        finals.append(final["digest"])
    assert finals[0] == finals[1]  # neither disturbed the other: bitwise the same state
    assert good1["final_loss"] == good2["final_loss"]
    table = (out / "sweep.md").read_text()
    assert "- parallel = 3: up to 3 point(s) at once" in table
    assert "| started | finished |" in table and good1["started"] in table


def test_cli_refuses_a_bad_parallel_before_anything_starts(tmp_path, capsys):
    from seqshard.launch import cli

    config = tmp_path / "probe.toml"
    config.write_text(PROBE)
    code = cli.main(["sweep", str(config), "--over", "fault.rank=1,-1", "--parallel", "none",
                     "--out", str(tmp_path / "never")])
    assert code == 2 and "--parallel = 'none'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
