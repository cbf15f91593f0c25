"""Attention on the tensors real models pass (issue 14): views with odd strides (permuted,
transposed, expanded, a strided last dim), empty batches/sequences/head dims, bad dtypes,
and ranks that disagree -- through every entry point, strategy and layout, on 1, 2 and 4
gloo ranks, forward and backward against the fp64 naive reference, or a clear ValueError
raised on every rank (never a hang, never a silently wrong answer)."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from seqshard.dist import get_layout
from seqshard.ops.attention import (ShardedAttention, local_attention, make_sdpa,
                                    sharded_attention, window_attention)
from seqshard.ops.attention.naive import naive_attention
from tests.common import assert_close
from tests.harness import mesh, run_ranks

TOL = 2e-5  # fp32 sharded against the fp64 reference, relative to max(1, max |ref|)
B, HQ, HKV, D = 2, 4, 2, 16


# --- how models hand over q, k, v ----------------------------------------------------------------
# A view kind is (make bases, sequence dim of each base, bases -> (q, k, v) [B, H, N, D] views).
# The bases are the leaves: gradients are compared on them, so views that share or broadcast
# memory (a fused qkv projection, GQA by expand) are checked exactly as autograd sees them.
def _packed(b, n, gen):
    """One fused projection [B, N, Hq + 2 Hkv, D], split by heads and transposed (no copy)."""
    return [torch.randn(b, n, HQ + 2 * HKV, D, generator=gen, dtype=torch.float64)], [1]


def _packed_view(bases):
    (x,) = bases
    parts = x.split([HQ, HKV, HKV], dim=2)  # [B, N, h, D] each
    return tuple(p.transpose(1, 2) for p in parts)  # [B, h, N, D], strides of [B, N, H, D]


def _per_tensor(shape_fn, seq_dim):
    def make(b, n, gen):
        return [torch.randn(*shape_fn(b, h, n), generator=gen, dtype=torch.float64)
                for h in (HQ, HKV, HKV)], [seq_dim] * 3
    return make


VIEWS = {
    "contiguous": (_per_tensor(lambda b, h, n: (b, h, n, D), 2), lambda t: tuple(t)),
    "packed": (_packed, _packed_view),  # qkv(x).unflatten(...).permute(...) then unbind
    "transposed": (_per_tensor(lambda b, h, n: (b, n, h, D), 1),
                   lambda t: tuple(x.transpose(1, 2) for x in t)),
    # every other element of the last dim: stride 2 there
    "strided": (_per_tensor(lambda b, h, n: (b, h, n, 2 * D), 2),
                lambda t: tuple(x[..., ::2] for x in t)),
    # GQA by broadcasting one stored head: stride 0 over heads
    "expanded": (_per_tensor(lambda b, h, n: (b, 1, n, D), 2),
                 lambda t: tuple(x.expand(-1, h, -1, -1) for x, h in zip(t, (HQ, HKV, HKV)))),
}


def _band(n, window):
    i = torch.arange(n)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)


def _check_case(m, *, view, fn, causal, layout="contiguous", n_local=8, b=B, window=None,
                label=""):
    """fn(q, k, v) on this rank's shard of a view kind vs the fp64 reference on the whole
    sequence: output and the gradients of the bases (given a grad_out with a strided last
    dim, as a transposed projection hands it back)."""
    make, as_qkv = VIEWS[view]
    world, lay = m.size, get_layout(layout)
    n = n_local * world
    gen = torch.Generator().manual_seed(zlib.crc32(repr((view, layout, causal, n)).encode()))
    bases, seq_dims = make(b, n, gen)
    g = torch.randn(b, HQ, n, 2 * D, generator=gen, dtype=torch.float64)[..., ::2]

    full = [x.clone().requires_grad_(True) for x in bases]
    mask = None if window is None else _band(n, window)
    ref, _ = naive_attention(*as_qkv(full), causal=causal, mask=mask)
    ref.backward(g)

    shard = lambda t, dim: lay.shard(t, dim, m.rank, world)  # noqa: E731
    local = [shard(x, d).float().requires_grad_(True) for x, d in zip(bases, seq_dims)]
    out = fn(*as_qkv(local))
    out.backward(shard(g, 2).float().transpose(-1, -2).contiguous().transpose(-1, -2))
    tag = f"P={world} {label} view={view} {layout} causal={causal}"
    assert_close(f"{tag}: out", shard(ref.detach(), 2), out, TOL)
    for i, (x, d) in enumerate(zip(full, seq_dims)):
        assert_close(f"{tag}: grad of base {i}", shard(x.grad, d), local[i].grad, TOL)


def _strategies(world):
    return ["ring", "ulysses", "allgather"] + (["hybrid"] if world == 4 else [])


def _mesh_for(strategy):
    return mesh(ulysses=2, ring=2) if strategy == "hybrid" else mesh()


def _view_cases(rank, world):
    """Every view kind x strategy x layout through sharded_attention; the drop-ins, the
    module and the window on some of them. Returns the number of cases run."""
    cases = 0
    combos = itertools.product(_strategies(world), ("contiguous", "zigzag", "striped"), VIEWS)
    for i, (strategy, layout, view) in enumerate(combos):
        m, causal = _mesh_for(strategy), i % 3 != 0
        kw = dict(causal=causal, layout=layout, strategy=strategy)
        _check_case(m, view=view, causal=causal, layout=layout, label=strategy,
                    fn=lambda q, k, v: sharded_attention(q, k, v, m, **kw))
        cases += 1
    m = mesh()
    for view in VIEWS:
        sdpa = make_sdpa(m, layout="zigzag", strategy="ring")
        _check_case(m, view=view, causal=True, layout="zigzag", label="make_sdpa",
                    fn=lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True))
        module = ShardedAttention(m, causal=True, layout="striped")
        _check_case(m, view=view, causal=True, layout="striped", label="module", fn=module)
        for w in (3, 10**9):  # a window past the whole sequence is plain causal attention
            _check_case(m, view=view, causal=True, window=min(w, 8 * world),
                        label=f"window={w}",
                        fn=lambda q, k, v: sharded_attention(q, k, v, m, causal=True, window=w))
        _check_case(m, view=view, causal=True, label="window_attention", window=5,
                    fn=lambda q, k, v: window_attention(q, k, v, m, window=5))
        cases += 5
    if world == 1:
        for view, causal in itertools.product(VIEWS, (False, True)):
            _check_case(m, view=view, causal=causal, label="local_attention",
                        fn=lambda q, k, v: local_attention(q, k, v, causal=causal)[0])
            cases += 1
    return cases


@pytest.mark.parametrize("world", [1, 2, 4])
def test_views_match_the_reference(world):
    counts = run_ranks(_view_cases, world)
    assert len(set(counts)) == 1 and counts[0] > 0, counts


# --- empty inputs ------------------------------------------------------------------------------
def _empty_cases(rank, world):
    """N = 0, B = 0 and D = 0 give an empty output and zero-size gradients on every path, as
    torch's SDPA does. Returns the shapes seen."""
    seen = []
    shapes = [(B, 0, D), (0, 4, D), (B, 4, 0)]  # (B, N_local, D)
    for (b, n, d), strategy in itertools.product(shapes, _strategies(world) + ["window"]):
        m = _mesh_for(strategy)
        q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for h in (HQ, HKV, HKV))
        if strategy == "window":
            out = sharded_attention(q, k, v, m, causal=True, window=3)
        else:
            out = sharded_attention(q, k, v, m, causal=True, layout="zigzag", strategy=strategy)
        out.sum().backward()
        assert out.shape == q.shape, (strategy, out.shape)
        assert [t.grad.shape for t in (q, k, v)] == [q.shape, k.shape, v.shape]
        seen.append(tuple(out.shape))
    for b, n, d in shapes:
        q = torch.randn(b, HQ, n * world, d, requires_grad=True)
        out = window_attention(q, q, q, mesh(), window=2)
        out.sum().backward()
        assert out.shape == q.shape and q.grad.shape == q.shape
        if world == 1:
            out, lse = local_attention(q, q, q, causal=True)
            out.sum().backward()
            assert out.shape == q.shape and lse.shape == q.shape[:3]
    return seen


@pytest.mark.parametrize("world", [1, 2])
def test_empty_inputs_give_empty_results(world):
    results = run_ranks(_empty_cases, world)
    assert all(r == results[0] for r in results)


# --- bad input: the same ValueError on every rank -------------------------------------------
def _errors(cases):
    """Run each (fn) and collect the ValueError text ('' when none was raised)."""
    texts = []
    for fn in cases:
        try:
            fn()
            texts.append("")
        except ValueError as err:
            texts.append(str(err))
    return texts


def _bad_dtype_cases(rank, world):
    m = mesh()
    x = torch.randn(1, HQ, 4, D)
    cases = [lambda: sharded_attention(x, x.bfloat16(), x, m),  # mixed dtypes
             lambda: make_sdpa(m)(x, x, x.double())]
    for dtype in (torch.int64, torch.bool, torch.complex64):
        y = x.to(dtype)
        cases += [lambda y=y: sharded_attention(y, y, y, m, causal=True),
                  lambda y=y: local_attention(y, y, y),
                  lambda y=y: window_attention(y, y, y, m, window=2)]
    return _errors(cases)


@pytest.mark.parametrize("world", [1, 2])
def test_bad_dtypes_raise_on_every_rank(world):
    results = run_ranks(_bad_dtype_cases, world)
    texts = results[0]
    assert "torch.float32" in texts[0] and "torch.bfloat16" in texts[0], texts[0]
    assert "torch.float64" in texts[1], texts[1]
    for dtype, chunk in zip(("int64", "bool", "complex64"), range(2, len(texts), 3)):
        for text in texts[chunk:chunk + 3]:
            assert f"torch.{dtype}" in text and "float16" in text, text
    for other in results[1:]:
        assert [bool(t) for t in other] == [True] * len(texts), other


def _disagreeing(rank, world):
    """Rank 1 differs from the others in one thing per case; every rank must raise."""
    m = mesh()
    x = torch.randn(1, HQ, 4, D)
    other = rank == 1
    cases = [
        lambda: sharded_attention(*(torch.randn(1, HQ, 5 if other else 4, D),) * 3, m),
        lambda: sharded_attention(*(x.double() if other else x,) * 3, m),
        lambda: sharded_attention(*(torch.randn(1, 2 if other else HQ, 4, D),) * 3, m),
        lambda: sharded_attention(x, x, x, m, causal=other),
        lambda: sharded_attention(x, x, x, m, strategy="ring" if other else "allgather"),
        lambda: sharded_attention(x, x, x, m, layout="striped" if other else "zigzag"),
        lambda: sharded_attention(x, x, x, m, causal=True, window=3 if other else 2),
        lambda: sharded_attention(x, x, x, m, scale=0.5 if other else 0.25),
        lambda: sharded_attention(x, x, x, m, doc_lens=[3, 5] if other else [4, 4]),
        # a rank with locally bad input must not leave the others waiting
        lambda: sharded_attention(x[0] if other else x, x, x, m),
    ]
    texts = _errors(cases)
    # the opt-out skips the check (and its all-gather): a scale mismatch then goes unnoticed
    sharded_attention(x, x, x, m, scale=0.5 if other else 0.25, check_agreement=False)
    return texts


def test_ranks_that_disagree_all_raise():
    results = run_ranks(_disagreeing, 2)
    names = ["N_local", "dtype", "Hq", "causal", "strategy", "layout", "window", "scale",
             "doc_lens", "4-D"]
    for i, name in enumerate(names):
        texts = [r[i] for r in results]
        assert all(texts), (name, texts)
        assert texts[0] == texts[1], (name, texts)  # the same message on every rank
        assert "rank 1" in texts[0] and name in texts[0], (name, texts[0])


# --- a real model ------------------------------------------------------------------------------
def _three_heads(rank, world):
    from tests.test_models import _compare_model

    config = dict(vocab_size=61, dim=48, num_layers=1, num_heads=3, head_dim=16,
                  strategy="ring")
    return _compare_model("transformer", config, mesh(), batch=2, seq_len=10, seed=3)


def test_transformer_with_three_heads_on_two_ranks():
    """q/k/v are transposed views there; the ring backward used to crash in gloo."""
    assert run_ranks(_three_heads, 2) == [12, 12]


@pytest.mark.parametrize("causal", [False, True])
def test_float64_backward_matches_the_reference(causal):
    # the fused CPU kernel's backward wants its LSE in the inputs' accumulation dtype (fp64
    # for fp64 inputs): models run in fp64 (e.g. model.double()) must backpropagate
    q, k, v = (torch.randn(2, 4, 11, 16, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out, _ = local_attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    # public SDPA computes fp64 in fp64 (the naive reference works in fp32)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert_close("out", ref, out, 1e-12)
    for name, g, r in zip("qkv", grads, ref_grads):  # the LSE is kept in fp32 (documented)
        assert_close(f"d{name}", r, g, 1e-6)
