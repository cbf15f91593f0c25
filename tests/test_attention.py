"""Exact attention: the fused local kernel and every sharded strategy against the naive oracle
and torch SDPA, outputs and all three gradients, on 1, 2 and 4 gloo ranks."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from seqshard.dist import get_layout
from seqshard.ops.attention import (ShardedAttention, local_attention, make_sdpa,
                                    resolve_strategy, sharded_attention)
from seqshard.ops.attention import kernels
from seqshard.ops.attention.naive import naive_attention
from tests.common import assert_close
from tests.harness import mesh, run_ranks

# named tolerances (max abs error relative to max(1, max |reference|))
TOL = {"fp32": {"out": 2e-5, "dq": 2e-5, "dk": 2e-5, "dv": 2e-5},
       "bf16": {"out": 3e-2, "dq": 5e-2, "dk": 5e-2, "dv": 5e-2}}


def _inputs(seed, b, hq, hkv, n, d, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv, hq))
    return [t.to(dtype) for t in (q, k, v)], g.to(dtype)


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


# --- single process ----------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_local_attention_matches_naive_and_sdpa(causal, hkv):
    (q, k, v), g = _inputs(0, 2, 4, hkv, 37, 48)
    got = _grads(lambda *t: local_attention(*t, causal=causal)[0], q, k, v, g)
    ref = _grads(lambda *t: naive_attention(*t, causal=causal)[0], q, k, v, g)
    sdpa = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal,
                                                            enable_gqa=True), q, k, v, g)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ref, got, sdpa):
        assert_close(name, a, b, TOL["fp32"][name])
        assert_close(name + " (sdpa)", c, b, TOL["fp32"][name])
    _, lse = local_attention(q, k, v, causal=causal)
    assert_close("lse", naive_attention(q, k, v, causal=causal)[1], lse, 2e-5)


def test_plain_fallback_when_fused_kernels_are_missing(monkeypatch):
    monkeypatch.setattr(kernels, "FUSED_CPU", None)  # as if a torch release dropped them
    (q, k, v), g = _inputs(5, 2, 4, 2, 19, 48)
    for causal in (False, True):
        got = _grads(lambda *t: sharded_attention(*t, causal=causal), q, k, v, g)
        ref = _grads(lambda *t: naive_attention(*t, causal=causal)[0], q, k, v, g)
        for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
            assert_close(f"fallback {name} causal={causal}", a, b, TOL["fp32"][name])


@pytest.mark.parametrize("kind", ["full", "causal", "strict"])
def test_block_kernel_fused_matches_plain_path(kind, monkeypatch):
    """The fused and plain (query-tiled) block paths agree, given a final out/lse from a
    larger softmax; tiles of 4 rows make the 9-row block span three tiles."""
    from seqshard.ops.attention import plain

    monkeypatch.setattr(plain, "TILE_ROWS", 4)
    (q, k, v), g = _inputs(1, 1, 4, 2, 9, 32)
    scale = 32 ** -0.5
    o1, l1 = kernels.block_forward(q, k, v, kind, scale)
    ke, ve = (kernels._expand_kv(t, 4) for t in (k, v))
    o2, l2 = plain.plain_forward(q, ke, ve, kind, scale)
    assert_close("out", o2, o1, 2e-5)
    finite = ~l2.isinf()
    assert torch.equal(finite, ~l1.isinf()) and torch.allclose(l1[finite], l2[finite], atol=2e-5)
    lse = torch.logaddexp(l1, torch.randn_like(l1))  # as if other blocks had contributed
    fused = kernels.block_backward(g, q, k, v, o1, lse, kind, scale)
    dq, dk, dv = plain.plain_backward(g, q, ke, ve, o1, lse, kind, scale)
    for a, b in zip(fused, (dq, kernels._fold_kv(dk, 2), kernels._fold_kv(dv, 2))):
        assert_close("grad", b, a, 2e-5)


def test_bf16_local_attention():
    (q, k, v), g = _inputs(2, 2, 4, 2, 33, 64, torch.bfloat16)
    got = _grads(lambda *t: sharded_attention(*t, causal=True), q, k, v, g)
    ref = _grads(lambda *t: naive_attention(*t, causal=True)[0],
                 *(t.float() for t in (q, k, v)), g.float())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        assert_close(name, a, b, TOL["bf16"][name])


def test_packed_docs_single_process_equal_per_document_attention():
    lens = [5, 1, 11, 8]
    (q, k, v), g = _inputs(3, 2, 4, 2, sum(lens), 48)
    for causal in (False, True):
        got = _grads(lambda *t: sharded_attention(*t, causal=causal, doc_lens=lens), q, k, v, g)
        # reference: each document on its own, concatenated
        def per_doc(q, k, v):
            outs = [naive_attention(*(t.narrow(2, s, n) for t in (q, k, v)), causal=causal)[0]
                    for s, n in zip(itertools.accumulate([0] + lens[:-1]), lens)]
            return torch.cat(outs, 2)
        ref = _grads(per_doc, q, k, v, g)
        for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
            assert_close(f"{name} causal={causal}", a, b, TOL["fp32"][name])


def test_bad_input_single_process():
    q = torch.randn(1, 4, 8, 32)
    cases = [
        ((q, torch.randn(1, 3, 8, 32), torch.randn(1, 3, 8, 32)), {}, "not divisible by key/value heads 3"),
        ((q, torch.randn(1, 4, 7, 32), torch.randn(1, 4, 7, 32)), {}, "(1, 4, 7, 32)"),
        ((q, q, torch.randn(1, 4, 8, 16)), {}, "(1, 4, 8, 16)"),
        ((q, q.double(), q), {}, "torch.float64"),
        ((q, torch.randn(1, 4, 8, 32, device="meta"), q), {}, "meta"),
        ((q[0], q[0], q[0]), {}, "4-D"),
        ((q, q, q), {"strategy": "bogus"}, "bogus"),
        ((q, q, q), {"layout": "spiral"}, "spiral"),
        ((q, q, q), {"doc_lens": [3, 4]}, "[3, 4]"),
    ]
    for args, kwargs, text in cases:
        with pytest.raises(ValueError, match=None) as info:
            sharded_attention(*args, **kwargs)
        assert text in str(info.value), (text, str(info.value))
    sdpa = make_sdpa(None)
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p=0.1"):
        sdpa(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(q, q[:, :2], q[:, :2])


def test_sdpa_dropin_and_module_single_process():
    (q, k, v), g = _inputs(4, 2, 4, 2, 21, 32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    out = make_sdpa(None)(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert_close("sdpa drop-in", ref, out, 2e-5)
    module = ShardedAttention(None, causal=True, scale=0.3)
    assert_close("module", ref, module(q, k, v), 2e-5)


# --- across ranks ------------------------------------------------------------------------------
def _run_case(rank, world, m, *, seed, strategy, causal, layout, hq, hkv, d, n_local=10, b=2,
              dtype=torch.float32, doc_lens=None, tol="fp32"):
    """One configuration: this rank's output and gradients against the full-sequence oracle."""
    n = n_local * world
    (q, k, v), g = _inputs(seed, b, hq, hkv, n, d, dtype)
    lay = get_layout(layout)
    full = [t.float() for t in (q, k, v)]
    ref = _grads(lambda *t: naive_attention(*t, causal=causal, doc_lens=doc_lens)[0], *full,
                 g.float())
    shard = lambda t: lay.shard(t, 2, m.rank, world)  # noqa: E731
    got = _grads(lambda *t: sharded_attention(*t, m, causal=causal, layout=layout,
                                              strategy=strategy, doc_lens=doc_lens),
                 *(shard(t) for t in (q, k, v)), shard(g))
    label = (f"P={world} {strategy} causal={causal} {layout} Hq={hq} Hkv={hkv} D={d} "
             f"{dtype} docs={doc_lens}")
    for name, a, c in zip(("out", "dq", "dk", "dv"), ref, got):
        assert_close(f"{label}: {name}", shard(a), c, TOL[tol][name])
    if doc_lens is None and dtype == torch.float32:  # torch's own kernel as a second oracle
        sdpa = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal,
                                                                enable_gqa=True),
                      *full, g.float())
        for name, a, c in zip(("out", "dq", "dk", "dv"), sdpa, got):
            assert_close(f"{label}: {name} vs sdpa", shard(a), c, TOL[tol][name])
        # and the gathered output is the full sequence's in global order
        assert_close(f"{label}: gathered out", sdpa[0], lay.gather(got[0], 2, m), TOL[tol]["out"])


def _strategy_cases(world):
    strategies = ["ring", "ulysses", "allgather"] + (["hybrid"] if world == 4 else [])
    layouts = ["contiguous", "zigzag", "striped"]
    cases = []
    for i, (strategy, causal, layout, hkv) in enumerate(
            itertools.product(strategies, (False, True), layouts, (4, 2, 1))):
        cases.append(dict(seed=i, strategy=strategy, causal=causal, layout=layout, hq=4,
                          hkv=hkv, d=48 if i % 2 else 32))
    # packed documents: boundaries inside and across shards, a one-token document
    docs = {1: [3, 7], 2: [7, 1, 12], 4: [13, 1, 6, 20]}[world]
    for j, (strategy, causal, layout) in enumerate(itertools.product(
            strategies, (False, True), ("contiguous", "zigzag", "striped"))):
        cases.append(dict(seed=100 + j, strategy=strategy, causal=causal, layout=layout, hq=4,
                          hkv=2, d=32, doc_lens=docs))
    for j, strategy in enumerate(strategies):  # the largest head dim, odd shard length
        cases.append(dict(seed=300 + j, strategy=strategy, causal=True, layout="contiguous",
                          hq=4, hkv=1, d=256, n_local=7))
    for j, layout in enumerate(layouts):  # 3 K/V heads x batch 2: uneven backward head groups
        cases.append(dict(seed=400 + j, strategy="ring", causal=True, layout=layout, hq=6,
                          hkv=3, d=48, n_local=9 if layout == "contiguous" else 10))
    for j, strategy in enumerate(strategies):  # bf16 stays within bf16 tolerance
        cases.append(dict(seed=200 + j, strategy=strategy, causal=True, layout="zigzag", hq=4,
                          hkv=2, d=64, dtype=torch.bfloat16, tol="bf16"))
    return cases


def _all_cases(rank, world):
    if world == 4:
        assert resolve_strategy("auto", mesh(ulysses=2, ring=2), 4) == "hybrid"
    for case in _strategy_cases(world):
        hybrid = case["strategy"] == "hybrid"
        m = mesh(ulysses=2, ring=2) if hybrid else mesh()
        _run_case(rank, world, m, **case)
    return len(_strategy_cases(world))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_strategy_matches_oracle(world):
    counts = run_ranks(_all_cases, world)
    assert counts == [len(_strategy_cases(world))] * world


def _deepspeed_equal(rank, world):
    """Our Ulysses equals DeepSpeed's DistributedAttention on the same inputs, incl. grads."""
    from deepspeed.sequence.layer import DistributedAttention

    m = mesh()

    def local(q, k, v, causal):  # DeepSpeed hands [B, N, H/P, D]
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                             is_causal=causal)
        return out.transpose(1, 2)

    for causal in (False, True):
        (q, k, v), g = _inputs(7, 2, 4, 4, 12 * world, 48)
        shard = lambda t: get_layout("contiguous").shard(t, 2, m.rank, world)  # noqa: E731
        q, k, v, g = (shard(t) for t in (q, k, v, g))
        ours = _grads(lambda *t: sharded_attention(*t, m, causal=causal, strategy="ulysses"),
                      q, k, v, g)
        ds_attn = DistributedAttention(lambda *t: local(*t, causal), m.group, scatter_idx=2,
                                       gather_idx=1)
        theirs = _grads(lambda *t: ds_attn(*(x.transpose(1, 2) for x in t), 0).transpose(1, 2),
                        q, k, v, g)
        for name, a, c in zip(("out", "dq", "dk", "dv"), theirs, ours):
            assert_close(f"deepspeed causal={causal}: {name}", a, c, TOL["fp32"][name])


def test_ulysses_equals_deepspeed():
    run_ranks(_deepspeed_equal, 2)


def _bad_input_across_ranks(rank, world):
    m = mesh()
    q = torch.randn(1, 3, 6, 32)
    with pytest.raises(ValueError, match="query heads 3 are not divisible by the Ulysses degree 2"):
        sharded_attention(q, q, q, m, strategy="ulysses")
    q = torch.randn(1, 4, 5, 32)
    with pytest.raises(ValueError, match="sequence length 10 .* zigzag"):
        sharded_attention(q, q, q, m, layout="zigzag", causal=True)
    with pytest.raises(ValueError, match="sum to the global sequence length 10"):
        sharded_attention(q, q, q, m, doc_lens=[4, 5])
    # auto: heads divisible -> ulysses; not divisible -> ring; both degrees > 1 -> hybrid
    assert resolve_strategy("auto", m, 4) == "ulysses"
    assert resolve_strategy("auto", m, 3) == "ring"
    # the group still works after the errors: no rank is left waiting in a collective
    out = sharded_attention(q, q, q, m, causal=True, strategy="ring")
    # the drop-in and the module compute the same sharded attention
    k = torch.randn(1, 2, 5, 32)
    via_sdpa = make_sdpa(m, layout="striped", strategy="ulysses")(q, k, k, is_causal=True,
                                                                   scale=0.2, enable_gqa=True)
    module = ShardedAttention(m, causal=True, scale=0.2, layout="striped", strategy="ring")
    direct = sharded_attention(q, k, k, m, causal=True, scale=0.2, layout="striped",
                               strategy="allgather")
    assert_close("make_sdpa", direct, via_sdpa, 2e-5)
    assert_close("ShardedAttention", direct, module(q, k, k), 2e-5)
    return out.shape


def test_bad_input_across_ranks():
    assert run_ranks(_bad_input_across_ranks, 2) == [torch.Size([1, 4, 5, 32])] * 2


def test_plans_stay_on_the_fused_kernel():
    """Plans are data: contiguous Ulysses is one causal block, zigzag ring steps are few
    blocks, and document cuts on contiguous/zigzag shards need no explicit masks."""
    from seqshard.ops.attention.plan import build_plan

    lay = {name: get_layout(name) for name in ("contiguous", "zigzag", "striped")}
    one = build_plan(lay["contiguous"], 64, 4, range(4), range(4), causal=True)
    assert [(p.q_len, p.k_len, p.kind) for p in one] == [(64, 64, "causal")]
    # allgather on contiguous shards: earlier ranks coalesce into one full block
    ag = build_plan(lay["contiguous"], 64, 4, (2,), range(4), causal=True)
    assert sorted((p.k_start, p.k_len, p.kind) for p in ag) == [(0, 32, "full"), (32, 16, "causal")]
    # zigzag: the block from an earlier rank is both chunks of queries against its first chunk
    zz = build_plan(lay["zigzag"], 64, 4, (2,), (1,), causal=True)
    assert [(p.q_start, p.q_len, p.k_start, p.k_len, p.kind) for p in zz] == [(0, 16, 0, 8, "full")]
    for name in ("contiguous", "zigzag"):
        for a, b in itertools.product(range(4), range(4)):
            plan = build_plan(lay[name], 64, 4, (a,), (b,), causal=True, doc_lens=[9, 1, 30, 24])
            assert all(p.kind in ("full", "causal", "strict") for p in plan), (name, a, b)
    # a document boundary that is not aligned between striped shards: its diagonal becomes
    # 'full' and 'causal' pieces whose visible pairs are exactly the oracle mask's
    for doc_lens in ([9, 55], [3, 20, 41], [64]):
        for a, b in itertools.product(range(4), range(4)):
            plan = build_plan(lay["striped"], 64, 4, (a,), (b,), causal=True, doc_lens=doc_lens)
            assert torch.equal(_plan_pairs(plan), _oracle_pairs(lay["striped"], a, b, doc_lens)), (a, b)


def _plan_pairs(plan) -> torch.Tensor:
    """How many pieces cover each (local query, local key) pair (pieces may share rows)."""
    count = torch.zeros(16, 16, dtype=torch.int64)
    reach = {"full": 16, "causal": 0, "strict": -1}
    for p in plan:
        i, j = torch.arange(p.q_len)[:, None], torch.arange(p.k_len)[None, :]
        count[p.q_slice, p.k_slice] += (j - i <= reach[p.kind]).long()
    return count


def _oracle_pairs(layout, a, b, doc_lens) -> torch.Tensor:
    from seqshard.ops.attention.naive import attention_mask

    full = attention_mask(64, 64, causal=True, doc_lens=doc_lens)
    return full[layout.positions(64, a, 4)][:, layout.positions(64, b, 4)].long()


def _streaming(rank, world, stream_from: int = 0):
    """What travels in the memory-lean paths: the ring backward sends one head group's K/V
    and dK/dV share at a time (never a whole block), and Ulysses all-to-alls one head group
    at a time, forward and backward (never every head). Returns what was seen."""
    from seqshard.ops.attention import ring

    sent, a2a_heads = [], []
    real_exchange, real_a2a = ring.exchange, ring.seq_to_heads

    def exchange(sends, recvs, *args, **kwargs):
        sent.extend(tuple(t.shape) for t, _ in sends)
        return real_exchange(sends, recvs, *args, **kwargs)

    def seq_to_heads(x, *args, **kwargs):
        a2a_heads.append(x.shape[1])
        return real_a2a(x, *args, **kwargs)

    m = mesh()
    (q, k, v), g = _inputs(rank, 1, 4, 4, 16, 32)
    ring.exchange, ring.seq_to_heads = exchange, seq_to_heads
    # 0: stream even these tiny blocks
    stream_from, ring.STREAM_MIN_BYTES = ring.STREAM_MIN_BYTES, stream_from
    try:
        for strategy, layout in (("ring", "zigzag"), ("ulysses", "contiguous")):
            _grads(lambda *t: sharded_attention(*t, m, causal=True, layout=layout,
                                                strategy=strategy), q, k, v, g)
    finally:
        ring.exchange, ring.seq_to_heads = real_exchange, real_a2a
        ring.STREAM_MIN_BYTES = stream_from
    return sorted(set(sent)), a2a_heads


def test_backward_and_ulysses_stream_head_groups():
    for sent, a2a_heads in run_ranks(_streaming, 2):
        # ring backward at P=2: 4 K/V heads in 4 groups: [1, 1, 16, 32] messages only
        assert sent == [(1, 1, 16, 32)], sent
        # ulysses: 2 head groups of 2 heads (1 per rank): 3 all-to-alls each forward, 5 backward
        assert a2a_heads == [2] * 16, a2a_heads
    # K blocks under STREAM_MIN_BYTES: the Ulysses stage moves all heads at once (8 calls)
    for _, a2a_heads in run_ranks(_streaming, 2, 1 << 20):
        assert a2a_heads == [4] * 8, a2a_heads
