"""The launcher end to end on real Ray (one local instance for the module) and real torchrun.

The job is the shipped demo config (a ring-sharded Transformer trained by the models' Trainer
through DeepSpeed on 2 gloo workers), shortened to 6 steps with a checkpoint every 2. One
uninterrupted run is the reference for: a run whose rank 1 is SIGKILLed after step 3, a rerun
whose newest checkpoint was corrupted, and the same job under torchrun. Each must end with the
bit-identical model state (sha256 of every parameter) and the same loss curve.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from seqshard.launch import config  # noqa: E402
from seqshard.launch.ray_launcher import LaunchError, launch  # noqa: E402
from seqshard.launch.records import read_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "launch" / "configs" / "demo.toml"
SHORT = ["train.steps=6", "launch.checkpoint_every=2", "launch.progress=false",
         "launch.poll_s=0.2"]


def _cfg(out: Path, *extra: str):
    cfg = config.load(DEMO, SHORT + list(extra))
    cfg.job.out = str(out)
    return cfg


def _curve(out: Path) -> dict[int, float]:
    """step -> loss, the latest attempt of each step."""
    steps = {}
    for r in read_records(out):
        if r["type"] == "step":
            steps[r["step"]] = r["loss"]
    return steps


def _events(out: Path, name: str) -> list[dict]:
    return [r for r in read_records(out) if r["type"] == "event" and r["event"] == name]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def baseline(local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    return out, launch(_cfg(out))


def test_two_worker_job_completes(baseline):
    out, result = baseline
    assert result["status"] == "completed" and result["attempts"] == 1
    assert result["steps"] == 6 and result["resumed_from"] == 0
    assert result["exactness"] < 1e-5  # sharded vs unsharded Transformer, fp32
    # parameters are replicated over the sp group: both ranks hold the same state
    assert [r["digest"] for r in result["ranks"]] == [result["digest"]] * 2
    curve = _curve(out)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert all(0 < loss < 10 for loss in curve.values())
    summary = (out / "summary.md").read_text()
    assert "**completed**" in summary and "ring 2" in summary and "exactness" in summary
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000004", "step-00000006"]  # keep_checkpoints = 2
    started = _events(out, "worker_started")
    assert sorted(e["rank"] for e in started) == [0, 1]
    assert len({e["pid"] for e in started}) == 2
    assert {e["allocator"] for e in started} == {"system"}  # the default changes nothing


def test_killed_worker_resumes_to_identical_state(baseline, tmp_path):
    ref_out, ref = baseline
    out = tmp_path / "killed"
    result = launch(_cfg(out, "fault.rank=1", "fault.at_step=3"))
    assert result["status"] == "completed" and result["attempts"] == 2
    assert result["resumed_from"] == 2  # step 3 was never checkpointed
    assert result["digest"] == ref["digest"]
    assert _curve(out) == _curve(ref_out)
    failure = _events(out, "failure")
    assert len(failure) == 1 and failure[0]["reason"].startswith("rank 1: worker process died")
    assert [e["step"] for e in _events(out, "resumed")] == [2]


def test_corrupt_latest_checkpoint_falls_back(baseline, tmp_path):
    ref_out, ref = baseline
    out = tmp_path / "corrupt"
    shutil.copytree(ref_out, out)
    newest = out / "checkpoints" / "step-00000006"
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "MANIFEST.msgpack"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    result = launch(_cfg(out))
    assert result["resumed_from"] == 4 and result["attempts"] == 1
    assert result["digest"] == ref["digest"]
    skipped = _events(out, "checkpoint_skipped")
    assert len(skipped) == 1 and "step-00000006" in skipped[0]["reason"]
    assert "sha256" in skipped[0]["reason"]
    assert _curve(out) == _curve(ref_out)


PROBE = """
[job]
name = "probe"
task = "probe"
[mesh]
workers = 2
collective_timeout_s = 10
[launch]
max_restarts = 0
progress = false
[fault]
rank = 1
at_step = 2
mode = "stall"
[train]
steps = 4
seq_len = 60
"""


def test_stalled_collective_times_out_and_restarts_are_bounded(local_ray, tmp_path):
    path = tmp_path / "probe.toml"
    path.write_text(PROBE)
    cfg = config.load(path)
    cfg.job.out = str(tmp_path / "stalled")
    # rank 1 hangs after step 2; rank 0's next all-reduce gives up after 10 s naming itself and
    # the op; with no restarts left the job fails with that reason (and the hung rank is killed)
    with pytest.raises(LaunchError) as err:
        launch(cfg)
    msg = str(err.value)
    assert "gave up after 0 restart(s)" in msg
    assert "rank 0: CollectiveError: rank 0: all_reduce over a group of 2 ranks failed" in msg
    final = [r for r in read_records(tmp_path / "stalled") if r["type"] == "final"]
    assert final[-1]["status"] == "failed"
    steps = [r["step"] for r in read_records(tmp_path / "stalled") if r["type"] == "step"]
    assert steps == [1, 2]


def test_workers_on_jemalloc(local_ray, tmp_path):
    """launch.allocator = "jemalloc": both workers start with ray's libjemalloc.so preloaded
    (their own /proc/self/maps says so) and train; a name it does not know is refused."""
    path = tmp_path / "probe.toml"
    path.write_text(PROBE.split("[fault]")[0] + '[train]\nsteps = 2\nseq_len = 60\n')
    cfg = config.load(path, ["launch.allocator=jemalloc"])
    cfg.job.out = str(tmp_path / "jemalloc")
    assert launch(cfg)["status"] == "completed"
    started = _events(tmp_path / "jemalloc", "worker_started")
    assert [(e["rank"], e["allocator"]) for e in sorted(started, key=lambda e: e["rank"])] == [
        (0, "jemalloc"), (1, "jemalloc")]
    with pytest.raises(ValueError, match="launch.allocator = 'tcmalloc': expected one of"):
        config.load(path, ["launch.allocator=tcmalloc"])


def test_same_job_under_torchrun(baseline, tmp_path):
    _, ref = baseline
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "seqshard.launch.cli", "worker", str(DEMO), "--out", str(out)]
    for item in SHORT:
        cmd += ["--set", item]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = [r for r in read_records(out) if r["type"] == "final"][-1]
    assert final["status"] == "completed" and final["steps"] == 6
    assert final["digest"] == ref["digest"]  # the same worker entry as under Ray
    assert final["exactness"] < 1e-5
    assert "**completed**" in proc.stdout
