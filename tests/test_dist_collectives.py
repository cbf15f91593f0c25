"""Collectives on 1, 2 and 4 gloo ranks: values and gradients against single-process math.

Every rank builds *all* ranks' inputs from one seed, so it can compute the single-process
reference itself and compare its own piece. Gradients come from a loss sum_r <w_r, out_r>
with per-rank weights w_r; the reference differentiates the same total loss.
"""

import pytest
import torch

from seqshard.dist import (
    all_gather,
    all_reduce,
    agree,
    all_to_all,
    exclusive_scan,
    get_layout,
    heads_to_seq,
    reduce_scatter,
    ring_shift,
    seq_to_heads,
)
from tests.harness import mesh, run_ranks

WORLDS = [1, 2, 4]


def _inputs(world, shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(world)]


def _check_op(rank, world, dist_fn, ref_fn, in_shape, out_shape):
    """dist_fn(x_local) on every rank vs ref_fn([x_0..x_P-1]) -> [out_0..out_P-1]."""
    xs = _inputs(world, in_shape, seed=1)
    ws = _inputs(world, out_shape, seed=2)
    # distributed
    x = xs[rank].clone().requires_grad_(True)
    out = dist_fn(x)
    (out * ws[rank]).sum().backward()
    # single-process reference of the same total loss
    ref_xs = [t.clone().requires_grad_(True) for t in xs]
    ref_outs = ref_fn(ref_xs)
    sum((o * w).sum() for o, w in zip(ref_outs, ws)).backward()
    torch.testing.assert_close(out, ref_outs[rank], rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_xs[rank].grad, rtol=0, atol=1e-12)


def _collectives_case(rank, world):
    group = mesh().group
    # all-to-all, sequence-sharded -> head-sharded: [B, H, N/P, D] -> [B, H/P, N, D]; with
    # B = 1 the send buffer is a view of the input (no copy), with B = 2 a stacked copy
    H, n, D = 4, 3, 5

    def ref_seq_to_heads(xs):
        full = torch.cat(xs, dim=2)  # [B, H, N, D]
        return list(full.chunk(world, dim=1))

    def ref_heads_to_seq(xs):
        full = torch.cat(xs, dim=1)  # [B, H, N, D]
        return list(full.chunk(world, dim=2))

    for B in (1, 2):
        _check_op(rank, world, lambda x: seq_to_heads(x, group), ref_seq_to_heads,
                  (B, H, n, D), (B, H // world, n * world, D))
        _check_op(rank, world, lambda x: heads_to_seq(x, group), ref_heads_to_seq,
                  (B, H // world, n * world, D), (B, H, n, D))
    # a generic all-to-all with scatter dim after gather dim
    _check_op(rank, world, lambda x: all_to_all(x, group, scatter_dim=-1, gather_dim=0),
              lambda xs: [torch.cat([t.chunk(world, -1)[r] for t in xs], 0) for r in range(world)],
              (3, 2 * world), (3 * world, 2))
    # all-gather along dim 1 (backward: reduce-scatter)
    _check_op(rank, world, lambda x: all_gather(x, 1, group),
              lambda xs: [torch.cat(xs, 1)] * world, (2, 3, 2), (2, 3 * world, 2))
    # reduce-scatter along dim 0 (backward: all-gather)
    _check_op(rank, world, lambda x: reduce_scatter(x, 0, group),
              lambda xs: list(sum(xs).chunk(world, 0)), (2 * world, 3), (2, 3))
    # all-reduce
    _check_op(rank, world, lambda x: all_reduce(x, group),
              lambda xs: [sum(xs)] * world, (3, 2), (3, 2))
    # ring shift by one and by two
    for shift in (1, 2):
        _check_op(rank, world, lambda x: ring_shift(x, group, shift),
                  lambda xs: [xs[(r - shift) % world] for r in range(world)], (4,), (4,))
    return True


def _staged_case(rank, world):
    """Every collective, the scan and an exchange into non-contiguous buffers with host
    staging forced on (the path gloo takes for CUDA tensors): same values and gradients."""
    import os

    from seqshard.dist.collectives import FORCE_STAGING_ENV, exchange

    os.environ[FORCE_STAGING_ENV] = "1"
    try:
        assert _collectives_case(rank, world) and _scan_case(rank, world)
        group = mesh().group
        # receive a transposed block into a non-contiguous view: [3, 4] buffer's transpose
        sent = torch.arange(12.0).reshape(4, 3) + 100 * rank
        buffer = torch.zeros(3, 4).t()
        src, dst = (rank - 1) % world, (rank + 1) % world
        (got,) = exchange([(sent, dst)], [(buffer, src)], group).wait()
        assert got is buffer
        torch.testing.assert_close(buffer, torch.arange(12.0).reshape(4, 3) + 100 * src)
    finally:
        del os.environ[FORCE_STAGING_ENV]
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_with_host_staging(world):
    assert run_ranks(_staged_case, world) == [True] * world


def _layout_gather_case(rank, world):
    m = mesh()
    for name in ("contiguous", "zigzag", "striped"):
        layout = get_layout(name)
        seq_len = 3 * layout.divisor(world)
        (full,) = _inputs(1, (2, seq_len, 3), seed=5)
        (w,) = _inputs(1, (2, seq_len, 3), seed=6)
        x = layout.shard(full, 1, rank, world).clone().requires_grad_(True)
        gathered = layout.gather(x, 1, m)
        torch.testing.assert_close(gathered, full, rtol=0, atol=0)
        # every rank's loss uses the whole gathered sequence: the gradient of the summed loss
        # w.r.t. a shard is world * w at its positions
        (gathered * w).sum().backward()
        expected = world * layout.shard(w, 1, rank, world)
        torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)
    return True


@pytest.mark.parametrize("world", WORLDS)
def test_collectives_values_and_grads(world):
    assert run_ranks(_collectives_case, world) == [True] * world
    assert run_ranks(_layout_gather_case, world) == [True] * world


def _affine(earlier, later):
    # maps x -> x @ A + B composed: first `earlier`, then `later`
    a1, b1 = earlier
    a2, b2 = later
    return a1 @ a2, b1 @ a2 + b2


def _scan_case(rank, world):
    group = mesh().group
    pairs = list(zip(_inputs(world, (3, 3), seed=7), _inputs(world, (2, 3), seed=8)))
    identity = (torch.eye(3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
    # forward: rank r gets the composition of ranks 0..r-1
    got = exclusive_scan(pairs[rank], _affine, group, identity=identity)
    expected = identity
    for r in range(rank):
        expected = _affine(expected, pairs[r])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    # reverse: rank r gets the composition of ranks P-1 .. r+1, farthest first
    got_rev = exclusive_scan(pairs[rank], _affine, group, identity=identity, reverse=True)
    expected_rev = identity
    for r in range(world - 1, rank, -1):
        expected_rev = _affine(expected_rev, pairs[r])
    for g, e in zip(got_rev, expected_rev):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    # a single tensor and a non-commutative combine (string-like concatenation of digits)
    digit = torch.tensor([float(rank + 1)])
    got_digits = exclusive_scan(digit, lambda a, b: a * 10 + b, group)
    expected_digits = None if rank == 0 else float("".join(str(r + 1) for r in range(rank)))
    assert (got_digits is None) if rank == 0 else float(got_digits) == expected_digits
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_exclusive_scan_matches_sequential_loop(world):
    assert run_ranks(_scan_case, world) == [True] * world


def _hybrid_groups_case(rank, world):
    m = mesh(ulysses=2, ring=2)
    x = torch.tensor([float(rank)])
    ulysses_sum = float(all_reduce(x, m.ulysses_group))
    ring_sum = float(all_reduce(x, m.ring_group))
    return (m.rank, m.ulysses_rank, m.ring_rank, m.ranks("ulysses"), m.ranks("ring"),
            ulysses_sum, ring_sum)


def test_hybrid_mesh_subgroups_on_4_ranks():
    results = run_ranks(_hybrid_groups_case, 4)
    assert results == [
        (0, 0, 0, [0, 1], [0, 2], 1.0, 2.0),
        (1, 1, 0, [0, 1], [1, 3], 1.0, 4.0),
        (2, 0, 1, [2, 3], [0, 2], 5.0, 2.0),
        (3, 1, 1, [2, 3], [1, 3], 5.0, 4.0),
    ]


def _bad_input_case(rank, world):
    import torch.distributed as dist

    from seqshard.dist import Mesh

    group = mesh().group
    errors = []
    # heads not divisible by the all-to-all group
    try:
        seq_to_heads(torch.zeros(1, 3, 2, 4), group)
    except ValueError as err:
        errors.append(str(err))
    # shapes that differ across ranks are named, on every rank (through dist.agree, the one
    # agreement mechanism)
    try:
        agree({"q.shape": (2, 3 + rank)}, group, what="q")
    except ValueError as err:
        errors.append(str(err))
    # a Ulysses degree that does not divide the world
    try:
        Mesh.new(ulysses=3)
    except ValueError as err:
        errors.append(str(err))
    # Mesh.from_env adopts the running group (started through DeepSpeed's comm)
    adopted = Mesh.from_env()
    assert adopted.size == world and dist.is_initialized()
    return errors


def test_bad_inputs_raise_clear_errors():
    results = run_ranks(_bad_input_case, 2)
    for errors in results:
        assert len(errors) == 3, errors
        assert "(1, 3, 2, 4)" in errors[0] and "3" in errors[0] and "group size 2" in errors[0]
        assert errors[1].startswith("q: the ranks were called with different arguments")
        assert "rank 1 has q.shape=(2, 4) (rank 0: (2, 3))" in errors[1]
        assert "world size 2 is not divisible by dp=1 x ulysses=3" in errors[2]
