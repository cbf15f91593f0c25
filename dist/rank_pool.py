"""A pool of local rank processes that joined one gloo group once and then run functions.

    pool = RankPool(2)                          # 2 spawned ranks, group joined once
    results = pool.run(fn, (n,), timeout_s=60)  # fn(rank, world, n) on every rank
    pool.close()

Starting torch and a process group costs seconds per process; the test harness runs hundreds
of cases and the benchmark runner dozens of points per world size, so both keep a pool. `fn`
must be importable by the ranks (a module-level function). A rank that raises, exits or stays
silent past the timeout makes `run` raise (`RankFailure` / `TimeoutError`); the group may then
be wedged in a half-finished collective, so the caller closes the pool and starts a new one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from .process_group import free_port, local_rank_env


@dataclass(frozen=True)
class RankDied:
    """Stands in `run(..., allow_dead=True)`'s results for a rank that exited without answering."""

    rank: int
    exitcode: int | None


class RankFailure(RuntimeError):
    """Ranks raised or died. The first line names them and the first error; every rank's
    traceback follows. `errors`: {rank: traceback or exit description}."""

    def __init__(self, what: str, errors: dict[int, str]):
        self.errors = errors
        first = errors[min(errors)].strip().splitlines()[-1] if errors else ""
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        super().__init__(f"{what} failed on rank(s) {sorted(errors)}: {first}\n{report}")


def _rank_main(rank: int, world: int, port: int, threads: int, timeout_s: float,
               setup: Callable[[], None] | None, deepspeed: bool, tasks, results) -> None:
    if setup is not None:
        setup()  # e.g. allocator settings, before the rank allocates anything large
    os.environ.update(local_rank_env(rank, world, port))
    import torch

    torch.set_num_threads(threads)
    from .process_group import init_process_group

    try:
        init_process_group("gloo", timeout_s=timeout_s, deepspeed=deepspeed)
        results.put((rank, "ok", None))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs, sys_path = task
        for p in sys_path:  # the caller's import path, so `fn`'s module imports here too
            if p not in sys.path:
                sys.path.append(p)
        try:
            results.put((rank, "ok", fn(rank, world, *args, **kwargs)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))


class RankPool:
    """`world` spawned processes in one gloo group (RANK / WORLD_SIZE / MASTER_* set for each).

    threads: torch threads per rank (default: this machine's cores split over the ranks).
    timeout_s: the group's collective timeout. setup: a module-level function each rank calls
    first. deepspeed: join through DeepSpeed's comm (False: torch.distributed only, DeepSpeed
    never imported). On a CUDA machine each rank's current device is GPU LOCAL_RANK modulo
    the device count (ranks may share a GPU: gloo stages CUDA tensors through host memory).
    Raises RankFailure / TimeoutError when a rank cannot join within start_timeout_s.
    """

    def __init__(self, world: int, *, threads: int | None = None, timeout_s: float = 60.0,
                 start_timeout_s: float = 300.0, setup: Callable[[], None] | None = None,
                 deepspeed: bool = True):
        if world < 1:
            raise ValueError(f"RankPool world={world} must be >= 1")
        threads = threads or max(1, (os.cpu_count() or 1) // world)
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=_rank_main, daemon=True,
                                  args=(r, world, port, threads, timeout_s, setup, deepspeed,
                                        self.tasks[r], self.results))
                      for r in range(world)]
        for p in self.procs:
            p.start()
        try:
            self._collect(f"starting {world} rank(s)", start_timeout_s)
        except BaseException:
            self.close()
            raise

    def run(self, fn: Callable, args: tuple = (), kwargs: dict | None = None, *,
            timeout_s: float, allow_dead: bool = False, fail_fast: bool = False) -> list:
        """`fn(rank, world, *args, **kwargs)` on every rank; returns the results by rank.

        allow_dead: a rank that exits yields RankDied instead of raising. fail_fast: raise at
        the first error instead of waiting for every rank (the others may be stuck in a
        collective the failed rank never joins, until their own timeout)."""
        task = (fn, tuple(args), dict(kwargs or {}), list(sys.path))
        for q in self.tasks:
            q.put(task)
        return self._collect(getattr(fn, "__name__", "task"), timeout_s, allow_dead, fail_fast)

    def _collect(self, what: str, timeout_s: float, allow_dead: bool = False,
                 fail_fast: bool = False) -> list:
        out: list = [None] * self.world
        errors: dict[int, str] = {}
        pending = set(range(self.world))
        deadline = time.monotonic() + timeout_s
        while pending:
            try:
                rank, status, payload = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = {r for r in pending if not self.procs[r].is_alive()}
                for r in sorted(dead):
                    if allow_dead:
                        out[r] = RankDied(r, self.procs[r].exitcode)
                    else:
                        errors[r] = f"rank process exited with code {self.procs[r].exitcode}"
                pending -= dead
                if errors and fail_fast:
                    break
                if pending and time.monotonic() > deadline:
                    raise TimeoutError(f"{what}: rank(s) {sorted(pending)} of {self.world} gave "
                                       f"no answer within {timeout_s:.0f} s") from None
                continue
            pending.discard(rank)
            if status == "error":
                errors[rank] = payload
                if fail_fast:
                    break
            else:
                out[rank] = payload
        if errors:
            raise RankFailure(what, errors)
        return out

    def close(self) -> None:
        """Stop the ranks: ask politely, then kill what is left (only this pool's children)."""
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
