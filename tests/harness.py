"""Run a test function on P gloo ranks on the CPU, reusing rank processes across tests.

    from tests.harness import run_ranks, mesh

    def _check(rank, world, n):            # module-level, so the rank processes can import it
        m = mesh()                          # the rank's Mesh (cached per degrees)
        ...                                 # assert freely; a failure is reported per rank
        return some_picklable_value

    def test_something():
        results = run_ranks(_check, 2, n=16)   # [rank0_result, rank1_result]

A pool of P processes per world size stays alive for the whole pytest session: each joined
the process group once (through seqshard.dist.init_process_group, i.e. DeepSpeed's comm),
so hundreds of cases do not each pay for starting torch and a group. If any rank fails or
the call times out, the pool is torn down (its group may be wedged) and the next call
starts a fresh one. Failures raise AssertionError carrying every failing rank's traceback.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass

from seqshard.dist import free_port, local_rank_env

TASK_TIMEOUT_S = float(os.environ.get("SEQSHARD_TEST_TIMEOUT", "300"))
COLLECTIVE_TIMEOUT_S = 60.0

_pools: dict[int, "_Pool"] = {}
_meshes: dict = {}  # inside a rank process: Mesh objects by degrees


def mesh(*, dp: int = 1, ulysses: int = 1, ring: int | None = None):
    """This rank's Mesh with the given degrees (call inside a function run by `run_ranks`)."""
    from seqshard.dist import Mesh

    key = (dp, ulysses, ring)
    if key not in _meshes:
        _meshes[key] = Mesh.new(dp=dp, ulysses=ulysses, ring=ring, timeout_s=COLLECTIVE_TIMEOUT_S)
    return _meshes[key]


def _worker_main(rank: int, world: int, port: int, tasks, results) -> None:
    os.environ.update(local_rank_env(rank, world, port), DS_ACCELERATOR="cpu")
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from seqshard.dist import init_process_group

    try:
        init_process_group("gloo", timeout_s=COLLECTIVE_TIMEOUT_S)
        results.put((rank, "ready", None))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs, sys_path = task
        for p in sys_path:
            if p not in sys.path:
                sys.path.append(p)
        try:
            torch.manual_seed(1234)
            out = fn(rank, world, *args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))


class _Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker_main, args=(r, world, port, self.tasks[r], self.results),
                        daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self._collect("ready", TASK_TIMEOUT_S)

    def _collect(self, what: str, timeout: float, allow_dead: bool = False) -> list:
        out: list = [None] * self.world
        errors: dict[int, str] = {}
        pending = set(range(self.world))
        deadline = time.monotonic() + timeout
        while pending:
            try:
                rank, status, payload = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = {r for r in pending if not self.procs[r].is_alive()}
                if dead:
                    if not allow_dead:
                        codes = {r: self.procs[r].exitcode for r in sorted(dead)}
                        raise AssertionError(f"{what}: ranks died (exit codes {codes})") from None
                    for r in dead:
                        out[r] = RankDied(r, self.procs[r].exitcode)
                    pending -= dead
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{what}: ranks {sorted(pending)} of {self.world} gave no answer "
                        f"within {timeout:.0f} s"
                    ) from None
                continue
            pending.discard(rank)
            if status == "error":
                errors[rank] = payload
            else:
                out[rank] = payload
        if errors:
            report = "\n".join(f"--- rank {r} of {self.world} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{what} failed on ranks {sorted(errors)}:\n{report}")
        return out

    def run(self, fn, args, kwargs, timeout: float, allow_dead: bool = False) -> list:
        task = (fn, args, kwargs, list(sys.path))
        for q in self.tasks:
            q.put(task)
        return self._collect(getattr(fn, "__name__", "task"), timeout, allow_dead)

    def close(self) -> None:
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                try:
                    q.put(None)
                except Exception:
                    pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


@dataclass(frozen=True)
class RankDied:
    """Stands in an isolated run's results for a rank process that exited without answering."""

    rank: int
    exitcode: int | None


def run_ranks(
    fn, world: int, *args, timeout: float = TASK_TIMEOUT_S, isolated: bool = False, **kwargs
) -> list:
    """Run `fn(rank, world, *args, **kwargs)` on `world` gloo ranks; return every rank's result.

    isolated=True runs on a throw-away pool (for tests that kill ranks or wedge a group); there
    a rank that dies yields a `RankDied` in the results instead of failing the call.
    """
    if isolated:
        pool = _Pool(world)
        try:
            return pool.run(fn, args, kwargs, timeout, allow_dead=True)
        finally:
            pool.close()
    pool = _pools.get(world)
    if pool is None:
        pool = _pools[world] = _Pool(world)
    try:
        return pool.run(fn, args, kwargs, timeout)
    except BaseException:
        _pools.pop(world, None)
        pool.close()
        raise


@atexit.register
def shutdown_pools() -> None:
    for world in list(_pools):
        _pools.pop(world).close()
