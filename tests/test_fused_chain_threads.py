"""The fused C chain splits the (batch, head) chains over the rank's intra-op threads (issue 16,
"The native kernel, hardened"): every thread count gives the same bits as one thread and the
torch loop's values, forward, backward and shard_map, in fp32 and fp64, and every worker
thread flushes subnormals as the caller does."""

import contextlib
import os
import shutil
import warnings

import pytest
import torch

from seqshard.ops.delta_rule import chunk, fused_chain
from tests.common import assert_close
from tests.test_delta_rule import make_inputs

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                reason="no C compiler: the torch loop is the only chain here")

THREADS = (1, 2, 3)  # 3 is more threads than B*H = 2 heads in the second shape
SHAPES = ((1, 3), (2, 1))  # (B, H): an uneven split of 3 heads; 2 heads over up to 3 threads
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def split_tiny_chains(monkeypatch):
    """These chains have a few dozen chunk steps: let every thread take even one step, so
    the split really runs at these sizes."""
    monkeypatch.setattr(fused_chain, "MIN_STEPS_PER_THREAD", 1)


@contextlib.contextmanager
def _threads(count: int):
    """torch's intra-op threads for the block: the fused chain's default thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _chain_inputs(B, H, dtype, gate_scale=1.0, seed=5):
    """Chunks of a small random sequence (N = 21, C = 4: a ragged last chunk), a start state,
    and the gradients chain_grads takes."""
    t = make_inputs(B, H, 21, 8, 12, gate=True, h0=True, seed=seed, dtype=dtype)
    t["gate"] = t["gate"] * gate_scale
    inputs = [t[n].detach() for n in ("q", "k", "v", "beta", "gate")]
    ch = chunk.prepare_blocked(inputs, 8 ** -0.5, 4)
    gen = torch.Generator().manual_seed(seed + 1)
    nc = ch.w.shape[0]
    ds_states = torch.randn(nc, B, H, 8, 12, generator=gen, dtype=dtype)
    ds_end = torch.randn(B, H, 8, 12, generator=gen, dtype=dtype)
    return ch, t["initial_state"].detach(), ds_states, ds_end


def _chain(ch, s0, ds_states, ds_end) -> dict[str, torch.Tensor]:
    """Every output of the three chain entry points, on whichever backend takes them."""
    states, deltas, final = chunk.chain_states(s0, ch)
    after, g0 = chunk.chain_grads(ch, ds_states, ds_end)
    a_map, b_map = chunk.shard_map(ch)
    return {"states": states, "deltas": deltas, "final state": final, "grad after": after,
            "grad s0": g0, "map A": a_map, "map B": b_map}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_thread_count_gives_the_same_bits(dtype, monkeypatch):
    """threads 1, 2 and 3 (more than the heads too): bit-identical to each other, and equal to
    the torch loop within rounding."""
    monkeypatch.setenv("SEQSHARD_FUSED_CHAIN", "1")
    assert fused_chain.available(dtype)
    for B, H in SHAPES:
        args = _chain_inputs(B, H, dtype)
        monkeypatch.setenv("SEQSHARD_FUSED_CHAIN", "0")
        loop = _chain(*args)
        monkeypatch.setenv("SEQSHARD_FUSED_CHAIN", "1")
        runs = {}
        for count in THREADS:
            with _threads(count):
                runs[count] = _chain(*args)
        for count, outs in runs.items():
            for name, out in outs.items():
                where = f"{name}, B={B} H={H}, {count} threads"
                assert_close(where, loop[name], out, TOL[dtype])
                assert torch.equal(out, runs[1][name]), f"{where}: not the 1-thread bits"


def test_explicit_thread_counts_match_and_bad_ones_are_refused(monkeypatch):
    """The entry points' `threads` argument (what torch.get_num_threads() gives by default):
    more threads than heads is fine (capped at one per head, and one per
    MIN_STEPS_PER_THREAD chunk steps); zero, negative or non-int counts are a ValueError."""
    ch, s0, _, _ = _chain_inputs(1, 3, torch.float32)
    w, u, kt = (x.flatten(1, 2) for x in (ch.w, ch.u, ch.kt))
    decay = ch.decay.flatten(1, 2)
    nc, BH = w.shape[:2]

    def forward(threads):
        states = s0.new_empty(nc + 1, BH, 8, 12)
        states[0] = s0.flatten(0, 1)
        deltas = u.new_empty(u.shape)
        assert fused_chain.chain_forward(states, deltas, w, u, kt, decay, threads=threads)
        return states, deltas

    one = forward(1)
    for threads in (2, 3, 64):
        for ref, out in zip(one, forward(threads)):
            assert torch.equal(ref, out), f"{threads} threads"
    assert fused_chain._threads(64, BH, nc) == BH  # never more threads than heads
    monkeypatch.setattr(fused_chain, "MIN_STEPS_PER_THREAD", 64)  # short chains: 1 thread
    assert [fused_chain._threads(4, 8, nc) for nc in (4, 8, 16, 32, 64)] == [1, 1, 2, 4, 4]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive int"):
            forward(bad)


def test_worker_threads_flush_subnormals(monkeypatch):
    """A fast-decaying chain drives the map's A into fp32's subnormal range. Flush-to-zero is
    per thread, so a worker that did not set it itself would keep subnormals the caller's
    thread flushes: the split results would differ from one thread's and hold subnormals."""
    monkeypatch.setenv("SEQSHARD_FUSED_CHAIN", "1")
    ch, *_ = _chain_inputs(2, 1, torch.float32, gate_scale=32.0)
    tiny, smallest = torch.finfo(torch.float32).tiny, 2.0 ** -149  # fp32's subnormal range
    ch64 = type(ch)(*(x.double() if torch.is_tensor(x) else x for x in ch))
    a64, _ = chunk.shard_map(ch64)  # the same map unflushed, in fp64
    assert ((a64.abs() < tiny) & (a64.abs() > smallest)).any(), "the case reaches no subnormals"
    maps = {}
    for count in THREADS:
        with _threads(count):
            maps[count] = chunk.shard_map(ch)[0]
    for count, a_map in maps.items():
        assert not ((a_map.abs() < tiny) & (a_map != 0)).any(), f"{count} threads: subnormals"
        assert torch.equal(a_map, maps[1]), f"{count} threads: not the 1-thread bits"


def test_a_compiler_without_pthreads_builds_the_serial_library(tmp_path, monkeypatch):
    """$CC rejecting -pthread: FLAG_SETS' last entry builds a serial library, with no warning,
    that agrees with the threaded one (within rounding: it is built without -march=native,
    so its products may contract differently)."""
    args = _chain_inputs(1, 3, torch.float64)
    monkeypatch.setenv("SEQSHARD_FUSED_CHAIN", "1")
    with _threads(3):
        threaded = _chain(*args)
    wrapper, real = tmp_path / "cc-no-pthread", shutil.which("cc")
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -pthread ] && '
                       f'{{ echo "no pthreads here" >&2; exit 1; }}; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("SEQSHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fused_chain, "_libs", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_chain.available(torch.float64)
    with _threads(3):
        serial = _chain(*args)
    assert len(list((tmp_path / "cache").glob("fused_chain_double_*.so"))) == 1
    for name, out in serial.items():
        assert_close(f"serial build: {name}", threaded[name], out, TOL[torch.float64])
