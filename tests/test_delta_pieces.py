"""The DeltaNet layer run over its shard in sequence pieces (ops/delta_rule/pieces.py) against
the whole unsharded layer on one process: output, dx and every parameter gradient, P in
{1, 2, 4}; awkward pieces (not multiples of the chunk, a short last piece, pieces shorter than
the conv halo so the conv context spans pieces and the rank border), gate on and off; float64
gradcheck; bad input."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from seqshard.dist import Contiguous, all_reduce
from seqshard.ops.delta_rule import DeltaNet
from tests.common import assert_close
from tests.harness import mesh, run_ranks

TOL = {"y": 1e-5, "grad": 2e-5}

CASES = [  # DeltaNet kwargs, N_local, mixer_piece_tokens
    (dict(dim=96, num_heads=2, chunk_size=3), 11, 4),  # head dim 48; pieces 4, 4, 3
    (dict(dim=32, num_heads=2, chunk_size=4, use_gate=True, allow_neg_eigval=True),
     7, 2),  # pieces shorter than the halo of 3: the conv reads two pieces and the last rank's
    (dict(dim=32, num_heads=4, chunk_size=4, use_gate=True, use_short_conv=False), 9, 4),
    # one-way state passing from rank to rank (the scan at P = 2 anyway)
    (dict(dim=24, num_heads=3, head_dim=5, chunk_size=8, conv_size=2, schedule="pass"), 6, 5),
]


def _pieces_vs_whole(rank, world):
    m = mesh()
    layout = Contiguous()
    for i, (kwargs, n, piece) in enumerate(CASES):
        torch.manual_seed(70 + i)
        layer = DeltaNet(mixer_piece_tokens=None, **kwargs)  # same weights on every rank
        x = torch.randn(2, n * world, kwargs["dim"], requires_grad=True)
        w = torch.randn(x.shape)
        params = list(layer.parameters())
        y_ref = layer(x)  # one process, the whole sequence, no pieces
        g_ref = torch.autograd.grad((y_ref * w).sum(), [x] + params)

        layer.mixer_piece_tokens = piece
        xs = layout.shard(x.detach(), 1, rank, world).requires_grad_()
        # odd cases unchecked, as DeltaNetLM calls it: the halo then goes one way inside
        check = i % 2 == 0
        y = layer(xs, mesh=m, check=check)
        where = f"case {i} rank {rank}/{world} check={check}"
        assert type(y.grad_fn).__name__ == "_LayerInPiecesBackward", f"{where}: no pieces"
        assert_close(f"{where} y", layout.shard(y_ref, 1, rank, world), y, TOL["y"])
        grads = torch.autograd.grad((y * layout.shard(w, 1, rank, world)).sum(), [xs] + params)
        assert_close(f"{where} dx", layout.shard(g_ref[0], 1, rank, world), grads[0],
                     TOL["grad"])
        for (name, _), ref, g in zip(layer.named_parameters(), g_ref[1:], grads[1:]):
            total = all_reduce(g, m.group) if world > 1 else g  # each rank: its tokens' part
            assert_close(f"{where} d{name}", ref, total, TOL["grad"])
    return len(CASES)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_pieces_match_whole_layer(world):
    assert run_ranks(_pieces_vs_whole, world) == [len(CASES)] * world


def _model_with_checkpointing(rank, world, schedule="scan"):
    """DeltaNetLM with per-block activation checkpointing: the pieces' Function (and its scans)
    runs again when a block is recomputed in backward; loss and gradients stay exact."""
    from seqshard.dist import Mesh
    from seqshard.models import build_model, sharded_lm_loss

    m = mesh()
    config = dict(vocab_size=37, dim=32, num_layers=2, num_heads=2, chunk_size=4,
                  use_gate=True, activation_checkpointing=True, schedule=schedule)
    torch.manual_seed(11)
    # the mixer's pieces set from the model config (0: the whole shard at once)
    model = build_model("deltanet", dict(config, mixer_piece_tokens=4), m)
    whole = build_model("deltanet", dict(config, mixer_piece_tokens=0), Mesh.single())
    whole.load_state_dict(model.state_dict())
    for block, ref_block in zip(model.blocks, whole.blocks):
        assert (block.mixer.mixer_piece_tokens, ref_block.mixer.mixer_piece_tokens) == (4, None)
    ids = torch.randint(0, 37, (1, 13 * world), generator=torch.Generator().manual_seed(11))
    ids_local = Contiguous().shard(ids, 1, rank, world)
    loss = sharded_lm_loss(model(ids_local), ids_local, m)
    loss.backward()
    ref = sharded_lm_loss(whole(ids), ids)
    ref.backward()
    assert_close(f"rank {rank}/{world} loss", ref.detach(), loss.detach(), TOL["y"])
    ref_params = dict(whole.named_parameters())
    for name, p in model.named_parameters():
        total = all_reduce(p.grad, m.group) if world > 1 else p.grad
        assert_close(f"rank {rank}/{world} grad {name}", ref_params[name].grad, total,
                     TOL["grad"])
    return True


@pytest.mark.parametrize("world,schedule", [(2, "scan"), (4, "scan"), (4, "pass")])
def test_model_with_checkpointing_in_pieces(world, schedule):
    # the recomputation reuses what the forward received (P = 2 or "pass": one-way
    # messages; P = 4 "scan": the scan), so no rank asks another for its state twice
    assert run_ranks(_model_with_checkpointing, world, schedule) == [True] * world


@pytest.mark.parametrize("gate", [False, True])
def test_gradcheck_float64(gate):
    torch.manual_seed(3)
    layer = DeltaNet(8, 2, chunk_size=2, use_gate=gate, mixer_piece_tokens=3).double()
    x = torch.randn(1, 8, 8, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())
    assert type(layer(x).grad_fn).__name__ == "_LayerInPiecesBackward"
    # gradcheck perturbs its inputs in place: the parameters themselves are inputs here;
    # fast mode compares one random projection of the Jacobian, the same for all inputs
    assert torch.autograd.gradcheck(lambda x, *_: layer(x), (x,) + params, fast_mode=True)


def test_frozen_parameters_and_no_grad():
    torch.manual_seed(4)
    layer = DeltaNet(16, 2, chunk_size=4, mixer_piece_tokens=5)
    x = torch.randn(1, 12, 16, requires_grad=True)
    with torch.no_grad():
        ref = layer(x)
    layer.q_proj.weight.requires_grad_(False)
    y = layer(x)
    assert_close("y (no grad)", ref, y, TOL["y"])
    y.sum().backward()
    assert layer.q_proj.weight.grad is None and layer.k_proj.weight.grad is not None
    assert x.grad is not None


def test_bf16_autocast_close_to_fp32():
    """Under autocast the pieces recompute in bf16 as the forward did and the state between
    pieces stays fp32; the result is as close to fp32 as the whole layer's (~1e-2)."""
    torch.manual_seed(6)
    layer = DeltaNet(32, 2, chunk_size=4, use_gate=True, mixer_piece_tokens=None)
    x = torch.randn(1, 30, 32, requires_grad=True)
    w = torch.randn(x.shape)
    params = list(layer.parameters())
    y_ref = layer(x)
    g_ref = torch.autograd.grad((y_ref * w).sum(), [x] + params)
    layer.mixer_piece_tokens = 7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close("y (bf16)", y_ref, y.float(), 3e-2)
    grads = torch.autograd.grad((y.float() * w).sum(), [x] + params)
    for (name, _), ref, g in zip([("x", x)] + list(layer.named_parameters()), g_ref, grads):
        assert_close(f"d{name} (bf16)", ref, g, 4e-2)


def test_bad_piece_tokens():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"mixer_piece_tokens={bad!r} must be a positive"):
            DeltaNet(16, 2, mixer_piece_tokens=bad)


def _bad_on_one_rank(rank, world):
    torch.manual_seed(5)
    layer = DeltaNet(16, 2, chunk_size=4, mixer_piece_tokens=6)
    messages = []
    # NaN on rank 1; then rank 1's shard (5 tokens) too short for pieces, rank 0's (8) not
    for x in (torch.randn(1, 8, 16), torch.randn(1, 8 - 3 * rank, 16)):
        if rank == 1 and not messages:
            x[0, 2, 1] = float("nan")
        try:
            layer(x, mesh=mesh())
        except ValueError as err:
            messages.append(str(err))
        else:
            messages.append("no ValueError")
    return messages


def test_bad_input_on_one_rank_raises_on_every_rank():
    (nan0, paths0), (nan1, paths1) = run_ranks(_bad_on_one_rank, 2)
    assert "bad input on 1 rank(s): rank 1: x has 1 NaN/inf values" in nan0
    assert "rank 1: x has 1 NaN/inf values" in nan1
    for said in (paths0, paths1):
        assert "rank 1 has path=whole shard (rank 0: pieces)" in said, said


def _final_state(rank, world):
    """forward(final_state=True) on the pieces and the whole-shard path: the state after the
    whole sequence and the conv tail on every rank, and the next token decoded from them on
    one process equals the layer over the sequence one token longer."""
    m = mesh()
    layout = Contiguous()
    for i, (kwargs, n, piece) in enumerate(CASES[:3]):
        for pieces in (piece, None):
            torch.manual_seed(90 + i)
            layer = DeltaNet(mixer_piece_tokens=None, **kwargs)
            x = torch.randn(2, n * world + 1, kwargs["dim"])  # the last row: the next token
            with torch.no_grad():
                y_ref, s_ref = layer._mix(x[:, :-1], x.new_zeros(2, layer.halo, x.shape[2]))
                layer.mixer_piece_tokens = pieces
                xs = layout.shard(x[:, :-1], 1, rank, world)
                y, state, tail = layer(xs, mesh=m, check=i % 2 == 0, final_state=True)
                y_next, _ = layer._mix(x[:, -1:], tail, state)
                y_all = layer._mix(x, x.new_zeros(2, layer.halo, x.shape[2]))[0]
            where = f"case {i} pieces={pieces} rank {rank}/{world}"
            assert_close(f"{where} y", layout.shard(y_ref, 1, rank, world), y, TOL["y"])
            assert_close(f"{where} state", s_ref, state, TOL["y"])
            rows = layer.halo
            assert torch.equal(tail, x[:, x.shape[1] - 1 - rows:x.shape[1] - 1]), where
            assert_close(f"{where} next token", y_all[:, -1:], y_next, TOL["y"])
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_final_state_continues_the_sequence(world):
    assert run_ranks(_final_state, world) == [True] * world


def test_final_state_of_a_sequence_shorter_than_the_halo():
    torch.manual_seed(8)
    layer = DeltaNet(16, 2, conv_size=4, mixer_piece_tokens=None)
    x = torch.randn(1, 2, 16)
    _, state, tail = layer(x, final_state=True)
    assert tail.shape == (1, 3, 16) and torch.equal(tail[:, 1:], x) and not tail[:, 0].any()
    assert state.shape == (1, 2, 8, 8) and not state.requires_grad


def test_checkpoint_recomputation_keeps_the_last_piece_for_backward():
    """Under activation checkpointing each piece runs in the forward, in its recomputation and
    in the backward sweep, except the last one: the recomputation keeps its graph for the
    sweep, which starts there. Gradients stay exact."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(9)
    layer = DeltaNet(16, 2, chunk_size=4, use_gate=True, mixer_piece_tokens=None)
    x = torch.randn(1, 14, 16, requires_grad=True)
    params = list(layer.parameters())
    g_ref = torch.autograd.grad(layer(x).square().sum(), [x] + params)
    layer.mixer_piece_tokens = 4  # pieces 4, 4, 4, 2
    calls, mix = [], layer._mix
    layer._mix = lambda *a, **kw: calls.append(1) or mix(*a, **kw)
    y = checkpoint(layer, x, use_reentrant=False)
    grads = torch.autograd.grad(y.square().sum(), [x] + params)
    assert len(calls) == 4 + 4 + 3
    for (name, _), ref, g in zip([("x", x)] + list(layer.named_parameters()), g_ref, grads):
        assert_close(f"d{name}", ref, g, TOL["grad"])


def _sends_hold_no_input(rank, world):
    """The one-way sends stay in flight until the layer's next call, so each must own its
    tensor: a view of the input (the halo rows) would keep the whole shard x [B, N, C] alive
    on every rank but the last, one such tensor per layer of a model until its backward."""
    torch.manual_seed(3)
    layer = DeltaNet(32, 2, chunk_size=4, mixer_piece_tokens=4)
    x = torch.randn(1, 12, 32)
    kept = StorageWeakRef(x.untyped_storage())
    with torch.no_grad():  # nothing saved for backward: only the sends could hold x
        y = layer(x, mesh=mesh(), check=False)
    del x
    in_flight = len(layer._in_flight)
    freed = kept.expired()
    all_reduce(y.sum(), mesh().group)  # the other ranks' receives done before the next test
    return freed, in_flight


@pytest.mark.parametrize("world", [2, 4])
def test_in_flight_sends_do_not_keep_the_input_alive(world):
    results = run_ranks(_sends_hold_no_input, world)
    assert [freed for freed, _ in results] == [True] * world, results
    assert all(in_flight > 0 for _, in_flight in results[:-1]), results  # the test sees sends
