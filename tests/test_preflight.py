"""Config errors a worker would hit, found by config.load / the cli before anything starts.

Each case here passed config.load (or reached Ray) before issue 14 item 12; none starts Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from seqshard.launch import checkpoint as ckpt
from seqshard.launch import cli, config

DEMO = Path(__file__).resolve().parents[1] / "launch" / "configs" / "demo.toml"


@pytest.mark.parametrize("override, names", [
    # strategy=ulysses splits heads over the whole sp group (2 ranks), not over mesh.ulysses
    (["train.strategy=ulysses", "model.num_heads=3", "model.dim=48"],
     ["model.num_heads = 3", "Ulysses degree 2"]),
    # FIT's groups run on contiguous shards only
    (["model.kind=fit", "train.layout=zigzag"], ["zigzag", "fit", "contiguous"]),
    # a layout set in [model] (as sweep variants do) is the one the length must split over
    (["train.layout=contiguous", "model.layout=zigzag", "train.seq_len=66"],
     ["train.seq_len = 66", "zigzag layout of model.layout", "multiple of 4"]),
    # FIT's groups stay whole on a rank: 66 tokens on 2 ranks is 33 per rank
    (["model.kind=fit", "model.group_size=8", "train.layout=contiguous", "train.seq_len=66"],
     ["33 tokens", "model.group_size = 8"]),
    # ring attention never uses the Ulysses split: the summary would report a mesh that did not run
    (["mesh.ulysses=2"], ["mesh.ulysses = 2", "strategy='ring'"]),
    # auto picks ring when heads do not divide, which drops mesh.ulysses just as silently
    (["mesh.ulysses=2", "train.strategy=auto", "model.num_heads=3", "model.dim=48"],
     ["mesh.ulysses = 2", "model.num_heads = 3"]),
])
def test_worker_only_errors_are_found_by_load(override, names):
    with pytest.raises(ValueError) as err:
        config.load(DEMO, override)
    for name in names:
        assert name in str(err.value), (name, str(err.value))


@pytest.mark.parametrize("override, hint", [
    ("mesh.wrokers=2", "did you mean mesh.workers?"),
    ("job.nmae=x", "did you mean job.name?"),
    ("launch.max_restart=1", "did you mean launch.max_restarts?"),
    ("fault.rnak=1", "did you mean fault.rank?"),
    ("train.stepz=2", "did you mean train.steps?"),
    ("model.num_hedas=2", "did you mean model.num_heads?"),
    ("mehs.workers=2", "did you mean [mesh]?"),
])
def test_misspelled_key_suggests_the_closest(override, hint):
    with pytest.raises(ValueError) as err:
        config.load(DEMO, [override])
    assert hint in str(err.value), str(err.value)


def test_more_workers_than_devices_warns_with_the_numbers():
    cfg = config.load(DEMO, ["mesh.workers=4"])
    (line,) = config.resource_warnings(cfg, cpus=2, gpus=0)
    assert "4 workers x 1.0 CPU = 4.0 CPUs" in line and "2 CPUs" in line
    assert config.resource_warnings(cfg, cpus=4, gpus=0) == []
    gpu = config.load(DEMO, ["launch.gpus_per_worker=1"])
    (line,) = config.resource_warnings(gpu, cpus=8, gpus=1)
    assert "2 workers x 1.0 GPU = 2.0 GPUs" in line and "1 GPU" in line


def test_unwritable_output_fails_before_ray(tmp_path, capsys):
    # as root, permissions do not stop a write; a regular file where a folder must go does
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli.main(["run", str(DEMO), "--out", str(blocker / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "not a folder" in lines[0], lines
    assert str(blocker) in lines[0]
    assert not ray.is_initialized()


def _old_checkpoint(out: Path, *overrides: str) -> None:
    old = config.load(DEMO, list(overrides))
    root = out / "checkpoints"
    (ckpt.prepare(root, 4) / "state.bin").write_bytes(b"state")
    ckpt.commit(root, 4, world_size=2, meta={"job": "demo", "config": config.resume_meta(old)})


def test_changed_config_fails_before_ray_naming_the_keys(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _old_checkpoint(out, "model.dim=64", "train.lr=0.01")
    code = cli.main(["run", str(DEMO), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "model.dim: 64 in the checkpoint, 48 now" in err, err
    assert "train.lr" in err and "--fresh" in err and "model.num_layers" not in err
    assert not ray.is_initialized()
    # `seqshard worker` checks on every rank before joining the process group (torchrun
    # would restart the ranks otherwise)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli.main(["worker", str(DEMO), "--out", str(out)])
    assert code == 2 and "model.dim: 64 in the checkpoint, 48 now" in capsys.readouterr().err


def test_longer_run_still_resumes(tmp_path):
    # extending a run is what resuming is for: train.steps may differ, the rest may not
    from seqshard.launch.worker import find_resume

    out = tmp_path / "run"
    _old_checkpoint(out, "train.steps=4")
    cfg = config.load(DEMO, ["train.steps=40"])
    cfg.job.out = str(out)
    assert find_resume(cfg)[0] == 4
