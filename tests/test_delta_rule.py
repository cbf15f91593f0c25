"""The delta rule: chunked and sharded (scan / pass, P in 1, 2, 4) against the token-level
oracle, forward and every gradient; float64 gradcheck; the DeltaNet layer sharded vs whole;
bad input."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from seqshard.dist import Contiguous, all_reduce
from seqshard.ops.delta_rule import (DeltaNet, ShortConv, chunk, chunk_delta_rule, chunk_math,
                                     delta_rule)
from seqshard.ops.delta_rule.api import _nonfinite
from seqshard.ops.delta_rule.naive import naive_delta_rule
from tests.common import assert_close
from tests.harness import mesh, run_ranks

TOL = {"o": 1e-5, "state": 1e-5, "grad": 2e-5}
NAMES = ("q", "k", "v", "beta", "gate", "initial_state")


def make_inputs(B, H, N, Dk, Dv, *, gate, h0, seed, dtype=torch.float32, neg=False):
    """Full-sequence inputs as the layer would make them (unit-norm keys, beta in (0, 1) or
    (0, 2) with neg), as a dict of leaf tensors that require grad."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    t = {
        "q": rand(B, H, N, Dk),
        "k": F.normalize(rand(B, H, N, Dk), dim=-1),
        "v": rand(B, H, N, Dv),
        "beta": torch.rand(B, H, N, generator=gen, dtype=dtype) * (2.0 if neg else 1.0),
        "gate": -torch.rand(B, H, N, generator=gen, dtype=dtype) * 0.3 if gate else None,
        "initial_state": rand(B, H, Dk, Dv) if h0 else None,
    }
    return {n: x.requires_grad_() for n, x in t.items() if x is not None}


def loss_weights(o, state, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(o.shape, generator=gen, dtype=o.dtype),
            torch.randn(state.shape, generator=gen, dtype=o.dtype))


def reference(t, seed):
    """Oracle outputs, final state and gradients of a fixed random linear loss."""
    o, s = naive_delta_rule(t["q"], t["k"], t["v"], t["beta"], gate=t.get("gate"),
                            initial_state=t.get("initial_state"), output_final_state=True)
    wo, ws = loss_weights(o, s, seed)
    grads = torch.autograd.grad((o * wo).sum() + (s * ws).sum(), list(t.values()))
    return o, s, dict(zip(t, grads)), wo, ws


# --- one process ----------------------------------------------------------------------------
CHUNK_CASES = [  # B, H, N, Dk, Dv, chunk, gate, h0, neg
    (2, 3, 37, 48, 20, 16, False, False, False),
    (2, 3, 37, 48, 20, 16, True, True, False),
    (1, 2, 37, 16, 24, 8, False, True, True),
    (1, 2, 40, 16, 16, 8, True, False, True),  # a multiple of the chunk
    (1, 1, 5, 8, 8, 64, True, True, False),  # shorter than one chunk
]


def _assert_matches_naive(t: dict, o, s, seed: int) -> None:
    """Output, final state and every input's gradient against the token recurrence."""
    o_ref, s_ref, g_ref, wo, ws = reference(t, seed)
    assert_close("o", o_ref, o, TOL["o"])
    assert_close("final state", s_ref, s, TOL["state"])
    grads = torch.autograd.grad((o * wo).sum() + (s * ws).sum(), list(t.values()))
    for name, g in zip(t, grads):
        assert_close(f"d{name}", g_ref[name], g, TOL["grad"])


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_chunk_matches_naive(case):
    B, H, N, Dk, Dv, C, gate, h0, neg = case
    t = make_inputs(B, H, N, Dk, Dv, gate=gate, h0=h0, seed=7, neg=neg)
    o, s = chunk_delta_rule(t["q"], t["k"], t["v"], t["beta"], gate=t.get("gate"),
                            initial_state=t.get("initial_state"), chunk_size=C)
    _assert_matches_naive(t, o, s, 7)


def test_blocked_backward_matches_naive(monkeypatch):
    """Several blocks of chunks in forward and backward: 7 chunks each over the 2*3*10 chunks
    of all heads, so blocks straddle heads and the last one is partial."""
    monkeypatch.setattr(chunk_math, "BLOCK_TOKENS", 28)
    test_chunk_matches_naive((2, 3, 37, 48, 20, 4, True, True, False))


@pytest.mark.parametrize("gate", [False, True])
def test_gradcheck_float64(gate):
    t = make_inputs(1, 1, 6, 3, 2, gate=gate, h0=True, seed=3, dtype=torch.float64)

    def f(q, k, v, beta, *rest):
        g, h0 = (rest[0], rest[1]) if gate else (None, rest[0])
        return chunk_delta_rule(q, k, v, beta, gate=g, initial_state=h0, chunk_size=4)

    assert torch.autograd.gradcheck(f, tuple(t.values()))


def test_default_chunk_size_matches_naive():
    """chunk_size=None: the per-device choice (32 on CPU), on a length it does not divide."""
    t = make_inputs(1, 2, 70, 16, 24, gate=True, h0=True, seed=11)
    o, s = delta_rule(**t, output_final_state=True)
    assert chunk.default_chunk_size(torch.device("cpu")) == 32
    _assert_matches_naive(t, o, s, 11)


def test_nonfinite_check_fast_path():
    """The check sums each input first; a sum that overflows on finite values is no error."""
    big = torch.full((3, 4), 3e38)
    assert not torch.isfinite(big.sum())
    assert _nonfinite([("v", big)]) == []
    big[1, 2] = float("inf")
    big[0, 0] = float("nan")
    assert _nonfinite([("v", big), ("q", torch.zeros(2))]) == ["v has 2 NaN/inf values"]


def test_public_op_half_precision_runs_in_fp32():
    t = make_inputs(1, 2, 21, 16, 16, gate=True, h0=False, seed=5)
    o_ref, s_ref, *_ = reference(t, 5)
    low = {n: x.detach().bfloat16() for n, x in t.items()}
    o, s = delta_rule(**low, output_final_state=True, chunk_size=8)
    assert o.dtype == s.dtype == torch.bfloat16
    assert_close("o (bf16 inputs)", o_ref, o.float(), 3e-2)
    assert_close("state (bf16 inputs)", s_ref, s.float(), 3e-2)


# --- the fused state chain (fused_chain.c) ----------------------------------------------------
FUSED_CASES = [  # B, H, N, Dk, Dv, chunk, gate, dtype
    (2, 3, 70, 48, 20, 16, True, torch.float32),  # Dv = one vector + a 4-column scalar tail
    (1, 2, 96, 64, 64, 32, False, torch.float32),  # the benchmark's shape: 2-vector tiles
    (1, 1, 13, 5, 3, 4, True, torch.float64),  # Dv below one vector: the scalar loop only
    (1, 2, 50, 40, 36, 8, False, torch.float64),  # doubles: 2-vector tiles, then a tail of 4
]


def _needs_fused_chain(dtype):
    from seqshard.ops.delta_rule import fused_chain

    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler: the torch loop is the only chain here")
    assert fused_chain._load(dtype) is not None, "a C compiler is here but the chain did not build"


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_chain_matches_torch_loop(case, monkeypatch):
    """chain_states, chain_grads and shard_map in C against chain.py's torch loops
    (SEQSHARD_FUSED_CHAIN=0): every chunk-start state, Delta, the final state, backward with
    and without the kept per-chunk gradients, and the chunks' affine map [A | B]."""
    B, H, N, Dk, Dv, C, gate, dtype = case
    _needs_fused_chain(dtype)
    t = make_inputs(B, H, N, Dk, Dv, gate=gate, h0=True, seed=21, dtype=dtype)
    inputs = [t[n].detach() if n in t else None for n in ("q", "k", "v", "beta", "gate")]
    ch = chunk.prepare_blocked(inputs, Dk ** -0.5, C)
    gen = torch.Generator().manual_seed(22)
    nc = ch.w.shape[0]
    ds_states = torch.randn(nc, B, H, Dk, Dv, generator=gen, dtype=dtype)
    ds_end = torch.randn(B, H, Dk, Dv, generator=gen, dtype=dtype)
    s0 = t["initial_state"].detach()
    results = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("SEQSHARD_FUSED_CHAIN", fused)
        results[fused] = (*chunk.chain_states(s0, ch), *chunk.chain_grads(ch, ds_states, ds_end),
                          chunk.chain_grads(ch, ds_states, ds_end, keep=False)[1],
                          *chunk.shard_map(ch))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    names = ("states", "deltas", "final state", "dS after each chunk", "dS0", "dS0 (not kept)",
             "map A", "map B")
    for name, ref, out in zip(names, results["0"], results["1"]):
        assert_close(f"fused {name}", ref, out, tol)


def test_fused_chain_strided_inputs_match_naive():
    """Keys straight from a [B, N, H, D] projection (rows H*D apart) reach the C chain as Kt
    without a copy; the op still matches the recurrence."""
    _needs_fused_chain(torch.float32)
    t = make_inputs(1, 3, 45, 16, 24, gate=False, h0=True, seed=23)
    strided = {n: x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               if x.dim() == 4 and n != "initial_state" else x for n, x in t.items()}
    assert not strided["k"].is_contiguous()
    o, s = chunk_delta_rule(strided["q"], strided["k"], strided["v"], strided["beta"],
                            initial_state=strided["initial_state"], chunk_size=8)
    _assert_matches_naive(strided, o, s, 23)


def test_fused_chain_falls_back_when_it_cannot_build(monkeypatch, tmp_path):
    """A compiler that fails: one warning, then the torch loop gives the same exact results."""
    from seqshard.ops.delta_rule import fused_chain

    monkeypatch.setattr(fused_chain, "_libs", {})
    monkeypatch.setenv("SEQSHARD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists everywhere, always fails
    t = make_inputs(1, 2, 37, 16, 24, gate=True, h0=True, seed=24)
    with pytest.warns(RuntimeWarning, match="did not build"):
        o, s = chunk_delta_rule(t["q"], t["k"], t["v"], t["beta"], gate=t["gate"],
                                initial_state=t["initial_state"], chunk_size=8)
    assert fused_chain._libs == {torch.float32: None}
    assert list(tmp_path.iterdir()) == []  # the failed build left nothing behind
    _assert_matches_naive(t, o, s, 24)


def test_fused_chain_falls_back_when_its_cache_is_unwritable(monkeypatch, tmp_path):
    """A cache path that cannot be a folder (it lies under a file): a warning, not a crash."""
    from seqshard.ops.delta_rule import fused_chain

    _needs_fused_chain(torch.float32)
    monkeypatch.setattr(fused_chain, "_libs", {})
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SEQSHARD_CACHE", str(tmp_path / "file" / "cache"))
    t = make_inputs(1, 1, 20, 8, 8, gate=False, h0=False, seed=25)
    with pytest.warns(RuntimeWarning, match="did not build"):
        o, s = chunk_delta_rule(t["q"], t["k"], t["v"], t["beta"], chunk_size=8)
    _assert_matches_naive(t, o, s, 25)


# --- sharded --------------------------------------------------------------------------------
SHARD_CASES = [  # B, H, N_local, Dk, Dv, chunk, gate, h0
    (2, 2, 13, 48, 20, 8, False, False),
    (1, 2, 13, 16, 24, 8, True, True),
    (1, 3, 8, 8, 8, 4, False, True),  # local length a multiple of the chunk
]


def _sharded_op(rank, world):
    m = mesh()
    layout = Contiguous()
    checked, default_block = 0, chunk_math.BLOCK_TOKENS  # the rank pool outlives this test
    for ci, (B, H, n, Dk, Dv, C, gate, h0) in enumerate(SHARD_CASES):
        for schedule in ("scan", "pass"):
            # one block, and several (the last one partial)
            chunk_math.BLOCK_TOKENS = default_block if schedule == "scan" else 2 * C
            seed = 100 + ci
            t = make_inputs(B, H, n * world, Dk, Dv, gate=gate, h0=h0, seed=seed)
            o_ref, s_ref, g_ref, wo, ws = reference(t, seed)
            mine = {n_: layout.shard(x, 2, rank, world).detach().requires_grad_()
                    if n_ != "initial_state" else x.detach().clone().requires_grad_()
                    for n_, x in t.items()}
            o, s = delta_rule(mine["q"], mine["k"], mine["v"], mine["beta"], mesh=m,
                              gate=mine.get("gate"), initial_state=mine.get("initial_state"),
                              output_final_state=True, schedule=schedule, chunk_size=C)
            where = f"case {ci} {schedule} rank {rank}/{world}"
            assert_close(f"{where} o", layout.shard(o_ref, 2, rank, world), o, TOL["o"])
            assert_close(f"{where} final state", s_ref, s, TOL["state"])
            # every rank holds the final state: each counts 1/world of its loss term
            loss = (o * layout.shard(wo, 2, rank, world)).sum() + (s * ws).sum() / world
            grads = dict(zip(mine, torch.autograd.grad(loss, list(mine.values()))))
            for name, g in grads.items():
                if name == "initial_state":
                    ref = g_ref[name] if rank == 0 else torch.zeros_like(g)
                else:
                    ref = layout.shard(g_ref[name], 2, rank, world)
                assert_close(f"{where} d{name}", ref, g, TOL["grad"])
            checked += 1
    chunk_math.BLOCK_TOKENS = default_block
    # without output_final_state: no state returned, outputs unchanged
    t = make_inputs(1, 2, 9 * world, 8, 8, gate=False, h0=False, seed=9)
    o_ref = naive_delta_rule(*(t[n] for n in NAMES[:4]))[0]
    o, s = delta_rule(*(layout.shard(t[n], 2, rank, world) for n in NAMES[:4]), mesh=m,
                      chunk_size=4)
    assert s is None
    assert_close("o without final state", layout.shard(o_ref, 2, rank, world), o, TOL["o"])
    return checked


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_matches_naive(world):
    assert run_ranks(_sharded_op, world) == [2 * len(SHARD_CASES)] * world


LAYER_CASES = [  # kwargs of DeltaNet, N_local
    (dict(use_gate=False, allow_neg_eigval=True), 7),
    (dict(use_gate=True, schedule="pass"), 6),
    (dict(use_short_conv=False, use_gate=True), 5),
]


def _sharded_layer(rank, world):
    m = mesh()
    layout = Contiguous()
    for i, (kwargs, n) in enumerate(LAYER_CASES):
        torch.manual_seed(50 + i)
        layer = DeltaNet(dim=32, num_heads=2, conv_size=4, chunk_size=4, **kwargs)
        x = torch.randn(2, n * world, 32, requires_grad=True)
        w = torch.randn(2, n * world, 32)
        y_ref = layer(x)
        params = list(layer.parameters())
        g_ref = torch.autograd.grad((y_ref * w).sum(), [x] + params)
        xs = layout.shard(x.detach(), 1, rank, world).requires_grad_()
        y = layer(xs, mesh=m)
        where = f"layer case {i} rank {rank}/{world}"
        assert_close(f"{where} y", layout.shard(y_ref, 1, rank, world), y, TOL["o"])
        grads = torch.autograd.grad((y * layout.shard(w, 1, rank, world)).sum(), [xs] + params)
        assert_close(f"{where} dx", layout.shard(g_ref[0], 1, rank, world), grads[0], TOL["grad"])
        for (name, _), ref, g in zip(layer.named_parameters(), g_ref[1:], grads[1:]):
            total = all_reduce(g, m.group) if world > 1 else g  # each rank holds a partial sum
            assert_close(f"{where} d{name}", ref, total, TOL["grad"])
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_deltanet_layer_sharded_matches_whole(world):
    assert run_ranks(_sharded_layer, world) == [True] * world


# --- bad input ------------------------------------------------------------------------------
def _good():
    return {n: x.detach() for n, x in
            make_inputs(1, 2, 6, 4, 3, gate=True, h0=True, seed=1).items()}


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(beta=t["beta"][..., :5]), r"beta \(1, 2, 5\) must be \[B, H, N\]"),
    (lambda t: t.update(k=torch.randn(1, 2, 6, 5)), r"k \(1, 2, 6, 5\) must match q"),
    (lambda t: t.update(v=torch.randn(1, 3, 6, 3)), r"v \(1, 3, 6, 3\) must share"),
    (lambda t: t.update(gate=t["gate"][0]), r"gate must be a 3-D floating tensor"),
    (lambda t: t.update(initial_state=torch.zeros(1, 2, 3, 4)), r"initial_state \(1, 2, 3, 4\)"),
    (lambda t: t["v"].__setitem__((0, 1, 2, 0), float("nan")), r"v has 1 NaN/inf"),
    (lambda t: t["gate"].__setitem__((0, 0, 0), float("-inf")), r"gate has 1 NaN/inf"),
    (lambda t: t.update(schedule="ring"), r"schedule='ring'"),
    (lambda t: t.update(chunk_size=0), r"chunk_size=0"),
])
def test_bad_input_raises(change, match):
    t = _good()
    change(t)
    with pytest.raises(ValueError, match=match):
        delta_rule(**t)


def test_layer_bad_config():
    with pytest.raises(ValueError, match="dim=30 is not divisible by num_heads=4"):
        DeltaNet(30, 4)
    with pytest.raises(ValueError, match="conv size=0"):
        ShortConv(8, 0)


def _bad_on_one_rank(rank, world):
    m = mesh()
    t = _good()
    if rank == world - 1:
        t["q"][0, 0, 0, 0] = float("inf")
    try:
        delta_rule(**t, mesh=m)
    except ValueError as err:
        message = str(err)
    else:
        raise AssertionError("no ValueError")
    conv = ShortConv(4, 4)
    try:  # 2 tokens per rank < halo of 3
        conv(torch.randn(1, 2, 4), mesh=m)
    except ValueError as err:
        conv_message = str(err)
    return message, conv_message


def test_bad_input_on_one_rank_raises_on_every_rank():
    (m0, c0), (m1, c1) = run_ranks(_bad_on_one_rank, 2)
    for message in (m0, m1):  # both ranks name the rank and the value at fault
        assert "bad input on 1 rank(s): rank 1: q has 1 NaN/inf" in message
    assert "shorter than the halo" in c0 and "shorter than the halo" in c1
