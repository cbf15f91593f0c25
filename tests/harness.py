"""Run a test function on P gloo ranks on the CPU, reusing rank processes across tests.

    from tests.harness import run_ranks, mesh

    def _check(rank, world, n):            # module-level, so the rank processes can import it
        m = mesh()                          # the rank's Mesh (cached per degrees)
        ...                                 # assert freely; a failure is reported per rank
        return some_picklable_value

    def test_something():
        results = run_ranks(_check, 2, n=16)   # [rank0_result, rank1_result]

A pool of P processes per world size (`seqshard.dist.RankPool`) stays alive for the whole
pytest session: each joined the process group once (through DeepSpeed's comm),
so hundreds of cases do not each pay for starting torch and a group. If any rank fails or
the call times out, the pool is torn down (its group may be wedged) and the next call
starts a fresh one. Failures raise AssertionError carrying every failing rank's traceback.

`device()` is the device a rank puts its tensors on: the CPU, or with SEQSHARD_TEST_DEVICE=cuda
the rank's CUDA device (GPU LOCAL_RANK modulo the GPU count, set when the rank joined; two
ranks may share GPU 0, the gloo collectives staging through host memory).
"""

from __future__ import annotations

import atexit
import os

from seqshard.dist.rank_pool import RankDied, RankFailure, RankPool

__all__ = ["RankDied", "device", "mesh", "run_ranks"]

TASK_TIMEOUT_S = float(os.environ.get("SEQSHARD_TEST_TIMEOUT", "300"))
COLLECTIVE_TIMEOUT_S = float(os.environ.get("SEQSHARD_COLLECTIVE_TIMEOUT", "60"))
DEVICE_ENV = "SEQSHARD_TEST_DEVICE"  # 'cpu' (default) or 'cuda'

_pools: dict[int, RankPool] = {}
_meshes: dict = {}  # inside a rank process: Mesh objects by degrees


def mesh(*, dp: int = 1, ulysses: int = 1, ring: int | None = None):
    """This rank's Mesh with the given degrees (call inside a function run by `run_ranks`)."""
    from seqshard.dist import Mesh

    key = (dp, ulysses, ring)
    if key not in _meshes:
        _meshes[key] = Mesh.new(dp=dp, ulysses=ulysses, ring=ring, timeout_s=COLLECTIVE_TIMEOUT_S,
                                device=device())
    return _meshes[key]


def device():
    """The device this process's test tensors go on (SEQSHARD_TEST_DEVICE: 'cpu' or 'cuda')."""
    import torch

    kind = os.environ.get(DEVICE_ENV, "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise ValueError(f"{DEVICE_ENV}={kind!r}: expected 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_ENV}=cuda but this process sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


def _seeded(rank: int, world: int, fn, *args, **kwargs):
    """Every case starts from the same seed, whichever cases ran before it on the pool."""
    import torch

    torch.manual_seed(1234)
    return fn(rank, world, *args, **kwargs)


def _new_pool(world: int) -> RankPool:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the ranks inherit it: gloo on the CPU
    try:
        return RankPool(world, timeout_s=COLLECTIVE_TIMEOUT_S, start_timeout_s=TASK_TIMEOUT_S)
    except (RankFailure, TimeoutError) as err:
        raise AssertionError(str(err)) from None


def _run(pool: RankPool, fn, args, kwargs, timeout: float, allow_dead: bool) -> list:
    try:
        return pool.run(_seeded, (fn, *args), kwargs, timeout_s=timeout, allow_dead=allow_dead)
    except (RankFailure, TimeoutError) as err:  # a test failure, with every rank's traceback
        raise AssertionError(str(err).replace("_seeded", getattr(fn, "__name__", "task"), 1)
                             ) from None


def run_ranks(
    fn, world: int, *args, timeout: float = TASK_TIMEOUT_S, isolated: bool = False, **kwargs
) -> list:
    """Run `fn(rank, world, *args, **kwargs)` on `world` gloo ranks; return every rank's result.

    isolated=True runs on a throw-away pool (for tests that kill ranks or wedge a group); there
    a rank that dies yields a `RankDied` in the results instead of failing the call.
    """
    if isolated:
        pool = _new_pool(world)
        try:
            return _run(pool, fn, args, kwargs, timeout, allow_dead=True)
        finally:
            pool.close()
    pool = _pools.get(world)
    if pool is None:
        pool = _pools[world] = _new_pool(world)
    try:
        return _run(pool, fn, args, kwargs, timeout, allow_dead=False)
    except BaseException:
        _pools.pop(world, None)  # its group may be wedged: the next call starts a fresh pool
        pool.close()
        raise


@atexit.register
def shutdown_pools() -> None:
    for world in list(_pools):
        _pools.pop(world).close()
