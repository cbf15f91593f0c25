"""A rank that never arrives, dies, or never joins gives an error naming it, not a hang."""

import datetime
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from seqshard.dist import CollectiveError, all_reduce, free_port
from tests.harness import RankDied, run_ranks


def _short_timeout_group(seconds: float):
    import torch.distributed as dist

    return dist.new_group([0, 1], timeout=datetime.timedelta(seconds=seconds))


def _rank_one_fails(rank, world, mode: str, timeout_s: float):
    """Rank 1 skips the collective ('skip') or dies ('die'); rank 0 reports what it saw."""
    from seqshard.dist import RingComm

    group = _short_timeout_group(timeout_s)
    ring_group = _short_timeout_group(timeout_s)  # a fresh group: the first may be wedged
    if rank == 1:
        if mode == "die":
            os._exit(3)
        return "skipped the collective"
    timeout = datetime.timedelta(seconds=timeout_s)
    seen = []
    try:
        all_reduce(torch.ones(3), group, timeout=timeout)
    except CollectiveError as err:
        seen.append(str(err))
    if mode == "skip":  # the batched P2P ring exchange times out the same way
        try:
            RingComm(ring_group, timeout).post(torch.ones(3)).wait()
        except CollectiveError as err:
            seen.append(str(err))
    return seen or "no error"


def test_rank_that_never_arrives_times_out():
    results = run_ranks(_rank_one_fails, 2, "skip", 2.0, isolated=True, timeout=120)
    assert results[1] == "skipped the collective"
    reduce_error, ring_error = results[0]
    assert reduce_error.startswith("rank 0: all_reduce over a group of 2 ranks failed"), results[0]
    assert ring_error.startswith("rank 0: ring_exchange over a group of 2 ranks failed"), results[0]


def test_cuda_device_choice_without_a_gpu():
    from seqshard.dist.process_group import select_cuda_device

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only answers")
    assert select_cuda_device("gloo") is None
    with pytest.raises(ValueError, match="backend='nccl' needs a CUDA device"):
        select_cuda_device("nccl")


def test_rank_that_dies_gives_an_error():
    results = run_ranks(_rank_one_fails, 2, "die", 10.0, isolated=True, timeout=120)
    assert results[1] == RankDied(1, 3)
    (error,) = results[0]
    assert error.startswith("rank 0: all_reduce over a group of 2 ranks failed"), error


def test_rank_that_never_joins_fails_within_the_timeout():
    script = textwrap.dedent(
        """
        from seqshard.dist import Mesh
        try:
            Mesh.from_env(timeout_s=3)
        except RuntimeError as err:
            print("ERROR:", err)
        """
    )
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    # the outer timeout only guards the test run; the error must come from seqshard itself
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "ERROR: rank 0 of 2 could not join the process group" in proc.stdout, proc.stderr[-2000:]
    assert "within 3 s" in proc.stdout


def _rank_one_raises(rank, world, value: int):
    if rank == 1:
        raise ValueError(f"boom {value}")
    return value + rank


def _add_rank(rank, world, value: int):
    return value + rank


def _rank_one_exits(rank, world):
    if rank == 1:
        os._exit(5)
    return rank


def test_rank_pool_names_the_failing_rank_and_stays_usable():
    """RankPool directly (the harness and the bench runner sit on it): the first line of the
    error names the rank and its exception; a plain error leaves the group usable; a rank that
    exits is reported (or stands as RankDied with allow_dead)."""
    from seqshard.dist import RankFailure, RankPool

    with RankPool(2, threads=1, timeout_s=30) as pool:
        with pytest.raises(RankFailure) as info:
            pool.run(_rank_one_raises, (7,), timeout_s=60)
        assert sorted(info.value.errors) == [1]
        assert str(info.value).splitlines()[0] == (
            "_rank_one_raises failed on rank(s) [1]: ValueError: boom 7"), str(info.value)
        assert pool.run(_add_rank, (3,), timeout_s=60) == [3, 4]
        assert pool.run(_rank_one_exits, timeout_s=60, allow_dead=True) == [0, RankDied(1, 5)]

