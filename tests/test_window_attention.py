"""Causal sliding-window attention (ops/attention/window.py) on 1, 2 and 4 gloo ranks against
single-process attention with an explicit band mask (naive_attention's `mask`): outputs and
dq/dk/dv, windows smaller than, equal to and larger than a shard (the halo then spans several
ranks) and larger than the whole sequence; GQA/MQA, odd lengths, head dim 48, batch 2, packed
documents; the same on the zigzag and striped layouts (windows shorter and longer than a run); and the DeltaNetLM hybrid (delta, window and global layers) sharded vs unsharded."""

from __future__ import annotations

import pytest
import torch

from tests.common import assert_close
from tests.harness import mesh, run_ranks
from tests.test_models import DELTANET, _compare_model

TOL = {"out": 2e-5, "dq": 2e-5, "dk": 2e-5, "dv": 2e-5}


def band_reference(q, k, v, window, doc_lens=None):
    """Attention of every token to itself and the window - 1 tokens before it (same doc)."""
    from seqshard.ops.attention.naive import attention_mask, naive_attention

    i = torch.arange(q.shape[2])
    mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)  # [N, N]
    if doc_lens is not None:
        mask &= attention_mask(len(i), len(i), causal=False, doc_lens=doc_lens)
    return naive_attention(q, k, v, mask=mask)[0]


def _window_cases(rank, world, cases, layout="contiguous"):
    """Each case: (B, Hq, Hkv, n_local, D, window, block, doc_lens, entry) -> outputs and
    every gradient of this rank's shard (placed by `layout`) vs the reference on the whole
    sequence."""
    from seqshard.dist import get_layout
    from seqshard.ops.attention import sharded_attention, window_attention

    m = mesh()
    checked = 0
    for seed, (b, hq, hkv, n, d, window, block, doc_lens, entry) in enumerate(cases):
        gen = torch.Generator().manual_seed(seed)
        n_all = n * world
        q, k, v = (torch.randn(b, h, n_all, d, generator=gen) for h in (hq, hkv, hkv))
        dout = torch.randn(b, hq, n_all, d, generator=gen)
        rows = get_layout(layout).positions(n_all, rank, world)  # global positions held here
        local = [t[:, :, rows].clone().requires_grad_() for t in (q, k, v)]
        if entry == "sharded_attention":
            out = sharded_attention(*local, m, causal=True, window=window, doc_lens=doc_lens,
                                    layout=layout)
        else:
            out = window_attention(*local, m, window=window, doc_lens=doc_lens, block=block,
                                   layout=layout)
        grads = torch.autograd.grad(out, local, dout[:, :, rows])

        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = band_reference(*full, window, doc_lens)
        ref_grads = torch.autograd.grad(ref, full, dout)
        tag = f"{layout} P={world} rank={rank} case={seed} W={window} n={n} Hq/Hkv={hq}/{hkv}"
        assert_close(f"{tag} out", ref[:, :, rows], out, TOL["out"])
        for name, ref_g, g in zip(("dq", "dk", "dv"), ref_grads, grads):
            assert_close(f"{tag} {name}", ref_g[:, :, rows], g, TOL[name])
        checked += 1
    return checked


def _cases(n: int, world: int):
    """Windows below, at and above the shard length n, spanning all earlier ranks, and
    beyond the sequence; blocks small enough that the local loop runs several blocks."""
    n_all = n * world
    several = min(2 * n + 2, n_all)  # the halo reaches back over more than one rank
    return [
        (2, 4, 2, n, 48, 3, 2, None, "window_attention"),
        (1, 2, 2, n, 8, 1, None, None, "window_attention"),
        (2, 3, 1, n, 8, n, 4, None, "window_attention"),
        (1, 4, 2, n, 16, several, 3, None, "window_attention"),
        (2, 2, 1, n, 8, n_all + 5, None, None, "sharded_attention"),
        (1, 2, 2, n, 8, n + 1, None, [3, n_all - 7, 4], "sharded_attention"),
    ]


@pytest.mark.parametrize("world, n", [(1, 23), (2, 11), (4, 7)])
def test_window_attention_matches_band_reference(world, n):
    cases = _cases(n, world)
    assert run_ranks(_window_cases, world, cases) == [len(cases)] * world


def _balanced_cases(n: int, world: int):
    """Zigzag runs are n/2 long: windows below a run, between a run and a shard, and
    reaching back over several runs (so over ranks on both sides); documents that start
    inside runs, GQA/MQA, batch 2. Striped runs are one token: every W > 1 spans ranks."""
    n_all, run = n * world, n // 2
    return [
        (2, 4, 2, n, 8, 3, 2, None, "window_attention"),
        (1, 2, 1, n, 8, run + 2, None, None, "window_attention"),
        (2, 2, 2, n, 8, min(3 * run + 1, n_all - 1), 3, None, "sharded_attention"),
        (1, 2, 1, n, 8, n + 3, None, [5, n_all - 9, 4], "sharded_attention"),
        (2, 2, 2, n, 8, 1, None, [run + 1, n_all - run - 1], "window_attention"),
    ]


def _balanced(rank, world, n):
    return [_window_cases(rank, world, _balanced_cases(n, world), layout)
            for layout in ("zigzag", "striped")]


@pytest.mark.parametrize("world, n", [(1, 12), (2, 10), (4, 6)])
def test_window_on_zigzag_and_striped_matches_band_reference(world, n):
    """Used to raise "window=W needs layout='contiguous'"; now exact on both layouts."""
    expected = [len(_balanced_cases(n, world))] * 2
    assert run_ranks(_balanced, world, n) == [expected] * world


def _bad_window(rank, world):
    from seqshard.ops.attention import ShardedAttention, make_sdpa, sharded_attention
    from seqshard.ops.attention.window import window_attention

    m = mesh()
    q = torch.randn(1, 2, 6, 8)
    for kwargs, match in [
        (dict(window=0, causal=True), "window=0"),
        (dict(window=2.5, causal=True), "window=2.5"),
        (dict(window=4, causal=False), "causal=False"),
        (dict(window=4, causal=True, strategy="ulysses"), "strategy='ulysses'"),
        (dict(window=4, causal=True, layout="zigzig"), "layout='zigzig'"),
        (dict(window=4, causal=True, layout="zigzag", doc_lens=[3, 8]), "doc_lens"),
    ]:
        with pytest.raises(ValueError, match=match):
            sharded_attention(q, q, q, m, **kwargs)
    with pytest.raises(ValueError, match="zigzag layout"):  # 5 * 2 tokens over 4 chunks
        window_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], m, window=3, layout="zigzag")
    assert ShardedAttention(m, causal=True, layout="striped", window=3).window == 3
    with pytest.raises(ValueError, match="block=0"):
        window_attention(q, q, q, m, window=3, block=0)
    # no tokens: an empty result, as torch's SDPA gives (tests/test_attention_inputs.py)
    assert window_attention(q[:, :, :0], q[:, :, :0], q[:, :, :0], m, window=3).shape == (1, 2, 0, 8)
    with pytest.raises(ValueError, match="doc_lens"):
        sharded_attention(q, q, q, m, causal=True, window=3, doc_lens=[5, 5])
    # the drop-in forwards the window: equal to the op's result
    out = make_sdpa(m, window=3)(q, q, q, is_causal=True)
    assert torch.equal(out, sharded_attention(q, q, q, m, causal=True, window=3))
    return True


def test_bad_window_arguments_raise():
    assert run_ranks(_bad_window, 2) == [True, True]


def test_hybrid_config_checks():
    from seqshard.models import make_config

    with pytest.raises(ValueError, match=r"layers \[1\] are in both"):
        make_config("deltanet", dict(num_layers=3, attn_layers=(1, 2), window_layers=(0, 1)))
    with pytest.raises(ValueError, match="window=0"):
        make_config("deltanet", dict(window=0))
    with pytest.raises(ValueError, match=r"window_layers \[3\] outside"):
        make_config("deltanet", dict(num_layers=3, window_layers=(3,)))


# delta rule, sliding window and global attention: one layer of each
HYBRID = dict(DELTANET, num_layers=3, window_layers=(1,), attn_layers=(2,))


def _hybrid(rank, world, cases):
    return [_compare_model("deltanet", config, mesh(), batch=2, seq_len=seq_len, seed=seed)
            for seed, (config, seq_len) in enumerate(cases)]


@pytest.mark.parametrize("world, cases", [
    (1, [(dict(HYBRID, window=5), 17)]),
    # shards of 9: a window of 5 stays within one earlier rank, 13 needs more than a shard
    (2, [(dict(HYBRID, window=5), 18),
         (dict(HYBRID, window=13, activation_checkpointing=True), 18)]),
    # shards of 5: the window's halo comes from three earlier ranks, recomputed in backward
    (4, [(dict(HYBRID, window=13, activation_checkpointing=True), 20)]),
])
def test_deltanet_window_hybrid_matches_unsharded(world, cases):
    from seqshard.models import build_model

    # every parameter compared: the window and global layers' projections included
    expected = [len(list(build_model("deltanet", config).parameters())) for config, _ in cases]
    assert run_ranks(_hybrid, world, cases) == [expected] * world


def test_local_blocks_are_o_n_times_window(monkeypatch):
    """The local kernel hands the fused kernel query blocks of `block` rows, each against
    block + W - 1 keys, ceil(n / block) blocks per batch row: O(n W) work, never O(n^2)."""
    import seqshard.ops.attention.window as window_mod

    calls = []
    sdpa = window_mod.F.scaled_dot_product_attention

    def counting(q, k, v, **kwargs):
        calls.append((q.shape[0], q.shape[2], k.shape[2]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(window_mod.F, "scaled_dot_product_attention", counting)
    batch, n, window, block = 2, 301, 10, 16
    q = torch.randn(batch, 2, n, 8)
    window_mod.window_attention(q, q, q, None, window=window, block=block)
    assert {(nq, nk) for _, nq, nk in calls} == {(block, block + window - 1)}
    assert sum(b for b, _, _ in calls) == batch * -(-n // block)


@pytest.mark.parametrize("doc_lens, window", [([7, 20, 18], 5), (None, 20)])
def test_own_masks_are_built_one_tile_at_a_time(monkeypatch, doc_lens, window):
    """Blocks with masks of their own (every block with documents; the first blocks, whose
    spans reach into the front padding, without) get them one tile of ~TILE_ROWS queries at
    a time -- never all blocks' masks in one go -- and the result and gradients stay
    exact."""
    import seqshard.ops.attention.window as window_mod

    built = []
    block_masks = window_mod._block_masks

    def recording(blocks, *args):
        built.append(len(blocks))
        return block_masks(blocks, *args)

    monkeypatch.setattr(window_mod, "TILE_ROWS", 6)  # 2 blocks of 3 rows per tile
    monkeypatch.setattr(window_mod, "_block_masks", recording)
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(2, h, 45, 8, generator=gen) for h in (4, 2, 2, 4))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out = window_mod.window_attention(*full, None, window=window, doc_lens=doc_lens, block=3)
    grads = torch.autograd.grad(out, full, dout)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = band_reference(*ref_in, window, doc_lens)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (ref, *torch.autograd.grad(ref, ref_in, dout)),
                          (out, *grads)):
        assert_close(f"{name} docs={doc_lens}", a, b, TOL["out"])
    assert max(built) <= 2, built
    # documents: 15 blocks in tiles of 2; else 7 front blocks in tiles and the shared band
    assert sum(built) == (15 if doc_lens else 7 + 1), built
