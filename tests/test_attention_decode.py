"""decode_attention: new tokens' queries against a KV cache split unevenly over ranks (empty
shards, shuffled positions, windows, GQA, T > 1, every float dtype, strided views) equal the
naive reference over the whole cache; bad input raises the same ValueError on every rank."""

from __future__ import annotations

import pytest
import torch

from seqshard.ops.attention.decode import decode_attention, local_decode, visible
from seqshard.ops.attention.naive import naive_attention
from tests.common import assert_close
from tests.harness import mesh, run_ranks

TOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (name, B, Hq, Hkv, T, D, S, window, dtype)
CASES = [
    ("mha", 2, 2, 2, 1, 8, 13, None, torch.float32),
    ("gqa_t3", 1, 6, 2, 3, 16, 21, None, torch.float64),
    ("window", 2, 4, 1, 2, 8, 17, 5, torch.float32),
    ("window1", 1, 2, 1, 4, 8, 9, 1, torch.float32),
    ("bf16", 1, 4, 2, 2, 32, 19, 8, torch.bfloat16),
    ("fp16", 2, 2, 1, 1, 8, 11, None, torch.float16),
]


def _split(s: int, world: int, gen) -> list[int]:
    """Unequal shard sizes summing to s, rank 1 (when there is one) holding nothing."""
    cuts = sorted(torch.randint(0, s + 1, (world - 1,), generator=gen).tolist())
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [s])]
    if world > 1:
        sizes[0], sizes[1] = sizes[0] + sizes[1], 0
    return sizes


def _case(rank, world, name, b, hq, hkv, t, d, s, window, dtype, strided):
    """This rank's decode output and the reference over the whole cache (every rank builds the
    same global tensors from one seed and keeps its slice)."""
    gen = torch.Generator().manual_seed(len(name) * 1000 + s)
    # the context: S tokens at positions 0..S-1 then T new ones, cached in shuffled order
    k = torch.randn(b, hkv, s + t, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, s + t, d, generator=gen, dtype=torch.float64).to(dtype)
    q = torch.randn(b, hq, t, d, generator=gen, dtype=torch.float64).to(dtype)
    order = torch.randperm(s + t, generator=gen)
    positions = torch.arange(s + t)[order]
    query_positions = torch.arange(s, s + t)
    sizes = _split(s + t, world, gen)
    lo = sum(sizes[:rank])
    mine = order[lo:lo + sizes[rank]]
    k_local, v_local = k[:, :, mine], v[:, :, mine]  # [B, Hkv, S_local, D]
    if strided:  # a transposed cache and a head-sliced query
        k_local = k_local.transpose(1, 2).contiguous().transpose(1, 2)
        q = torch.cat([q, q], dim=1)[:, ::2] if hq == hkv else q
    out = decode_attention(q, k_local, v_local, positions[lo:lo + sizes[rank]],
                           query_positions, mesh(), window=window)
    kp, qp = torch.arange(s + t), query_positions
    mask = kp[None, :] <= qp[:, None]
    if window is not None:
        mask &= kp[None, :] > qp[:, None] - window
    ref, _ = naive_attention(q.double(), k.double(), v.double(), mask=mask)
    return ref, out


def _all_cases(rank, world):
    results = {}
    for case in CASES:
        for strided in (False, True):
            ref, out = _case(rank, world, *case, strided)
            results[(case[0], strided)] = (ref, out, case[-1])
    return results


@pytest.mark.parametrize("world", [1, 2, 4])
def test_decode_equals_naive_over_the_whole_cache(world):
    per_rank = run_ranks(_all_cases, world)
    for rank, results in enumerate(per_rank):
        for (name, strided), (ref, out, dtype) in results.items():
            assert out.dtype == dtype, name
            assert_close(f"{name} strided={strided} P={world} rank {rank}", ref, out, TOL[dtype])
            # every rank returns the same output
            assert torch.equal(out, per_rank[0][(name, strided)][1]), (name, rank)


def test_decode_without_mesh_and_empty_queries():
    q = torch.randn(1, 2, 1, 8)
    k = v = torch.randn(1, 1, 4, 8)
    out = decode_attention(q, k, v, torch.arange(4), torch.tensor([3]), None)
    ref, _ = naive_attention(q, k, v, mask=torch.ones(1, 4, dtype=torch.bool))
    assert_close("no mesh", ref, out, 1e-5)
    empty = decode_attention(q[:, :, :0], k, v, torch.arange(4), torch.arange(0), None)
    assert empty.shape == (1, 2, 0, 8)


def test_decode_in_runs_of_keys_equals_one_block():
    """The runs of KEY_CHUNK keys: runs that see nothing (window) merge to the same result."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 3, 8, generator=gen)
    k, v = (torch.randn(2, 2, 23, 8, generator=gen) for _ in range(2))
    mask = visible(torch.arange(23), torch.tensor([20, 21, 22]), 6)  # keys 15..22 only
    whole = local_decode(q, k, v, mask, 0.3, chunk=23)
    for chunk in (1, 4, 7):
        out, lse = local_decode(q, k, v, mask, 0.3, chunk=chunk)
        assert_close(f"out, runs of {chunk}", whole[0], out, 1e-6)
        assert_close(f"lse, runs of {chunk}", whole[1], lse, 1e-6)


def _bad_inputs(rank, world):
    """Each bad call raises on every rank (rank 0 alone is wrong in most of them)."""
    m = mesh()
    q = torch.randn(1, 2, 1, 8)
    k = v = torch.randn(1, 1, 3, 8)
    kp, qp = torch.arange(3) + 3 * rank, torch.tensor([3 * world])
    bad = {
        "key_positions has 2 entries": dict(key_positions=kp[:2] if rank == 0 else kp),
        "int64 tensor": dict(key_positions=kp.int() if rank == 0 else kp),
        "not divisible": dict(k_cache=torch.randn(1, 3, 3, 8) if rank == 0 else k,
                              v_cache=torch.randn(1, 3, 3, 8) if rank == 0 else v),
        "different arguments": dict(query_positions=qp + (rank == 0)),
        "window=0": dict(window=0),
        "see no cached key": dict(query_positions=torch.tensor([-1])),
        "see no cached key ": dict(window=1),  # the query's own key was never appended
    }
    raised = {}
    for expected, change in bad.items():
        args = dict(q=q, k_cache=k, v_cache=v, key_positions=kp, query_positions=qp)
        window = change.pop("window", None)
        args.update(change)
        try:
            decode_attention(args["q"], args["k_cache"], args["v_cache"], args["key_positions"],
                             args["query_positions"], m, window=window)
            raised[expected] = None
        except ValueError as err:
            raised[expected] = str(err)
    return raised


@pytest.mark.parametrize("world", [1, 2])
def test_decode_bad_input_raises_on_every_rank(world):
    for rank, raised in enumerate(run_ranks(_bad_inputs, world)):
        for expected, message in raised.items():
            if world == 1 and expected == "different arguments":
                continue  # one rank cannot disagree with itself
            assert message is not None and expected.strip() in message, (world, rank, expected,
                                                                          message)
