"""`seqshard eval` end to end on real Ray: a tiny run that evaluates at its end, then the eval
command on its folder; and the command's refusals, which need no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from seqshard.launch import config  # noqa: E402
from seqshard.launch.cli import main  # noqa: E402
from seqshard.launch.eval_cmd import locate, resolve, run_config  # noqa: E402
from seqshard.launch.ray_launcher import launch  # noqa: E402
from seqshard.launch.records import read_records  # noqa: E402

JOB = """
[job]
name = "tiny-eval"
task = "train"
[mesh]
workers = 2
collective_timeout_s = 300
[launch]
progress = false
poll_s = 0.2
[model]
kind = "transformer"
dim = 16
num_layers = 1
num_heads = 2
vocab_size = 32
[train]
steps = 2
batch_size = 1
seq_len = 32
layout = "zigzag"
strategy = "ring"
task = "recall"
recall_pairs = 2
recall_queries = 2
vocab_size = 32
[eval]
at_end = true
lengths = [1, 2]
samples = 1
buckets = 3
passkey_lengths = [1]
passkey_depths = [0.0, 1.0]
passkey_trials = 1
passkey_digits = 2
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path_factory.mktemp("run")
        (out / "job.toml").write_text(JOB)
        cfg = config.load(out / "job.toml")
        cfg.job.out = str(out)
        result = launch(cfg)
        yield out, result
    finally:
        ray.shutdown()


def _evals(out: Path) -> dict[int, list[dict]]:
    by_id: dict[int, list[dict]] = {}
    for r in read_records(out):
        if r["type"] == "eval":
            by_id.setdefault(r["eval_id"], []).append(r)
    return by_id


def test_at_end_then_seqshard_eval_write_numbers_tables_and_pngs(finished_run, capsys):
    out, result = finished_run
    assert result["status"] == "completed" and result["evaluated"] == 3 + 4 + 2  # 64 adds one
    (first,) = _evals(out).values()
    loss = [r for r in first if r["metric"] == "loss_by_position"]
    assert sorted({r["length"] for r in loss}) == [32, 64]
    assert sum(r["tokens"] for r in loss if r["length"] == 64) == 63  # every scored position
    assert all(0 < r["loss"] < 10 for r in loss) and all(r["step"] == 2 for r in first)
    summary = (out / "summary.md").read_text()
    assert "| positions | N = 32 | N = 64 |" in summary and "| 32 | " in summary
    assert (out / "loss_by_position.png").exists() and (out / "passkey.png").exists()

    rc = main(["eval", str(out), "--set", "eval.lengths=[4]", "--set", "eval.passkey_lengths=[]"])
    shown = capsys.readouterr().out
    assert rc == 0, shown
    assert shown.splitlines()[0].startswith("evaluating ") and "at step 2" in shown
    assert shown.rstrip().splitlines()[-1].startswith("seqshard: output in ")
    evals = _evals(out)
    assert len(evals) == 2
    newest = evals[max(evals)]
    assert {r["length"] for r in newest} == {128} and {r["metric"] for r in newest} == {
        "loss_by_position"}
    summary = (out / "summary.md").read_text()
    assert "**evaluated**" in summary and "| positions | N = 128 |" in summary
    assert "steps: 2/2" in summary  # the training part of the summary is kept


def test_eval_finds_checkpoints_and_refuses_another_config(finished_run, tmp_path, capsys):
    out, _ = finished_run
    step_dir = out / "checkpoints" / "step-00000002"
    assert locate(step_dir) == (out, step_dir) and locate(out) == (out, None)
    cfg = config.build(run_config(out))
    assert resolve(cfg, out, None) == (2, step_dir) == resolve(cfg, out, step_dir)
    other = config.build(run_config(out), ["model.dim=32"])
    with pytest.raises(ValueError, match="another config"):
        resolve(other, out, step_dir)
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a seqshard run folder" in capsys.readouterr().err
