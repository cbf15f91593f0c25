"""Resuming a checkpoint never executes code from it (issue 14 item 6).

Anyone who can write the shared job.out can replace a checkpoint file and recompute the
manifest's sha256, so the checksum proves nothing about intent. A planted pickle payload must
be refused on every rank with a ValueError naming the file (not retried by the launcher), and
its code must never run. Clean checkpoints still resume bit-identically under ZeRO 0-3.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import msgpack
import pytest

from tests.harness import mesh, run_ranks

JOB = """
[job]
name = "safety"
task = "train"
out = "{out}"
[mesh]
workers = 2
[launch]
checkpoint_every = 2
keep_checkpoints = 2
progress = false
[model]
kind = "transformer"
dim = 16
num_layers = 1
num_heads = 2
vocab_size = 32
[train]
steps = 2
batch_size = 1
seq_len = 16
lr = 1e-2
warmup_steps = 1
zero_stage = {zero_stage}
layout = "zigzag"
strategy = "ring"
task = "random"
vocab_size = 32
"""

MODEL = dict(dim=16, num_layers=1, num_heads=2)
TRAIN = dict(batch_size=1, seq_len=16, lr=1e-2, warmup_steps=1, steps=3, vocab_size=32,
             task="random")


class Payload:
    """What an attacker plants: unpickling it calls open(marker, 'w'), creating the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _job(path: Path, out: Path, zero_stage: int):
    from seqshard.launch import config

    path.write_text(JOB.format(out=out, zero_stage=zero_stage))
    return config.load(path)


def _train_and_save(rank, world, job: str):
    """Two steps of the job, then the worker's atomic, manifest-sealed checkpoint."""
    from seqshard.launch import config, worker
    from seqshard.launch.tasks import make_task

    cfg = config.load(job)
    task = make_task(cfg, mesh())
    for _ in range(2):
        task.step()
    worker.save(task, cfg, mesh(), 2)
    return task.digest()


def _resume(rank, world, job: str, marker: str):
    """The worker's resume (manifest check, then task.load); what it raised, if anything."""
    from seqshard.launch import config, worker
    from seqshard.launch.tasks import make_task

    cfg = config.load(job)
    task = make_task(cfg, mesh())
    try:
        step = worker.resume(task, cfg, mesh(), None)
    except Exception as err:  # noqa: BLE001 - the test inspects the type and message
        return type(err), str(err), Path(marker).exists()
    return None, f"resumed at step {step}", Path(marker).exists()


def _plant(folder: Path, victim: str, marker: Path) -> Path:
    """Replace `victim` with a pickle payload and re-seal the manifest, as an attacker would."""
    import torch

    from seqshard.launch.checkpoint import MANIFEST, sha256_file

    path = next(folder.rglob(victim))
    torch.save({"module": Payload(marker)}, path)  # a well-formed torch zip file
    manifest = msgpack.unpackb((folder / MANIFEST).read_bytes())
    rel = path.relative_to(folder).as_posix()
    manifest["files"][rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (folder / MANIFEST).write_bytes(msgpack.packb(manifest))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ZeRO-1 checkpoint of a 2-rank job (model file read by all ranks, optimizer by one)."""
    root = tmp_path_factory.mktemp("saved")
    job = _job(root / "job.toml", root / "out", zero_stage=1)
    run_ranks(_train_and_save, 2, str(root / "job.toml"))
    return root, job


# the model file every rank loads; an optimizer shard only rank 1 loads
@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt",
                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_planted_pickle_payload_is_refused_on_every_rank(saved, tmp_path, victim):
    root, _ = saved
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    job = tmp_path / "job.toml"
    _job(job, out, zero_stage=1)
    marker = tmp_path / "PWNED"
    planted = _plant(out / "checkpoints" / "step-00000002", victim, marker)
    from seqshard.launch.checkpoint import verify

    assert verify(planted.parents[1]) is None  # the re-sealed manifest vouches for the payload

    results = run_ranks(_resume, 2, str(job), str(marker))
    assert not marker.exists(), "the checkpoint's pickle payload was executed"
    for rank, (kind, message, ran) in enumerate(results):
        assert not ran, f"rank {rank}: the payload ran"
        # a ValueError on every rank, even those that never read the file, so none hangs in
        # DeepSpeed's collectives waiting for the rank that failed
        assert kind is not None and issubclass(kind, ValueError), (rank, kind, message)
        assert victim in message, (rank, message)


def _digests_across_resume(rank, world, stages, directory: str):
    """Per ZeRO stage: digest of 3 straight steps vs 1 step, save, a fresh Trainer, load, 2."""
    from seqshard.launch.tasks import state_digest
    from seqshard.models import Trainer

    def digest(trainer):
        state = trainer.full_state_dict()
        return state_digest(state[k] for k in sorted(state))

    out = {}
    for stage in stages:
        config = dict(TRAIN, zero_stage=stage)
        straight = Trainer("transformer", MODEL, config, mesh())
        for _ in range(3):
            straight.step()
        first = Trainer("transformer", MODEL, config, mesh())
        first.step()
        folder = Path(directory) / f"zero{stage}"
        if rank == 0:
            folder.mkdir()
        import torch.distributed as dist

        dist.barrier()
        first.save(str(folder))
        resumed = Trainer("transformer", MODEL, config, mesh())
        resumed.load(str(folder))
        for _ in range(2):
            resumed.step()
        out[stage] = (digest(straight), digest(resumed), resumed.step_count)
    return out


def test_clean_resume_is_bit_identical_under_every_zero_stage(tmp_path):
    # the allowlist is complete: ZeRO 1-3 optimizer files carry DeepSpeed's own classes
    for rank, out in enumerate(run_ranks(_digests_across_resume, 2, [0, 1, 2, 3], str(tmp_path))):
        for stage, (straight, resumed, step) in out.items():
            assert step == 3
            assert resumed == straight, f"rank {rank}, ZeRO-{stage}: resume changed the state"


def test_bad_latest_tag_is_refused(tmp_path):
    from seqshard.models.trainer import Trainer

    (tmp_path / "latest").write_text("../../elsewhere")
    with pytest.raises(ValueError, match="elsewhere"):
        Trainer._latest_tag(str(tmp_path))


def _probe_resume(rank, world, directory: str, marker: str):
    """Save the probe, load it cleanly, then rank 1 plants a payload in its own file and both
    ranks load again; returns (clean step, what the second load raised)."""
    import torch
    import torch.distributed as dist

    from seqshard.launch.config import ProbeConfig
    from seqshard.launch.tasks import ProbeTask

    cfg = ProbeConfig(seq_len=8, dim=4)
    task = ProbeTask(cfg, mesh())
    task.step()
    task.save(Path(directory))
    fresh = ProbeTask(cfg, mesh())
    fresh.load(Path(directory))
    clean = fresh.step_count
    dist.barrier()  # both loaded before the file changes
    if rank == 1:
        torch.save({"w": Payload(Path(marker)), "step": 0},
                   Path(directory) / "probe-rank00001.pt")
    dist.barrier()
    try:
        fresh.load(Path(directory))
    except Exception as err:  # noqa: BLE001 - the test inspects the type and message
        return clean, type(err), str(err)
    return clean, None, "loaded"


def test_probe_task_refuses_a_pickle_payload_on_every_rank(tmp_path):
    marker = tmp_path / "PWNED"
    results = run_ranks(_probe_resume, 2, str(tmp_path), str(marker))
    assert not marker.exists(), "the probe checkpoint's pickle payload was executed"
    for rank, (clean, kind, message) in enumerate(results):
        assert clean == 1
        assert kind is not None and issubclass(kind, ValueError), (rank, kind, message)
    assert "probe-rank00001.pt" in results[1][2] and "io.open" in results[1][2]
    assert "rank(s) [1]" in results[0][2], results[0][2]
