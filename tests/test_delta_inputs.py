"""The delta rule on the tensors real models pass: views (expanded, strided last dim, permuted,
sliced, transposed), a gate "reset" of -1e4, empty batches and sequences, and bad input that
must raise on every rank (dtypes, gate > 0, ranks that disagree). Everything is compared with
the token recurrence in float64: outputs, final states and every leaf's gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from seqshard.ops.delta_rule import DeltaNet, chunk_delta_rule, delta_rule
from seqshard.ops.delta_rule.naive import naive_delta_rule
from tests.common import assert_close
from tests.harness import mesh, run_ranks

TOL = 1e-5  # fp32 against the fp64 recurrence, relative to each tensor's scale
B, H, DK, DV = 1, 2, 8, 6

# name -> (leaf shape from (B, H, N, Dk, Dv), token axis of the leaf, tokens per step there,
# the view that turns the leaf into the op's argument)
LEAVES = {
    # one query shared by the heads: expanded (stride 0 over H)
    "q": (lambda n: (B, 1, n, DK), 2, 1, lambda x: x.expand(B, H, -1, DK)),
    # keys out of a fused projection [B, N, H * 2Dk]: every other feature (strided last dim)
    "k": (lambda n: (B, n, H * 2 * DK), 1, 1,
          lambda x: x.unflatten(-1, (H, 2 * DK))[..., ::2].transpose(1, 2)),
    # values stored token-major [N, Dv, B, H], permuted
    "v": (lambda n: (n, DV, B, H), 0, 1, lambda x: x.permute(2, 3, 0, 1)),
    # [B, N, H] from a projection, transposed
    "beta": (lambda n: (B, n, H), 1, 1, lambda x: x.transpose(1, 2)),
    # every other token of a longer buffer (sliced with a step)
    "gate": (lambda n: (B, H, 2 * n), 2, 2, lambda x: x[..., ::2]),
}


def global_leaves(n: int, seed: int, gate: bool, resets=()) -> dict:
    """float64 leaves of the whole sequence (n tokens); `resets`: token indices whose gate
    is -1e4 (the state is wiped there)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    leaves = {
        "q": rand(*LEAVES["q"][0](n)),
        "k": rand(*LEAVES["k"][0](n)) * (0.8 / DK ** 0.5),  # |k| about 0.8: a stable recurrence
        "v": rand(*LEAVES["v"][0](n)),
        "beta": torch.rand(*LEAVES["beta"][0](n), generator=gen, dtype=torch.float64),
        "initial_state": rand(B, H, DV, DK),  # given transposed: the op sees .mT
    }
    if gate:
        g = -torch.rand(*LEAVES["gate"][0](n), generator=gen, dtype=torch.float64) * 0.3
        for t in resets:
            g[..., 2 * t] = -1e4
        leaves["gate"] = g
    return leaves


def args(leaves: dict) -> dict:
    """The op's arguments as views of the leaves."""
    out = {n: LEAVES[n][3](x) for n, x in leaves.items() if n in LEAVES}
    out["initial_state"] = leaves["initial_state"].mT
    return out


def local(leaves: dict, rank: int, world: int, dtype) -> dict:
    """This rank's leaves (its contiguous token range), as new leaves of `dtype`."""
    mine = {}
    for name, x in leaves.items():
        if name in LEAVES:
            axis, step = LEAVES[name][1], LEAVES[name][2]
            n = x.shape[axis] // world
            x = x.narrow(axis, rank * n, n)
        mine[name] = x.detach().to(dtype).clone().requires_grad_()
    return mine


def weights(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(B, H, n, DV, generator=gen, dtype=torch.float64),
            torch.randn(B, H, DK, DV, generator=gen, dtype=torch.float64))


def reference(leaves: dict, seed: int):
    """fp64 recurrence: o, final state, and the gradient of each leaf of a linear loss."""
    leaves = {n: x.detach().clone().requires_grad_() for n, x in leaves.items()}
    a = args(leaves)
    o, s = naive_delta_rule(a["q"], a["k"], a["v"], a["beta"], gate=a.get("gate"),
                            initial_state=a["initial_state"], output_final_state=True)
    wo, ws = weights(o.shape[2], seed)
    grads = torch.autograd.grad((o * wo).sum() + (s * ws).sum(), list(leaves.values()))
    return o, s, dict(zip(leaves, grads)), wo, ws


def check_sharded(rank, world, m, n, seed, gate, resets, schedule, C, where):
    """The op on this rank's views vs the fp64 recurrence on the whole sequence."""
    full = global_leaves(n * world, seed, gate, resets)
    o_ref, s_ref, g_ref, wo, ws = reference(full, seed)
    mine = local(full, rank, world, torch.float32)
    a = args(mine)
    o, s = delta_rule(a["q"], a["k"], a["v"], a["beta"], gate=a.get("gate"), mesh=m,
                      initial_state=a["initial_state"], output_final_state=True,
                      schedule=schedule, chunk_size=C)
    assert_close(f"{where} o", o_ref[:, :, rank * n:(rank + 1) * n], o, TOL)
    assert_close(f"{where} final state", s_ref, s, TOL)
    loss = (o * wo[:, :, rank * n:(rank + 1) * n]).sum() + (s * ws).sum() / world
    grads = torch.autograd.grad(loss, list(mine.values()))
    ref_local = local(g_ref, rank, world, torch.float64)
    for name, g in zip(mine, grads):
        ref = ref_local[name]
        if name == "initial_state" and rank > 0:
            ref = torch.zeros_like(ref)  # read on rank 0 only
        assert_close(f"{where} d{name}", ref, g, TOL)


def _views_and_resets(rank, world):
    """Views and a mid-chunk reset on every rank, both schedules, gated and not."""
    m = mesh()
    n, C = 10, 4
    resets = [r * n + 6 for r in range(world)]  # token 6 of each shard: inside chunk [4, 8)
    for schedule in ("pass", "scan"):
        for gate in (True, False):
            where = f"{schedule} gate={gate} rank {rank}/{world}"
            check_sharded(rank, world, m, n, 31, gate, resets if gate else (), schedule, C,
                          where)
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_views_and_reset_match_fp64_recurrence(world):
    assert run_ranks(_views_and_resets, world) == [True] * world


def test_reset_is_exact_in_one_chunk():
    """One -1e4 gate in the middle of a 32-token chunk, fp32: the in-chunk decays must not
    lose precision to a cumulative sum of magnitude 1e4 (forward and backward)."""
    full = global_leaves(40, 5, True, resets=(13,))
    o_ref, s_ref, g_ref, wo, ws = reference(full, 5)
    mine = local(full, 0, 1, torch.float32)
    a = args(mine)
    o, s = chunk_delta_rule(a["q"], a["k"], a["v"], a["beta"], gate=a["gate"],
                            initial_state=a["initial_state"], chunk_size=32)
    assert_close("o", o_ref, o, TOL)
    assert_close("final state", s_ref, s, TOL)
    grads = torch.autograd.grad((o * wo).sum() + (s * ws).sum(), list(mine.values()))
    for name, g in zip(mine, grads):
        assert_close(f"d{name}", g_ref[name], g, TOL)


def test_pieces_reset_is_exact():
    """The layer's pieces path (prepare_blocked + shard_map): a gate reset inside a chunk."""
    full = global_leaves(40, 6, True, resets=(21,))
    a = {n: x.float() for n, x in args(full).items()}
    inputs = [a[n].contiguous() for n in ("q", "k", "v", "beta", "gate")]
    from seqshard.ops.delta_rule.chunk import prepare_blocked, shard_map

    am, bm = shard_map(prepare_blocked(inputs, DK ** -0.5, 16))
    s0 = a["initial_state"]
    _, s_ref = naive_delta_rule(*(args(full)[n] for n in ("q", "k", "v", "beta")),
                                gate=args(full)["gate"], initial_state=args(full)["initial_state"],
                                output_final_state=True)
    assert_close("map applied to S0", s_ref, am @ s0 + bm, TOL)


# --- empty inputs ---------------------------------------------------------------------------
def test_empty_sequence_passes_the_state_through():
    full = global_leaves(0, 7, True)
    mine = local(full, 0, 1, torch.float32)
    a = args(mine)
    o, s = delta_rule(a["q"], a["k"], a["v"], a["beta"], gate=a["gate"],
                      initial_state=a["initial_state"], output_final_state=True)
    assert o.shape == (B, H, 0, DV) and o.dtype == torch.float32
    assert torch.equal(s, a["initial_state"])
    ws = torch.randn(s.shape)
    (d_h0,) = torch.autograd.grad((s * ws).sum(), [mine["initial_state"]])
    assert torch.equal(d_h0, ws.mT)
    o, s = delta_rule(a["q"], a["k"], a["v"], a["beta"], output_final_state=True)
    assert o.shape == (B, H, 0, DV) and torch.equal(s, torch.zeros(B, H, DK, DV))


def test_empty_batch_gives_empty_results():
    q = torch.randn(0, H, 5, DK, requires_grad=True)
    o, s = delta_rule(q, q, torch.randn(0, H, 5, DV), torch.rand(0, H, 5),
                      gate=-torch.rand(0, H, 5), output_final_state=True)
    assert o.shape == (0, H, 5, DV) and s.shape == (0, H, DK, DV)
    o.sum().backward()
    assert q.grad.shape == q.shape


def test_zero_key_dim_raises():
    q = torch.randn(1, H, 5, 0)
    with pytest.raises(ValueError, match=r"Dk=0"):
        delta_rule(q, q, torch.randn(1, H, 5, DV), torch.rand(1, H, 5))


# --- bad input on one process -------------------------------------------------------------
def _small():
    a = args(local(global_leaves(6, 8, True), 0, 1, torch.float32))
    return {n: x.detach() for n, x in a.items()}


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(q=t["q"].to(torch.int32)), r"q .*torch\.int32"),
    (lambda t: t.update(beta=t["beta"] > 0.5), r"beta .*torch\.bool"),
    (lambda t: t.update(k=t["k"].to(torch.complex64)), r"k .*torch\.complex64"),
    (lambda t: t.update(v=t["v"].double()), r"v is torch\.float64 .*q is torch\.float32"),
    (lambda t: t.update(gate=t["gate"].bfloat16()), r"gate is torch\.bfloat16"),
    (lambda t: t["gate"].__setitem__((0, 1, 3), 0.25), r"gate must be <= 0.*max 0\.25"),
])
def test_bad_dtype_or_gate_raises(change, match):
    t = _small()
    change(t)
    with pytest.raises(ValueError, match=match):
        delta_rule(**t)


# --- ranks that disagree --------------------------------------------------------------------
DISAGREE = {  # what the last rank does differently -> what every rank's message names
    "dtype": (lambda kw: kw.update({n: kw[n].double() for n in ("q", "k", "v", "beta",
                                                                  "gate")}), "v dtype"),
    "gate given": (lambda kw: kw.pop("gate"), "gate given"),
    "gate > 0": (lambda kw: kw["gate"].__setitem__((0, 0, 1), 3.0), "gate must be <= 0"),
    "scale": (lambda kw: kw.update(scale=0.5), "scale"),
    "chunk": (lambda kw: kw.update(chunk_size=3), "chunk_size"),
    "schedule": (lambda kw: kw.update(schedule="pass"), "schedule"),
    "final state": (lambda kw: kw.update(output_final_state=False), "output_final_state"),
    "empty shard": (lambda kw: kw.update({n: kw[n][:, :, :0] for n in ("q", "k", "v", "beta",
                                                                          "gate")}), "N_local=0"),
}


def _disagree(rank, world):
    m = mesh()
    messages = {}
    for case, (change, _) in DISAGREE.items():
        kw = dict(_small(), mesh=m, output_final_state=True, chunk_size=4)
        if rank == world - 1:
            change(kw)
        try:
            delta_rule(**kw)
            messages[case] = "no error"
        except ValueError as err:
            messages[case] = str(err)
    # every rank with an empty batch: no communication needed, empty results
    t = _small()
    o, s = delta_rule(*(t[n][:0] for n in ("q", "k", "v", "beta")), mesh=m,
                      output_final_state=True)
    messages["empty batch"] = (tuple(o.shape), tuple(s.shape))
    return messages


def test_disagreeing_ranks_all_raise():
    world = 2
    results = run_ranks(_disagree, world)
    for rank, messages in enumerate(results):
        for case, (_, needle) in DISAGREE.items():
            text = messages[case]
            assert needle in text, f"rank {rank}, {case}: {text!r}"
            assert "rank 1" in text, f"rank {rank}, {case}: {text!r}"
        assert messages["empty batch"] == ((0, H, 6, DV), (0, H, DK, DV))


# --- the DeltaNet layer ---------------------------------------------------------------------
def _layer_views(rank, world):
    """x as a transposed view [N, B, hidden] -> [B, N, hidden], whole-shard and in pieces,
    against an fp64 copy of the layer on the whole (contiguous) sequence."""
    m = mesh()
    n, hidden = 8, 16
    for i, pieces in enumerate((None, 3)):
        torch.manual_seed(60 + i)
        layer = DeltaNet(hidden, 2, use_gate=True, chunk_size=4, mixer_piece_tokens=pieces)
        ref_layer = copy.deepcopy(layer).double()
        x_full = torch.randn(n * world, 2, hidden, dtype=torch.float64)  # [N, B, hidden]
        w = torch.randn(2, n * world, hidden, dtype=torch.float64)
        xr = x_full.clone().requires_grad_()
        y_ref = ref_layer(xr.transpose(0, 1).contiguous())
        g_ref = torch.autograd.grad((y_ref * w).sum(), [xr] + list(ref_layer.parameters()))
        leaf = x_full[rank * n:(rank + 1) * n].float().requires_grad_()
        y = layer(leaf.transpose(0, 1), mesh=m)
        where = f"layer pieces={pieces} rank {rank}/{world}"
        assert_close(f"{where} y", y_ref[:, rank * n:(rank + 1) * n], y, TOL)
        grads = torch.autograd.grad((y * w[:, rank * n:(rank + 1) * n].float()).sum(),
                                    [leaf] + list(layer.parameters()))
        assert_close(f"{where} dx", g_ref[0][rank * n:(rank + 1) * n], grads[0], TOL)
        for (name, _), ref, g in zip(layer.named_parameters(), g_ref[1:], grads[1:]):
            if world > 1:
                from seqshard.dist import all_reduce

                g = all_reduce(g, m.group)
            assert_close(f"{where} d{name}", ref, g, 2 * TOL)
    return True


@pytest.mark.parametrize("world", [1, 2])
def test_layer_on_views_matches_fp64(world):
    assert run_ranks(_layer_views, world) == [True] * world


def test_layer_empty_batch():
    layer = DeltaNet(16, 2, chunk_size=4)
    y = layer(torch.randn(0, 5, 16))
    assert y.shape == (0, 5, 16)
