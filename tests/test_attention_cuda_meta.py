"""The CUDA block kernels, exercised without a GPU: `kernels.cuda_paths_on_meta()` routes
`meta` tensors through the CUDA branch, so the real private CUDA ops run their meta
implementations. Checks the path chosen, the shapes and dtypes of out, LSE (the efficient
kernel's padded LSE sliced to the rows) and gradients, for every block kind, GQA, fp32 /
bf16 / fp16, odd head dims, and every block that each strategy's plans ask for."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from seqshard.dist import get_layout
from seqshard.ops.attention import kernels
from seqshard.ops.attention.plan import build_plan

META = dict(device="meta")


def _meta(b, h, n, d, dtype):
    return torch.empty(b, h, n, d, dtype=dtype, **META)


def _check_block(q, k, v, kind, path):
    """Forward and backward of one block on the CUDA branch: shapes, dtypes and the path."""
    with kernels.cuda_paths_on_meta():
        assert kernels.choose_path(q, k)[0] == path
        out, lse = kernels.block_forward(q, k, v, kind, 0.125)
        grads = kernels.block_backward(out, q, k, v, out, lse, kind, 0.125)
    assert (out.shape, out.dtype) == (q.shape, q.dtype)
    assert (lse.shape, lse.dtype) == (q.shape[:3], torch.float32)
    for g, like in zip(grads, (q, k, v)):
        assert (g.shape, g.dtype) == (like.shape, torch.float32)


@pytest.mark.parametrize("dtype,d,path", [
    (torch.bfloat16, 128, "flash"), (torch.float16, 64, "flash"),
    (torch.bfloat16, 36, "flash"),  # head dim padded to a multiple of 8 and sliced back
    (torch.float16, 320, "efficient"),  # beyond the flash kernel's largest head dim
    (torch.float32, 64, "efficient"), (torch.float32, 37, "efficient")])
@pytest.mark.parametrize("hkv", [4, 1])  # MHA and MQA (expanded K/V, folded gradients)
def test_block_kinds_on_the_cuda_branch(dtype, d, path, hkv):
    for kind, (nq, nk) in [("full", (37, 21)), ("causal", (37, 37)), ("strict", (37, 37)),
                           ("strict", (1, 1))]:
        _check_block(_meta(2, 4, nq, d, dtype), *(_meta(2, hkv, nk, d, dtype),) * 2, kind, path)


def test_efficient_lse_padding_is_sliced():
    """This torch's efficient kernel pads its LSE along N to a multiple of 32 (37 -> 64):
    the block kernel returns exactly the 37 real rows and gives the backward the padded
    shape back."""
    q = _meta(1, 2, 37, 64, torch.float32)
    raw = torch.ops.aten._scaled_dot_product_efficient_attention(q, q, q, None, True, 0.0,
                                                                 False, scale=0.125)[1]
    assert raw.shape[-1] % kernels.EFFICIENT_LSE_ROWS == 0 and raw.shape[-1] >= 37
    _check_block(q, q, q, "full", "efficient")


def test_plain_path_on_cuda_warns_once_with_the_reason():
    q = _meta(1, 2, 9, 16, torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kernels._WARNED.discard(f"dtype {torch.float64} has no fused CUDA attention kernel")
        _check_block(q, q, q, "causal", "plain")
        _check_block(q, q, q, "full", "plain")
    msgs = [str(w.message) for w in seen if "plain-torch path on CUDA" in str(w.message)]
    assert len(msgs) == 1 and "torch.float64" in msgs[0], msgs
    with warnings.catch_warnings(record=True) as seen:  # the CPU path never warns
        warnings.simplefilter("always")
        kernels.block_forward(*(torch.zeros(1, 1, 3, 4, dtype=torch.float64),) * 3, "full", 0.5)
    assert not seen


def _strategy_plans():
    """(name, plan) for every block call the strategies make at P = 4, N = 64: ring steps
    (contiguous, zigzag, striped), Ulysses / all-gather (all members), the 2 x 2 hybrid,
    with and without packed documents."""
    world, n = 4, 64
    for layout, docs in itertools.product(("contiguous", "zigzag", "striped"),
                                          (None, [9, 1, 30, 24])):
        lay = get_layout(layout)
        members = [(r,) for r in range(world)]  # ring
        members += [tuple(range(world))]  # ulysses
        members += [(0, 1), (2, 3)]  # hybrid with u = 2
        for qm, km in itertools.product(members, members):
            if len(qm) != len(km):
                continue
            yield (layout, docs, qm, km), build_plan(lay, n, world, qm, km, causal=True,
                                                     doc_lens=docs)
        for r in range(world):  # all-gather: own queries against every rank's keys
            yield (layout, docs, "ag", r), build_plan(lay, n, world, (r,), range(world),
                                                      causal=True, doc_lens=docs)


@pytest.mark.parametrize("dtype,path", [(torch.bfloat16, "flash"),
                                        (torch.float32, "efficient")])
def test_every_strategy_block_on_the_cuda_branch(dtype, path):
    """Every piece of every plan is a block the CUDA kernels take (no masks, square
    diagonals) and comes back with the right shapes (GQA 4:2, D = 40)."""
    calls = 0
    for name, plan in _strategy_plans():
        for p in plan:
            assert p.kind in ("full", "causal", "strict"), (name, p)
            if p.kind != "full":
                assert p.q_len == p.k_len, (name, p)  # the kernels' diagonal is square
            q = _meta(1, 4, p.q_len, 40, dtype)
            kv = _meta(1, 2, p.k_len, 40, dtype)
            _check_block(q, kv, kv, p.kind, path)
            calls += 1
    assert calls > 100


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,d,tol", [(torch.bfloat16, 64, 3e-2), (torch.float16, 36, 3e-3),
                                         (torch.float32, 40, 1e-4)])
def test_cuda_block_kernels_match_the_plain_path(dtype, d, tol):
    """On a real GPU: the fused CUDA paths give the plain path's out, LSE and gradients
    (given a final LSE from a larger softmax), for every kind and GQA 4:2."""
    from seqshard.ops.attention import plain

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    q, g = (torch.randn(2, 4, 45, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 2, 45, d, generator=gen) for _ in range(2))
    q, k, v, g = (t.to("cuda", dtype) for t in (q, k, v, g))
    ke, ve = (kernels._expand_kv(t, 4) for t in (k, v))
    for kind in ("full", "causal", "strict"):
        out, lse = kernels.block_forward(q, k, v, kind, d ** -0.5)
        ref_out, ref_lse = plain.plain_forward(q, ke, ve, kind, d ** -0.5)
        torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
        final = torch.logaddexp(lse, torch.zeros_like(lse))  # other blocks contributed too
        got = kernels.block_backward(g, q, k, v, out, final, kind, d ** -0.5)
        dq, dk, dv = plain.plain_backward(g, q, ke, ve, out, final, kind, d ** -0.5)
        for a, b in zip(got, (dq, kernels._fold_kv(dk, 2), kernels._fold_kv(dv, 2))):
            torch.testing.assert_close(a, b, atol=5 * tol, rtol=5 * tol)


# --- the varlen flash kernel: windows and packed documents in one call -------------------------
def _emulated_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, window, scale):
    """The varlen kernel's documented semantics in plain torch (CPU): segment s is queries
    cu_q[s]:cu_q[s+1] against keys cu_k[s]:cu_k[s+1], the causal diagonal bottom-right
    aligned, the window W - 1 keys back from it. Lets CPU tests check the segments the
    window path builds."""
    out = torch.empty_like(q)
    for s in range(cu_q.numel() - 1):
        rq, rk = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        qs, ks, vs = q[rq].transpose(0, 1), k[rk].transpose(0, 1), v[rk].transpose(0, 1)
        ks, vs = (kernels._expand_kv(t[None], qs.shape[0])[0] for t in (ks, vs))
        i = torch.arange(qs.shape[1])[:, None] + ks.shape[1] - qs.shape[1]  # diagonal key
        j = torch.arange(ks.shape[1])[None, :]
        seen = (j <= i) if causal else torch.ones_like(j <= i)
        if window is not None:
            seen &= j >= i - (window - 1)
        s_ = (scale * qs @ ks.transpose(-1, -2)).masked_fill(~seen, float("-inf"))
        out[rq] = (s_.softmax(-1) @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("doc_lens", [None, [3, 19, 4, 4], [17, 13], [21, 9], [30]])
@pytest.mark.parametrize("window", [1, 4, 6, 12, 30])
def test_window_segments_give_the_band(monkeypatch, doc_lens, window):
    """The segments the window path hands the varlen kernel (one per batch row and
    document, keys reaching into the halo) give the band reference exactly, for windows
    shorter and longer than the halo, under the kernel's bottom-right diagonal."""
    from seqshard.ops.attention import window as window_mod
    from seqshard.ops.attention.naive import doc_ids
    from tests.test_window_attention import band_reference

    monkeypatch.setattr(window_mod, "varlen_attention", _emulated_varlen)
    gen = torch.Generator().manual_seed(window)
    q = torch.randn(2, 4, 30, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 30, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = band_reference(q, k, v, window, doc_lens)
    doc = None if doc_lens is None else doc_ids(doc_lens, 30)
    for q_start, n in [(0, 30), (20, 10), (12, 7)]:
        halo = min(window - 1, q_start)
        keys = slice(q_start - halo, q_start + n)
        out = window_mod._varlen_window(q[:, :, q_start:q_start + n], k[:, :, keys],
                                        v[:, :, keys], window, 8 ** -0.5, q_start, doc)
        torch.testing.assert_close(out, ref[:, :, q_start:q_start + n], atol=1e-5, rtol=1e-5)


def test_varlen_lse_layouts():
    """This torch's meta kernel packs the varlen LSE as [H, total]; the padded per-segment
    layout of other builds converts to it and back exactly."""
    assert kernels.varlen_lse_is_packed()
    cu = torch.tensor([0, 2, 7, 8], dtype=torch.int32)
    packed = torch.randn(3, 8)  # [H, total]
    assert kernels.lse_to_packed(packed, cu, 8) is packed or torch.equal(
        kernels.lse_to_packed(packed, cu, 8), packed)
    padded = torch.zeros(3, 3, 5)  # [S, H, max_q]
    for s in range(3):
        a, b = int(cu[s]), int(cu[s + 1])
        padded[s, :, :b - a] = packed[:, a:b]
    assert torch.equal(kernels.lse_to_packed(padded, cu, 8), packed)


def _window_on_meta(b, hq, hkv, n, halo, d, window, dtype, doc_lens, q_start):
    from seqshard.ops.attention import window as window_mod
    from seqshard.ops.attention.naive import doc_ids

    q = torch.empty(b, hq, n, d, dtype=dtype, device="meta", requires_grad=True)
    k, v = (torch.empty(b, hkv, halo + n, d, dtype=dtype, device="meta", requires_grad=True)
            for _ in range(2))
    doc = None if doc_lens is None else doc_ids(doc_lens, q_start + n)
    with kernels.cuda_paths_on_meta():
        assert kernels.varlen_ok(q, k)
        out = window_mod.local_window_attention(q, k, v, window, 0.125, q_start=q_start,
                                                doc=doc, block=4)
        grads = torch.autograd.grad(out, (q, k, v), out)
    assert (out.shape, out.dtype) == (q.shape, dtype)
    for g, like in zip(grads, (q, k, v)):
        assert (g.shape, g.dtype) == (like.shape, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hkv,d", [(4, 64), (1, 36)])  # MHA; MQA with a padded head dim
def test_window_path_on_the_cuda_branch(dtype, hkv, d):
    """Windows (shorter and longer than the block of 4 and than the shard), with and
    without packed documents, GQA: one varlen call, out and gradients shaped like inputs."""
    for window, halo, docs in [(3, 2, None), (9, 8, None), (30, 16, None),
                               (3, 2, [5, 3, 14]), (9, 8, [9, 1, 2, 10]), (30, 16, [4, 18])]:
        _window_on_meta(2, 4, hkv, 6, halo, d, window, dtype, docs, 16)


def test_window_fp32_on_cuda_keeps_its_path():
    """fp32 (and head dims beyond flash) on CUDA are not varlen blocks."""
    q = _meta(1, 2, 5, 64, torch.float32)
    with kernels.cuda_paths_on_meta():
        assert not kernels.varlen_ok(q, q)
        assert not kernels.varlen_ok(_meta(1, 2, 5, 320, torch.float16), q)
    assert not kernels.varlen_ok(torch.zeros(1, 2, 5, 8, dtype=torch.float16), q)  # CPU


# --- a plan's pieces (packed documents) batched into varlen calls ------------------------------
def _segments_of(cu_q, cu_k):
    return [(slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1])))
            for s in range(cu_q.numel() - 1)]


def _emulated_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, window, scale):
    """varlen_forward on the CPU for square causal / full segments: the plain kernel per
    segment (q [Tq, Hq, D] packed; returns out packed and lse [Hq, Tq])."""
    from seqshard.ops.attention import plain

    out, lse = torch.empty_like(q), torch.empty(q.shape[1], q.shape[0])
    for rq, rk in _segments_of(cu_q, cu_k):
        qs = q[rq].transpose(0, 1)[None]  # [1, Hq, sq, D]
        ks, vs = (kernels._expand_kv(t[rk].transpose(0, 1)[None], q.shape[1]) for t in (k, v))
        o, l_ = plain.plain_forward(qs, ks, vs, "causal" if causal else "full", scale)
        out[rq], lse[:, rq] = o[0].transpose(0, 1), l_[0]
    return out, lse


def _emulated_varlen_bwd(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, causal, window,
                         scale):
    from seqshard.ops.attention import plain

    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rq, rk in _segments_of(cu_q, cu_k):
        qs, dos, os_ = (t[rq].transpose(0, 1)[None] for t in (q, do, out))
        ks, vs = (kernels._expand_kv(t[rk].transpose(0, 1)[None], q.shape[1]) for t in (k, v))
        g = plain.plain_backward(dos, qs, ks, vs, os_, lse[None, :, rq],
                                 "causal" if causal else "full", scale)
        dq[rq] += g[0][0].transpose(0, 1)
        dk[rk] += kernels._fold_kv(g[1], k.shape[1])[0].transpose(0, 1)
        dv[rk] += kernels._fold_kv(g[2], k.shape[1])[0].transpose(0, 1)
    return dq, dk, dv


def _doc_plans():
    """(name, plan, nq, nk) of every non-empty document plan of `_strategy_plans`."""
    out = {}
    for name, plan in _strategy_plans():
        if name[1] is not None and plan:
            ag = name[2] == "ag"  # all-gather: one rank's 16 queries against all 64 keys
            nq, nk = (16, 64) if ag else (16 * len(name[2]), 16 * len(name[3]))
            out.setdefault((tuple(plan), nq, nk), (name, plan, nq, nk))  # distinct plans
    return list(out.values())


def test_batched_plans_match_one_call_per_piece(monkeypatch):
    """The varlen batching of every document plan (segments, strict pieces shifted, pieces
    sharing query rows in separate calls, scattered merges and gradients) gives exactly the
    per-piece path's out, LSE and gradients -- on the CPU, with the kernel emulated."""
    from seqshard.ops.attention import blocks

    gen = torch.Generator().manual_seed(0)
    q, do = (torch.randn(2, 4, 64, 8, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 2, 64, 8, generator=gen) for _ in range(2))
    close = dict(atol=1e-5, rtol=1e-4)
    plans = _doc_plans()
    refs = []
    for _, plan, nq, nk in plans:
        args = (q[:, :, :nq], k[:, :, :nk], v[:, :, :nk])
        out, lse = blocks.plan_forward(*args, plan, 0.3)
        refs.append((args, out, lse, blocks.plan_backward(do[:, :, :nq], *args, out, lse, plan,
                                                          0.3)))
    monkeypatch.setattr(blocks, "varlen_ok", lambda q, k: True)
    monkeypatch.setattr(blocks, "varlen_forward", _emulated_varlen_fwd)
    monkeypatch.setattr(blocks, "varlen_backward", _emulated_varlen_bwd)
    for (name, plan, _, _), (args, ref_out, ref_lse, ref_g) in zip(plans, refs):
        out, lse = blocks.plan_forward(*args, plan, 0.3)
        torch.testing.assert_close(out, ref_out, msg=str(name), **close)
        torch.testing.assert_close(lse, ref_lse, msg=str(name), **close)
        grads = blocks.plan_backward(do[:, :, :args[0].shape[2]], *args, out, lse, plan, 0.3)
        for g, r in zip(grads, ref_g):
            torch.testing.assert_close(g, r, msg=str(name), **close)


def test_document_plans_on_the_cuda_branch(monkeypatch):
    """Every document plan of every strategy on the CUDA branch (bf16, GQA 4:2, D = 40):
    at most one varlen call per kind in backward, one per kind and query-row layer in
    forward (never one per piece), and out / LSE / gradients shaped right."""
    from seqshard.ops.attention import blocks

    calls = []

    def counting(fn):
        def run(*a, **kw):
            calls.append(fn.__name__)
            return fn(*a, **kw)
        return run

    for name in ("varlen_forward", "varlen_backward", "block_forward", "block_backward"):
        monkeypatch.setattr(blocks, name, counting(getattr(blocks, name)))
    pieces = 0
    for name, plan, nq, nk in _doc_plans():
        q, kv = _meta(2, 4, nq, 40, torch.bfloat16), _meta(2, 2, nk, 40, torch.bfloat16)
        calls.clear()
        with kernels.cuda_paths_on_meta():
            out, lse = blocks.plan_forward(q, kv, kv, plan, 0.125)
            grads = blocks.plan_backward(q, q, kv, kv, out, lse, plan, 0.125)
        assert (out.shape, out.dtype, lse.shape) == (q.shape, torch.float32, q.shape[:3])
        for g, like in zip(grads, (q, kv, kv)):
            assert (g.shape, g.dtype) == (like.shape, torch.float32), name
        if len(plan) > 1:
            assert calls.count("varlen_backward") <= 2 and "block_backward" not in calls, name
            assert calls.count("varlen_forward") <= 4 and "block_forward" not in calls, name
            pieces += len(plan)
    assert pieces > 200


@pytest.mark.cuda
def test_varlen_paths_match_on_a_gpu(monkeypatch):
    """On a real GPU: the one-call varlen window (documents, halo, GQA) gives the band
    reference, and batched document plans give the per-piece flash path's out, LSE and
    gradients -- this checks the kernel's bottom-right diagonal the segments rely on."""
    from seqshard.ops.attention import blocks
    from seqshard.ops.attention import window as window_mod
    from seqshard.ops.attention.naive import doc_ids
    from tests.test_window_attention import band_reference

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    q, g = (torch.randn(2, 4, 96, 64, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 2, 96, 64, generator=gen) for _ in range(2))
    cuda = [t.to("cuda", torch.bfloat16) for t in (q, k, v, g)]
    for window, docs in [(7, None), (40, None), (7, [10, 50, 36]), (40, [30, 5, 61])]:
        ref = band_reference(*(t.to("cuda", torch.bfloat16).float() for t in (q, k, v)),
                             window, docs)
        for q_start, n in [(0, 96), (64, 32)]:
            halo = min(window - 1, q_start)
            keys = slice(q_start - halo, q_start + n)
            doc = None if docs is None else doc_ids(docs, 96)
            out = window_mod.local_window_attention(
                cuda[0][:, :, q_start:q_start + n], cuda[1][:, :, keys], cuda[2][:, :, keys],
                window, 0.125, q_start=q_start, doc=doc)
            torch.testing.assert_close(out.float(), ref[:, :, q_start:q_start + n],
                                       atol=3e-2, rtol=3e-2)
    for name, plan, nq, nk in _doc_plans():
        args = (cuda[0][:, :, :nq], cuda[1][:, :, :nk], cuda[2][:, :, :nk])
        out, lse = blocks.plan_forward(*args, plan, 0.125)
        grads = blocks.plan_backward(cuda[3][:, :, :nq], *args, out.to(torch.bfloat16), lse,
                                     plan, 0.125)
        with monkeypatch.context() as m:
            m.setattr(blocks, "varlen_ok", lambda q, k: False)
            ref_out, ref_lse = blocks.plan_forward(*args, plan, 0.125)
            ref_g = blocks.plan_backward(cuda[3][:, :, :nq], *args, ref_out.to(torch.bfloat16),
                                         ref_lse, plan, 0.125)
        torch.testing.assert_close(out, ref_out, atol=3e-2, rtol=3e-2, msg=str(name))
        torch.testing.assert_close(lse, ref_lse, atol=3e-2, rtol=3e-2, msg=str(name))
        for a, b in zip(grads, ref_g):
            torch.testing.assert_close(a, b, atol=1e-1, rtol=1e-1, msg=str(name))
