"""Resume says so, and only failures a retry can fix are retried (issue 14 item 11), on real Ray.

One probe job (2 workers, 4 steps, a checkpoint every step) goes through the lifecycle in one
output folder: killed on its first attempt (retried, resumes), rerun (says it resumes at 4/4),
rerun with another config (the driver refuses before Ray; launch() without the driver's check
fails in the workers, once), rerun with --fresh (step 0, the old run moved aside).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from seqshard.launch import cli, config  # noqa: E402
from seqshard.launch.ray_launcher import LaunchError, launch  # noqa: E402
from seqshard.launch.records import read_records  # noqa: E402

PROBE = """
[job]
name = "probe"
task = "probe"
[mesh]
workers = 2
collective_timeout_s = 30
[launch]
max_restarts = 2
checkpoint_every = 1
progress = false
poll_s = 0.2
[train]
steps = 4
seq_len = 60
"""


def _last_run(out: Path) -> list[dict]:
    """The records of the latest driver start (records.msgpack is appended across runs)."""
    records = read_records(out)
    start = max(i for i, r in enumerate(records) if r["type"] == "meta")
    return records[start:]


def _events(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r["type"] == "event" and r["event"] == name]


def _assert_failed_once(out: Path) -> None:
    records = _last_run(out)
    assert records[-1]["status"] == "failed" and records[-1]["attempts"] == 1
    assert len(_events(records, "failure")) == 1 and not _events(records, "restart")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.toml"
    path.write_text(PROBE)
    return path


def test_resume_lifecycle(local_ray, probe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run = ["run", str(probe), "--out", str(out)]
    # a killed worker is retried and the retry resumes; a 1-CPU machine warns once, up front
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert cli.main(run + ["--set", "fault.rank=1", "--set", "fault.at_step=2"]) == 0
    monkeypatch.undo()
    io = capsys.readouterr()
    lines = io.out.strip().splitlines()
    assert lines[0] == f"new run in {out}" and lines[-1] == f"seqshard: output in {out}"
    assert io.err.count("warning: 2 workers x 1.0 CPU = 2.0 CPUs, but this machine has 1 CPU") == 1
    records = _last_run(out)
    assert records[-1]["type"] == "final" and records[-1]["attempts"] == 2
    assert [e["step"] for e in _events(records, "resumed")] == [1]  # step 2 was not saved

    # the same job again: nothing to do, and the first line says why
    assert cli.main(run) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"resuming {out} at step 4/4; use --out or --fresh to start over"
    assert _last_run(out)[-1]["resumed_from"] == 4

    # another config over those checkpoints: the driver refuses before any worker starts ...
    n_records = len(read_records(out))
    assert cli.main(run + ["--set", "train.dim=5"]) == 2
    err = capsys.readouterr().err
    assert "train.dim: 6 in the checkpoint, 5 now" in err and len(err.strip().splitlines()) == 1
    assert len(read_records(out)) == n_records
    # ... and launch() alone has the workers refuse it, on one attempt, not three
    cfg = config.load(probe, ["train.dim=5"])
    cfg.job.out = str(out)
    with pytest.raises(LaunchError, match="not retryable.*train.dim: 6 in the checkpoint, 5 now"):
        launch(cfg)
    _assert_failed_once(out)

    # --fresh: step 0 under the new config, the old run kept aside
    assert cli.main(run + ["--set", "train.dim=5", "--fresh"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    (old,) = out.glob("previous-*")
    assert first == f"fresh start in {out}; the previous run is in {old}"
    assert {"checkpoints", "records.msgpack", "summary.md"} <= {p.name for p in old.iterdir()}
    records = read_records(out)
    assert records[0]["type"] == "meta" and records[-1]["resumed_from"] == 0
    assert records[-1]["attempts"] == 1


def test_unwritable_checkpoints_fail_once(local_ray, probe, tmp_path):
    # root ignores permissions; a regular file where the checkpoint folder goes stops it too
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    cfg = config.load(probe)
    cfg.job.out = str(out)
    with pytest.raises(LaunchError, match="not retryable.*NotADirectoryError"):
        launch(cfg)
    _assert_failed_once(out)
