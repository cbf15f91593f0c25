"""Collectives take any view (made contiguous at the wire), a rank's own bad argument is not
blamed on a peer, and `agree` raises the same ValueError on every rank."""

from __future__ import annotations

import torch

from seqshard.dist import (CollectiveError, all_gather, all_reduce, all_to_all, exchange,
                           reduce_scatter, ring_shift)
from seqshard.dist.agree import agree
from tests.harness import mesh, run_ranks


def _view(rank):
    """[4, 2, 2] with strides of a transposed [2, 2, 4]: dense but not contiguous."""
    x = (torch.arange(16.0) + 100 * rank).reshape(2, 2, 4).transpose(0, 2)
    assert not x.is_contiguous()
    return x


def _views(rank, world):
    m = mesh()
    g, x = m.group, _view(rank)
    everyone = [_view(r) for r in range(world)]
    torch.testing.assert_close(all_reduce(x, g), sum(everyone))
    torch.testing.assert_close(all_gather(x, 1, g), torch.cat(everyone, 1))
    torch.testing.assert_close(reduce_scatter(x, 0, g), sum(everyone).chunk(world, 0)[rank])
    torch.testing.assert_close(all_to_all(x, g, 0, 1),
                               torch.cat([e.chunk(world, 0)[rank] for e in everyone], 1))
    torch.testing.assert_close(ring_shift(x, g, 1), everyone[(rank - 1) % world])
    into = torch.zeros(2, 2, 4).transpose(0, 2)  # a receive buffer that is a view too
    got = exchange([(x, (rank + 1) % world)], [(into, (rank - 1) % world)], g).wait()[0]
    assert got is into
    torch.testing.assert_close(into, everyone[(rank - 1) % world])
    try:  # a dtype gloo cannot reduce: this rank's own error, found in gloo's worker thread
        all_reduce(torch.ones(2, dtype=torch.float8_e4m3fn), g)
        local = ""
    except CollectiveError as err:
        local = str(err)
    return local


def test_collectives_take_views_and_local_errors_say_so():
    for rank, text in enumerate(run_ranks(_views, 2)):
        assert text.startswith(f"rank {rank}: all_reduce over a group of 2 ranks failed"), text
        assert "the backend rejected this rank's tensor" in text, text


def _agreeing(rank, world):
    m = mesh()
    texts = []
    for facts, problem in [({"N": 4, "dtype": "f32"}, None),
                           ({"N": 4 + (rank == 1), "dtype": "f32"}, None),
                           ({"N": 4, "dtype": "f32"}, "q is 3-D" if rank == 1 else None)]:
        try:
            agree(facts, m.group, what="op", problem=problem, timeout=m.timeout)
            texts.append("")
        except ValueError as err:
            texts.append(str(err))
    return texts


def test_agree_raises_the_same_error_on_every_rank():
    first, second = run_ranks(_agreeing, 2)
    assert first == second
    assert first[0] == ""
    assert "rank 1 has N=5 (rank 0: 4)" in first[1], first[1]
    assert "bad input on 1 rank(s): rank 1: q is 3-D" in first[2], first[2]
