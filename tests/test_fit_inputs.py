"""FIT on the tensors real models pass: views of x (transposed, strided last dim, expanded,
sliced), an empty batch, an empty sequence, bad dtypes, and ranks that disagree (every rank
raises, none hangs). Outputs and every gradient against the fp64 oracle (naive.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from seqshard.ops.fit import FIT
from seqshard.ops.fit.naive import naive_fit
from tests.common import assert_close
from tests.harness import mesh, run_ranks

TOL = 1e-5
DIM, GROUP, M = 16, 3, 2
B = 2

# name -> (leaf shape for n tokens, token axis of the leaf, tokens per step, view -> [B, n, D])
VIEWS = {
    "transposed": (lambda n: (n, B, DIM), 0, 1, lambda x: x.transpose(0, 1)),
    "strided last dim": (lambda n: (B, n, 2 * DIM), 1, 1, lambda x: x[..., ::2]),
    "expanded": (lambda n: (1, n, DIM), 1, 1, lambda x: x.expand(B, -1, -1)),
    "sliced": (lambda n: (B, 2 * n, DIM), 1, 2, lambda x: x[:, ::2]),
}


def _views(rank, world):
    """Each view of this rank's tokens vs the fp64 oracle on the whole sequence."""
    m = mesh() if world > 1 else None
    n = 2 * GROUP  # tokens per rank
    for causal in (False, True):
        torch.manual_seed(11)
        fit = FIT(dim=DIM, num_heads=2, group_size=GROUP, num_latents=M, depth=1,
                  causal=causal)
        ref_fit = copy.deepcopy(fit).double()
        for name, (shape, axis, step, view) in VIEWS.items():
            where = f"{name} causal={causal} rank {rank}/{world}"
            gen = torch.Generator().manual_seed(12)
            full = torch.randn(*shape(n * world), generator=gen, dtype=torch.float64)
            w = torch.randn(B, n * world, DIM, generator=gen, dtype=torch.float64)
            full_leaf = full.clone().requires_grad_()
            y_ref = naive_fit(ref_fit, view(full_leaf))
            g_ref = torch.autograd.grad((y_ref * w).sum(),
                                        [full_leaf] + list(ref_fit.parameters()))
            per = full.shape[axis] // world
            leaf = full.narrow(axis, rank * per, per).float().requires_grad_()
            mine = slice(rank * n, (rank + 1) * n)
            y = fit(view(leaf), m)
            assert_close(f"{where} out", y_ref[:, mine], y, TOL)
            grads = torch.autograd.grad((y * w[:, mine].float()).sum(),
                                        [leaf] + list(fit.parameters()))
            assert_close(f"{where} dx", g_ref[0].narrow(axis, rank * per, per), grads[0], TOL)
            for (pname, _), ref, g in zip(fit.named_parameters(), g_ref[1:], grads[1:]):
                if m is not None:
                    dist.all_reduce(g, group=m.group)  # the convention: sum over sp
                assert_close(f"{where} d{pname}", ref, g, 2 * TOL)
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_views_match_fp64_oracle(world):
    assert run_ranks(_views, world) == [True] * world


def _fit():
    torch.manual_seed(13)
    return FIT(dim=DIM, num_heads=2, group_size=GROUP, num_latents=M, depth=1, causal=True)


def test_empty_batch_and_sequence():
    fit = _fit()
    x = torch.randn(0, 2 * GROUP, DIM, requires_grad=True)
    y = fit(x)
    assert y.shape == x.shape
    y.sum().backward()
    with pytest.raises(ValueError, match=r"N_local=0: .*at least one group"):
        fit(torch.randn(1, 0, DIM))


@pytest.mark.parametrize("dtype, match", [
    (torch.int64, r"torch\.int64"),
    (torch.bool, r"torch\.bool"),
    (torch.complex64, r"torch\.complex64"),
    (torch.float64, r"x is torch\.float64 but FIT's parameters are torch\.float32"),
])
def test_bad_dtype_raises(dtype, match):
    with pytest.raises(ValueError, match=match):
        _fit()(torch.zeros(1, 2 * GROUP, DIM).to(dtype))


DISAGREE = {  # what the last rank does -> a word every rank's message holds
    "dtype": (lambda fit, x: (fit.double(), x.double()), "x dtype"),
    "bad local input": (lambda fit, x: (fit, x[:, :-1]), "not a positive multiple"),
    "empty shard": (lambda fit, x: (fit, x[:, :0]), "N_local=0"),
    "wrong dtype": (lambda fit, x: (fit, x.double()), "x is torch.float64"),
    "group size": (lambda fit, x: (fit.set_group_size(2) or fit, x), "group_size"),
}


def _disagree(rank, world):
    m = mesh()
    said = {}
    for case, (change, _) in DISAGREE.items():
        fit, x = FIT(dim=DIM, num_heads=2, group_size=GROUP, num_latents=M, depth=1,
                     max_group_size=GROUP), torch.randn(1, 2 * GROUP, DIM)
        if rank == world - 1:
            fit, x = change(fit, x)
        try:
            fit(x, m)
            said[case] = "no error"
        except ValueError as err:
            said[case] = str(err)
    y = _fit()(torch.randn(0, 2 * GROUP, DIM), m)  # every rank an empty batch
    said["empty batch"] = tuple(y.shape)
    return said


def test_disagreeing_ranks_all_raise():
    for rank, said in enumerate(run_ranks(_disagree, 2)):
        for case, (_, needle) in DISAGREE.items():
            assert needle in said[case] and "rank 1" in said[case], (rank, case, said[case])
        assert said["empty batch"] == (0, 2 * GROUP, DIM)
