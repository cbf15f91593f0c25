"""The worker entry: one function that runs a job on one rank, under any launcher.

The Ray actor, `seqshard worker` under torchrun and the `deepspeed` launcher all end in
`run_worker`. It reads the torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), joins the process group through DeepSpeed's comm (`Mesh.from_env`), resumes from
the newest intact checkpoint, steps the task, checkpoints atomically and reports metrics
through `report` (a Ray actor under Ray, the local Recorder on rank 0 under torchrun).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from seqshard.dist import CollectiveError, Mesh, destroy_process_group

from . import checkpoint as ckpt
from .allocator import running_allocator
from .config import JobConfig, resume_meta, train_config
from .tasks import make_task

Report = Callable[[dict], None]


def _barrier(what: str) -> None:
    # gloo's barrier honours the process group's timeout (mesh.collective_timeout_s)
    try:
        dist.barrier()
    except RuntimeError as err:
        raise CollectiveError(
            f"rank {dist.get_rank()}: barrier ({what}) over {dist.get_world_size()} ranks "
            f"failed (a peer may have died or stalled): {err}"
        ) from err


def _broadcast(value, what: str):
    box = [value]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as err:
        raise CollectiveError(f"rank {dist.get_rank()}: broadcast ({what}) failed: {err}") from err
    return box[0]


def build_mesh(cfg: JobConfig) -> Mesh:
    shape = cfg.mesh.shape()
    backend = None if cfg.mesh.backend == "auto" else cfg.mesh.backend
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != shape.world_size:
        raise ValueError(f"WORLD_SIZE={world} from the launcher, but the config's mesh needs "
                         f"mesh.workers = {cfg.mesh.workers}; launch {cfg.mesh.workers} processes")
    return Mesh.from_env(dp=shape.dp, ulysses=shape.ulysses, ring=shape.ring, backend=backend,
                         timeout_s=cfg.mesh.collective_timeout_s)


def find_resume(cfg: JobConfig, log=None) -> tuple[int, Path] | None:
    """The newest intact checkpoint as (step, folder), or None; ValueError naming the keys if it
    was written by a job with another config (a retry cannot fix that, and loading it would fail
    with a state-dict dump or, worse, load)."""
    found = ckpt.latest_complete(cfg.checkpoint_dir, log=log or (lambda note: None))
    if found is None:
        return None
    saved = ckpt.read_manifest(found[1]).get("meta", {}).get("config")
    if saved is not None:  # checkpoints from before configs were recorded cannot be checked
        diffs = ckpt.meta_diff(saved, resume_meta(cfg))
        if diffs:
            raise ValueError(f"{cfg.out_dir} holds a checkpoint (step {found[0]}) of a job with "
                             f"another config: {'; '.join(diffs)}; use --fresh to start over "
                             f"there or --out for another folder")
    return found


def resume(task, cfg: JobConfig, mesh: Mesh, emit: Report | None) -> int:
    """Load the newest intact checkpoint (rank 0 picks it for everyone); return its step."""
    found, error = None, None
    if mesh.global_rank == 0:
        skipped: list[str] = []
        try:
            found = find_resume(cfg, log=skipped.append)
        except ValueError as err:
            error = str(err)
        for note in skipped:
            if emit:
                emit({"type": "checkpoint_skipped", "reason": note})
        found = (found[0], str(found[1])) if found else None
    found, error = _broadcast((found, error), "resume point")
    if error is not None:  # on every rank, so none waits for the others in a collective
        raise ValueError(error)
    if found is None:
        return 0
    step, path = found
    task.load(Path(path))
    return step


def save(task, cfg: JobConfig, mesh: Mesh, step: int) -> None:
    """Every rank writes into the temp folder; rank 0 seals it with the manifest and renames."""
    root = cfg.checkpoint_dir
    if mesh.global_rank == 0:
        ckpt.prepare(root, step)
    _barrier(f"checkpoint {step}: prepare")
    task.save(ckpt.temp_dir(root, step))
    _barrier(f"checkpoint {step}: write")
    if mesh.global_rank == 0:
        meta = {"job": cfg.job.name, "config": resume_meta(cfg)}  # checked on resume
        ckpt.commit(root, step, world_size=mesh.world_size, meta=meta)
        ckpt.prune(root, cfg.launch.keep_checkpoints)
    _barrier(f"checkpoint {step}: commit")


def _maybe_fail(cfg: JobConfig, rank: int, step: int, attempt: int) -> None:
    fault = cfg.fault
    if not (fault.rank == rank and fault.at_step == step and fault.on_attempt == attempt):
        return
    sys.stdout.flush()
    if fault.mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no goodbye
    while True:  # "stall": alive but silent, like a hung kernel or a wedged NIC
        time.sleep(3600)


def run_worker(cfg: JobConfig, *, attempt: int = 0, report: Report | None = None,
               evaluate: tuple[int, str] | None = None, generate: dict | None = None) -> dict:
    """Run the job on this rank; returns this rank's result (digest, exactness, steps).

    evaluate: (step, checkpoint folder) to load and evaluate instead of training (`seqshard
    eval`); otherwise the job trains, and evaluates after its last step when eval.at_end.
    generate: a `seqshard generate` spec (launch/generate_run.py): load its checkpoint and
    generate instead; the new token ids are the result's "generated".

    Example (after `torchrun --nproc_per_node 2 ...` set the environment):
        >>> from seqshard.launch import config, worker
        >>> result = worker.run_worker(config.load("launch/configs/demo.toml"))
    """
    mesh = build_mesh(cfg)
    rank = mesh.global_rank
    emit = report if (report is not None and rank == 0) else None
    if report is not None:
        report({"type": "worker_started", "rank": rank, "pid": os.getpid(),
                "host": socket.gethostname(), "attempt": attempt,
                "allocator": running_allocator()})
    task = make_task(cfg, mesh)
    loaded = evaluate if generate is None else (generate["step"], generate["checkpoint"])
    if loaded is not None:
        start = step = int(loaded[0])
        task.load(Path(loaded[1]))
        check_len = 0
    else:
        start, step = _train(task, cfg, mesh, attempt, emit)
        check_len = cfg.job.exactness_seq_len
    exactness = task.exactness_check(check_len) if check_len > 0 else None
    evaluated, generated = 0, None
    if generate is not None:
        from .generate_run import run_generation

        generated = run_generation(task, generate, emit)
    elif evaluate is not None or (cfg.job.task == "train" and cfg.eval.get("at_end", False)):
        evaluated = run_evaluation(task, cfg, step, emit)
    result = {"rank": rank, "steps": step, "resumed_from": start, "digest": task.digest(),
              "exactness": exactness, "exactness_seq_len": check_len, "mesh": mesh.describe(),
              "evaluated": evaluated, "generated": generated}
    _barrier("finish")
    destroy_process_group()
    return result


def _train(task, cfg: JobConfig, mesh: Mesh, attempt: int,
           emit: Report | None) -> tuple[int, int]:
    """Resume, then step and checkpoint to train.steps; returns (step resumed from, last)."""
    total = train_config_steps(cfg)
    start = resume(task, cfg, mesh, emit)
    if start and emit:
        emit({"type": "resumed", "step": start, "attempt": attempt})
    every = cfg.launch.checkpoint_every
    step = start
    while step < total:
        metrics = task.step()
        step += 1
        metrics.update(type="step", step=step, attempt=attempt)
        if emit:
            emit(_plain(metrics))
        _maybe_fail(cfg, mesh.global_rank, step, attempt)
        if (every and step % every == 0) or step == total:
            save(task, cfg, mesh, step)
    return start, step


def run_evaluation(task, cfg: JobConfig, step: int, emit: Report | None) -> int:
    """The [eval] section on every rank; rank 0 reports each number as an "eval" record,
    stamped with the trained step and an id shared by this evaluation's records."""
    started = time.time()
    records = task.evaluate(cfg.eval)
    if emit:
        eval_id = int(started * 1000)
        for record in records:
            emit(_plain({**record, "step": step, "eval_id": eval_id}))
        emit({"type": "evaluated", "step": step, "records": len(records),
              "seconds": round(time.time() - started, 1)})
    return len(records)


def train_config_steps(cfg: JobConfig) -> int:
    return int(train_config(cfg).steps)


def _plain(metrics: dict) -> dict:
    """Metrics as msgpack-able Python scalars (tensors -> floats)."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        out[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return out


def main_from_env(cfg: JobConfig) -> dict:
    """`seqshard worker`: the job under torchrun / deepspeed; rank 0 records and prints."""
    from .records import Recorder, tensorboard_problem

    if cfg.log.tensorboard and tensorboard_problem():  # on every rank, before any joins
        raise ValueError(tensorboard_problem())

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
                              or int(cfg.launch.cpus_per_worker)))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    recorder = None
    if rank == 0:
        recorder = Recorder(cfg.out_dir, run_meta(cfg, launcher="torchrun"),
                            train_config_steps(cfg), progress=cfg.launch.progress,
                            tensorboard=cfg.log.tensorboard)
    report = recorder.add if recorder else (lambda record: None)
    result = run_worker(cfg, attempt=attempt, report=report)
    if recorder:
        summary = recorder.finish({"status": "completed", "attempts": attempt + 1, **result})
        print(summary.read_text())
    return result


def run_meta(cfg: JobConfig, launcher: str) -> dict:
    shape = cfg.mesh.shape()
    return {"name": cfg.job.name, "task": cfg.job.task, "model_kind": cfg.model.get("kind"),
            "workers": shape.world_size, "dp": shape.dp, "ulysses": shape.ulysses,
            "ring": shape.ring, "backend": cfg.mesh.backend, "launcher": launcher,
            "config": cfg.to_dict()}
