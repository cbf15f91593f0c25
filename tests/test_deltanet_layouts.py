"""DeltaNetLM on the balanced layouts (zigzag, striped) against the unsharded model on 1, 2
and 4 ranks -- logits, loss and every parameter gradient -- for pure delta stacks and hybrids
with global and window layers, with activation checkpointing and with the mixer in pieces;
and the layout-to-layout move they run on (`seqshard.dist.relayout`): values, gradients,
how often the model moves, and its errors."""

from __future__ import annotations

import pytest
import torch

from tests.common import assert_close
from tests.harness import mesh, run_ranks
from tests.test_models import DELTANET, _compare_model

LAYOUTS = ("contiguous", "zigzag", "striped")


def _moves(rank, world, seq_len):
    """Every src -> dst move of a [B, n, C] and a [B, H, n, D] shard equals dst's shard of
    the whole sequence, and its gradient is src's shard of the whole upstream gradient."""
    from seqshard.dist import get_layout, relayout

    m = mesh()
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for shape, dim in (((2, seq_len, 3), 1), ((2, 2, seq_len, 4), -2)):
        full = torch.randn(shape, generator=gen, dtype=torch.float64)
        weight = torch.randn(shape, generator=gen, dtype=torch.float64)
        for src in map(get_layout, LAYOUTS):
            for dst in map(get_layout, LAYOUTS):
                x = src.shard(full, dim % full.dim(), m.rank, m.size).clone().requires_grad_()
                y = relayout(x, m, src, dst, dim=dim)
                d = dim % full.dim()
                tag = f"{src.name}->{dst.name} {tuple(shape)}"
                assert_close(f"{tag} values", dst.shard(full, d, m.rank, m.size), y.detach(), 0)
                (y * dst.shard(weight, d, m.rank, m.size)).sum().backward()
                assert_close(f"{tag} grad", src.shard(weight, d, m.rank, m.size), x.grad, 0)
                checked += 1
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_relayout_moves_values_and_gradients(world):
    assert run_ranks(_moves, world, 8 * world) == [18] * world


def _bad_moves(rank, world):
    from seqshard.dist import relayout, relayout_plan

    m = mesh()
    with pytest.raises(ValueError, match="sequence length 6 does not divide"):
        relayout(torch.zeros(1, 3, 2), m, "zigzag", "contiguous", dim=1)  # n odd on zigzag
    plan = relayout_plan("zigzag", "contiguous", 8, world, rank)
    with pytest.raises(ValueError, match="plan zigzag->contiguous of N=8 .* x \\(1, 2, 2\\)"):
        relayout(torch.zeros(1, 2, 2), m, "zigzag", "contiguous", dim=1, plan=plan)
    with pytest.raises(ValueError, match="rank=2 outside 0..1"):
        relayout_plan("zigzag", "striped", 8, 2, 2)
    return True


def test_bad_moves_raise_on_every_rank():
    assert run_ranks(_bad_moves, 2) == [True, True]


# (delta, window, delta, global): both hybrids of the DeltaNet paper in one stack
HYBRID = dict(DELTANET, num_layers=4, window_layers=(1,), attn_layers=(3,), window=5)


def _models(rank, world, cases):
    """_compare_model for each case, counting the residual stream's moves in forward."""
    import seqshard.models.deltanet as deltanet

    move = deltanet.relayout
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return move(*args, **kwargs)

    deltanet.relayout = counting  # our own function, wrapped to count its calls
    try:
        results = []
        for seed, (config, seq_len) in enumerate(cases):
            calls.clear()
            compared = _compare_model("deltanet", config, mesh(), batch=2, seq_len=seq_len,
                                      seed=seed)
            results.append((compared, len(calls)))
        return results
    finally:
        deltanet.relayout = move


def _parameters(cases):
    from seqshard.models import build_model

    return [len(list(build_model("deltanet", config).parameters())) for config, _ in cases]


CASES = {
    1: [(dict(HYBRID, layout="zigzag"), 12)],
    # shards of 12: a window of 5 within a run of 6, one of 13 spanning runs and ranks; a
    # pure delta stack (moves in and out once); the mixer in pieces of 5 tokens; recomputed
    2: [(dict(HYBRID, layout="zigzag"), 24),
        # striped windows run on the stream moved to contiguous: in, out, in, out
        (dict(HYBRID, layout="striped", window=13, activation_checkpointing=True,
              window_layers=(1, 3), attn_layers=(2,)), 24),
        (dict(DELTANET, layout="zigzag"), 24),
        (dict(HYBRID, layout="zigzag", mixer_piece_tokens=5, activation_checkpointing=True,
              attn_layers=(0, 3), window_layers=(2,), use_gate=True), 24)],
    # shards of 8 (runs of 4): windows reach back over several ranks, state scans over 4
    4: [(dict(HYBRID, layout="zigzag", window=13, activation_checkpointing=True,
              mixer_piece_tokens=3), 32),
        (dict(HYBRID, layout="striped", schedule="pass"), 32)],
}


# moves per forward: in where a delta layer (on striped: or a window) follows the balanced
# layout, out where a global layer or the head follows the contiguous one; none on one rank
MOVES = {1: [0], 2: [2, 4, 2, 2], 4: [2, 2]}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_deltanet_on_balanced_layouts_matches_unsharded(world):
    cases = CASES[world]
    expected = list(zip(_parameters(cases), MOVES[world]))
    assert run_ranks(_models, world, cases) == [expected] * world


def _alternating(rank, world):
    return _models(rank, world, [(dict(DELTANET, num_layers=4, attn_layers=(1, 3),
                                       layout="zigzag"), 16)])[0][1]


def test_alternating_delta_and_global_layers_move_at_every_meeting():
    """delta, global, delta, global: in, out, in, out (window layers never move)."""
    assert run_ranks(_alternating, 2) == [4, 4]
