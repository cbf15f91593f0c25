"""The sharded suite's representative cases on CUDA tensors, against the same oracles as the
CPU suite, on the CPU: the naive references (fp64 inputs) and the unsharded models (fp32, as
tests/test_models.py; the fused CPU attention backward does not take fp64 models).

Runs only with SEQSHARD_TEST_DEVICE=cuda on a GPU machine (the `cuda` marker; elsewhere each
test skips and says why under `pytest -rs`). P=2 or 4 gloo ranks share the GPUs they see
(GPU LOCAL_RANK modulo the count): the collectives stage CUDA tensors through host memory, so
what is under test is the ops' compute path on CUDA, not the wire.

    SEQSHARD_TEST_DEVICE=cuda python -m pytest -q tests/test_cuda.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.common import assert_close
from tests.harness import device, mesh, run_ranks

pytestmark = pytest.mark.cuda

# fp32 on the GPU (TF32 off, torch's default for matmuls) against fp64 on the CPU; bf16 looser
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sum_over_ranks(grad: torch.Tensor, m) -> torch.Tensor:
    """A parameter gradient summed over the sp group (the models layer's convention)."""
    from seqshard.dist import all_reduce

    return all_reduce(grad.detach().cpu(), m.group) if m.size > 1 else grad.cpu()


# --- attention ---------------------------------------------------------------------------------
def _attention_case(rank, world, m, *, strategy, layout, dtype=torch.float32, doc_lens=None,
                    window=None, seed=0):
    from seqshard.dist import get_layout
    from seqshard.ops.attention import sharded_attention
    from seqshard.ops.attention.naive import naive_attention

    lay = get_layout(layout)
    B, H, Hkv, D = 1, 4, 2, 32
    n = 8 * lay.divisor(world)
    q, k, v, w = (_randn(s, seed + i) for i, s in enumerate(
        [(B, H, n, D), (B, Hkv, n, D), (B, Hkv, n, D), (B, H, n, D)]))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    if window is None:  # the naive reference takes GQA's fewer K/V heads itself
        ref, _ = naive_attention(*ref_in, causal=True, doc_lens=doc_lens)
    else:  # token t reads t-W+1 .. t
        pos = torch.arange(n)
        allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        ref, _ = naive_attention(*ref_in, mask=allowed)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_in)

    def mine(t):
        return lay.shard(t, 2, rank, world)

    local = [mine(t).to(device(), dtype).requires_grad_() for t in (q, k, v)]
    out = sharded_attention(*local, m, causal=True, layout=layout, strategy=strategy,
                            doc_lens=doc_lens, window=window)
    assert out.device == device() and out.dtype == dtype
    grads = torch.autograd.grad((out * mine(w).to(device(), dtype)).sum(), local)
    tag = f"{strategy} {layout} {dtype} docs={doc_lens} window={window} P={world}"
    assert_close(f"{tag} out", mine(ref), out.cpu(), TOL[dtype])
    for name, r, g in zip("qkv", ref_grads, grads):
        assert_close(f"{tag} d{name}", mine(r), g.cpu(), TOL[dtype])


def _attention_cases(rank, world):
    m = mesh()
    done = 0
    for strategy in ("ring", "ulysses", "allgather"):
        for layout in ("contiguous", "zigzag", "striped"):
            _attention_case(rank, world, m, strategy=strategy, layout=layout, seed=done)
            done += 1
    _attention_case(rank, world, m, strategy="ring", layout="zigzag", dtype=torch.bfloat16)
    _attention_case(rank, world, m, strategy="auto", layout="contiguous", doc_lens=[3, 5, 8])
    _attention_case(rank, world, m, strategy="auto", layout="contiguous", window=6)
    return done + 3


def _hybrid_cases(rank, world):
    m = mesh(ulysses=2, ring=2)
    for layout in ("contiguous", "zigzag"):
        _attention_case(rank, world, m, strategy="hybrid", layout=layout)
    return 2


def test_attention_strategies_layouts_documents_windows():
    assert run_ranks(_attention_cases, 2) == [12, 12]


def test_attention_hybrid_on_four_ranks():
    assert run_ranks(_hybrid_cases, 4) == [2] * 4


# --- delta rule --------------------------------------------------------------------------------
def _delta_cases(rank, world):
    from seqshard.ops.delta_rule import delta_rule
    from seqshard.ops.delta_rule.naive import naive_delta_rule

    m = mesh()
    B, H, n, Dk, Dv = 1, 2, 12 * world, 8, 6
    done = 0
    for schedule in ("scan", "pass"):
        for gated in (False, True):
            seed = 10 * done
            k = torch.nn.functional.normalize(_randn((B, H, n, Dk), seed), dim=-1)
            q = torch.nn.functional.normalize(_randn((B, H, n, Dk), seed + 1), dim=-1)
            v, wo = _randn((B, H, n, Dv), seed + 2), _randn((B, H, n, Dv), seed + 3)
            beta = torch.sigmoid(_randn((B, H, n), seed + 4))
            gate = -torch.nn.functional.softplus(_randn((B, H, n), seed + 5)) if gated else None
            inputs = [q, k, v, beta] + ([gate] if gated else [])
            ref_in = [t.clone().requires_grad_() for t in inputs]
            ref, _ = naive_delta_rule(*ref_in[:4], gate=ref_in[4] if gated else None)
            ref_grads = torch.autograd.grad((ref * wo).sum(), ref_in)
            n_local = n // world
            mine = slice(rank * n_local, (rank + 1) * n_local)
            local = [t[:, :, mine].to(device(), torch.float32).requires_grad_() for t in inputs]
            out, _ = delta_rule(*local[:4], gate=local[4] if gated else None, mesh=m,
                                schedule=schedule, chunk_size=4)
            assert out.device == device()
            grads = torch.autograd.grad((out * wo[:, :, mine].to(device(), torch.float32)).sum(),
                                        local)
            tag = f"delta {schedule} gate={gated}"
            assert_close(f"{tag} out", ref[:, :, mine], out.cpu(), TOL[torch.float32])
            for name, r, g in zip(["q", "k", "v", "beta", "gate"], ref_grads, grads):
                assert_close(f"{tag} d{name}", r[:, :, mine], g.cpu(), TOL[torch.float32])
            done += 1
    return done


def test_delta_rule_both_schedules():
    assert run_ranks(_delta_cases, 2) == [4, 4]


# --- FIT ---------------------------------------------------------------------------------------
def _fit_case(rank, world):
    from seqshard.ops.fit import FIT
    from seqshard.ops.fit.naive import naive_fit

    m = mesh()
    torch.manual_seed(3)
    fit = FIT(dim=16, num_heads=2, group_size=4, num_latents=2, depth=2, causal=True)
    oracle = copy.deepcopy(fit).double()
    on_gpu = copy.deepcopy(fit).to(device())
    n = world * 2 * 4
    x, w = _randn((2, n, 16), 40), _randn((2, n, 16), 41)
    x_ref = x.clone().requires_grad_()
    y_ref = naive_fit(oracle, x_ref)
    ref_grads = torch.autograd.grad((y_ref * w).sum(), [x_ref] + list(oracle.parameters()))
    mine = slice(rank * n // world, (rank + 1) * n // world)
    x_loc = x[:, mine].to(device(), torch.float32).requires_grad_()
    y = on_gpu(x_loc, m)
    grads = torch.autograd.grad((y * w[:, mine].to(device(), torch.float32)).sum(),
                                [x_loc] + list(on_gpu.parameters()))
    assert_close("fit out", y_ref[:, mine], y.cpu(), TOL[torch.float32])
    assert_close("fit dx", ref_grads[0][:, mine], grads[0].cpu(), TOL[torch.float32])
    for (name, _), r, g in zip(on_gpu.named_parameters(), ref_grads[1:], grads[1:]):
        assert_close(f"fit d{name}", r, _sum_over_ranks(g, m), TOL[torch.float32])
    return True


def test_fit():
    assert run_ranks(_fit_case, 2) == [True, True]


# --- language models ---------------------------------------------------------------------------
LMS = [
    ("transformer", dict(vocab_size=61, dim=96, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=48, strategy="ring", layout="zigzag")),
    ("deltanet", dict(vocab_size=61, dim=96, num_layers=2, num_heads=2, head_dim=48,
                      chunk_size=4)),
    ("fit", dict(vocab_size=61, dim=96, num_layers=2, num_heads=2, group_size=3,
                 num_latents=2)),
]


def _lm_cases(rank, world):
    from seqshard.dist import Mesh, get_layout
    from seqshard.models import build_model, sharded_lm_loss

    m = mesh()
    for seed, (kind, config) in enumerate(LMS):
        layout = get_layout(config.get("layout", "contiguous"))
        torch.manual_seed(seed)
        model = build_model(kind, config, m).to(device())
        oracle = build_model(kind, config, Mesh.single())
        oracle.load_state_dict(model.state_dict())
        seq_len = 12 * layout.divisor(world)
        ids = torch.randint(0, 61, (2, seq_len), generator=torch.Generator().manual_seed(seed))
        ids_local = layout.shard(ids, 1, m.rank, m.size)
        loss = sharded_lm_loss(model(ids_local.to(device())), ids_local.to(device()), m,
                               layout=layout)
        loss.backward()
        full_loss = sharded_lm_loss(oracle(ids), ids)
        full_loss.backward()
        assert_close(f"{kind} loss", full_loss.detach(), loss.detach().cpu(), TOL[torch.float32])
        ref_params = dict(oracle.named_parameters())
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{kind}: {name} got no gradient"
            assert_close(f"{kind} grad {name}", ref_params[name].grad, _sum_over_ranks(p.grad, m),
                         TOL[torch.float32])
    return len(LMS)


def test_each_lm_loss_and_gradients():
    assert run_ranks(_lm_cases, 2) == [3, 3]
