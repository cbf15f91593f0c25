"""FIT: the fast and sharded forms against the masked single-device oracle (naive.py).

On 1, 2 and 4 gloo ranks, bidirectional and causal: outputs, input gradients and parameter
gradients *summed over ranks* (the convention the models layer relies on) match the oracle
run on the whole sequence. The causal variant leaks nothing from later tokens across shard
borders; bad input raises ValueError naming the values.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqshard.dist import Mesh
from seqshard.ops.fit import FIT, FITBlock
from seqshard.ops.fit.naive import naive_fit
from tests.common import assert_close
from tests.harness import mesh, run_ranks

# (name, FIT kwargs, batch, groups per rank). Awkward sizes: odd group sizes, head dim 48,
# a single latent, no local or no global layers, several global layers.
CASES = [
    ("bidir-hd48", dict(dim=96, num_heads=2, group_size=5, num_latents=3, depth=2,
                        global_layers=2), 2, 2),
    ("causal-hd48", dict(dim=96, num_heads=2, group_size=5, num_latents=3, depth=2,
                         global_layers=2, causal=True), 2, 2),
    ("causal-m1", dict(dim=32, num_heads=4, group_size=3, num_latents=1, depth=1,
                       local_layers=2, global_layers=0, mlp_ratio=2, causal=True), 1, 3),
    ("bidir-nolocal", dict(dim=24, num_heads=3, group_size=7, num_latents=2, depth=2,
                           local_layers=0, global_layers=1), 3, 1),
]
# fp32 against the fp32 oracle; errors measured relative to max(1, max |ref|)
TOL = {"out": 1e-5, "dx": 1e-5, "param": 2e-5}


def _case_tensors(seed: int, kwargs: dict, batch: int, groups: int, world: int):
    """The module, full input and full output cotangent; identical on every rank."""
    torch.manual_seed(seed)
    fit = FIT(**kwargs)
    length = world * groups * kwargs["group_size"]
    x = torch.randn(batch, length, kwargs["dim"])
    w = torch.randn(batch, length, kwargs["dim"])
    return fit, x, w


def _check_against_naive(rank: int, world: int) -> int:
    meshes = [mesh()] if world > 1 else [None, Mesh.single(), mesh()]
    checked = 0
    for seed, (name, kwargs, batch, groups) in enumerate(CASES):
        fit, x, w = _case_tensors(seed, kwargs, batch, groups, world)
        params = list(fit.parameters())
        x_ref = x.clone().requires_grad_()
        y_ref = naive_fit(fit, x_ref)
        ref_grads = torch.autograd.grad((y_ref * w).sum(), [x_ref] + params)
        n_local = x.shape[1] // world
        mine = slice(rank * n_local, (rank + 1) * n_local)
        for m in meshes:
            tag = f"{name} P={world} mesh={'None' if m is None else m.size}"
            x_loc = x[:, mine].clone().requires_grad_()
            y = fit(x_loc, m)
            grads = torch.autograd.grad((y * w[:, mine]).sum(), [x_loc] + params)
            assert_close(f"{tag} out", y_ref[:, mine], y, TOL["out"])
            assert_close(f"{tag} dx", ref_grads[0][:, mine], grads[0], TOL["dx"])
            for (pname, _), ref_g, g in zip(fit.named_parameters(), ref_grads[1:], grads[1:]):
                g = g.clone()
                if m is not None and m.size > 1:
                    dist.all_reduce(g, group=m.group)  # the models layer's convention: sum
                assert_close(f"{tag} d{pname}", ref_g, g, TOL["param"])
            checked += 1
    return checked


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fit_matches_naive(world):
    counts = run_ranks(_check_against_naive, world)
    assert counts == [len(CASES) * (3 if world == 1 else 1)] * world


def _input_grad_of_one_output(fit, x, t: int, rank: int, world: int, m) -> torch.Tensor:
    """d <v, y[:, t]> / d x for the whole sequence, computed sharded; [B, N, D] on every rank."""
    n_local = x.shape[1] // world
    x_loc = x[:, rank * n_local : (rank + 1) * n_local].clone().requires_grad_()
    y = fit(x_loc, m)
    owner, t_loc = divmod(t, n_local)
    v = torch.randn(x.shape[0], x.shape[2], generator=torch.Generator().manual_seed(t))
    # every rank runs the backward (the gather's reduce-scatter needs all of them)
    loss = (y[:, t_loc] * v).sum() if rank == owner else y.sum() * 0.0
    (g,) = torch.autograd.grad(loss, [x_loc])
    pieces = [torch.empty_like(g) for _ in range(world)]
    dist.all_gather(pieces, g.contiguous(), group=m.group)
    return torch.cat(pieces, dim=1)


def _check_leaks(rank: int, world: int) -> None:
    m = mesh()
    n = 3
    for causal in (True, False):
        torch.manual_seed(7)
        fit = FIT(dim=16, num_heads=2, group_size=n, num_latents=2, depth=2, causal=causal)
        x = torch.randn(2, world * 2 * n, 16)  # 2 groups per rank
        n_local = 2 * n
        # last token of rank 0, first token of rank 1 (a shard border), inside a group of rank 2
        for t in (n_local - 1, n_local, 2 * n_local + 4):
            g = _input_grad_of_one_output(fit, x, t, rank, world, m)
            after = g[:, t + 1 :].abs().max().item()
            if causal:
                assert after == 0.0, f"causal leak: y[{t}] depends on x after {t} ({after:.3g})"
                assert g[:, t].abs().max() > 0, f"y[{t}] does not depend on x[{t}]"
                # information does cross groups and shard borders from earlier tokens
                first = (t // n - 1) * n  # a token of the previous group
                assert g[:, first].abs().max() > 0, f"y[{t}] ignores x[{first}] of the previous group"
            else:
                # the bidirectional variant must see later tokens: the probe can fail
                assert after > 0, f"bidirectional y[{t}] does not see later tokens"


def test_fit_causal_no_leak_across_shards():
    run_ranks(_check_leaks, 4)


def _check_block_alone(rank: int, world: int) -> None:
    """A causal FITBlock called on its own across ranks (building its own mask rows)."""
    from seqshard.ops.fit.naive import naive_block

    torch.manual_seed(11)
    block = FITBlock(dim=48, num_heads=1, group_size=3, num_latents=2, causal=True)
    x, lat = torch.randn(2, world * 6, 48), torch.randn(2, world * 2, 2, 48)
    y_ref, lat_ref = naive_block(block, x, lat.flatten(1, 2), 3)
    y, lat2 = block(x[:, rank * 6 : rank * 6 + 6], lat[:, rank * 2 : rank * 2 + 2], mesh())
    assert_close("sharded block out", y_ref[:, rank * 6 : rank * 6 + 6], y, TOL["out"])
    assert_close("sharded block latents", lat_ref[:, rank * 4 : rank * 4 + 4],
                 lat2.flatten(1, 2), TOL["out"])


def test_fit_block_alone_sharded():
    run_ranks(_check_block_alone, 2)


def _check_mismatched_shards(rank: int, world: int) -> None:
    fit = FIT(dim=16, num_heads=2, group_size=5, num_latents=2)
    x = torch.randn(1, 10 if rank == 0 else 15, 16)
    shapes = r"rank 1 has x shape=\(1, 15, 16\) \(rank 0: \(1, 10, 16\)\)"
    with pytest.raises(ValueError, match=shapes):
        fit(x, mesh())


def test_fit_rejects_mismatched_shards():
    run_ranks(_check_mismatched_shards, 2)


def test_fit_bad_arguments():
    with pytest.raises(ValueError, match="num_latents=0"):
        FIT(dim=16, num_heads=2, group_size=4, num_latents=0)
    with pytest.raises(ValueError, match="group_size=0"):
        FIT(dim=16, num_heads=2, group_size=0, num_latents=2)
    with pytest.raises(ValueError, match=r"dim=96.*num_heads=5"):
        FIT(dim=96, num_heads=5, group_size=4, num_latents=2)
    with pytest.raises(ValueError, match=r"depth=0"):
        FIT(dim=16, num_heads=2, group_size=4, num_latents=2, depth=0)
    with pytest.raises(ValueError, match=r"group_size=5.*max_group_size=3"):
        FIT(dim=16, num_heads=2, group_size=5, num_latents=2, max_group_size=3)
    with pytest.raises(ValueError, match="local_layers=-1"):
        FITBlock(dim=16, num_heads=2, group_size=4, num_latents=2, local_layers=-1)


def test_fit_bad_inputs():
    fit = FIT(dim=16, num_heads=2, group_size=5, num_latents=2, max_group_size=8)
    with pytest.raises(ValueError, match=r"N_local=7.*group_size=5"):
        fit(torch.randn(1, 7, 16))
    with pytest.raises(ValueError, match=r"width 12.*dim=16"):
        fit(torch.randn(1, 10, 12))
    with pytest.raises(ValueError, match=r"\(1, 10\)"):
        fit(torch.randn(1, 10))
    with pytest.raises(ValueError, match=r"group_size=9.*max_group_size=8"):
        fit.set_group_size(9)
    block = fit.blocks[0]
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 16\).*\(1, 2, 2, 16\)"):
        block(torch.randn(1, 10, 16), torch.randn(1, 2, 3, 16))


def test_fit_group_size_can_change_up_to_max():
    torch.manual_seed(3)
    fit = FIT(dim=16, num_heads=2, group_size=4, num_latents=2, max_group_size=6, causal=True)
    fit.set_group_size(6)
    x = torch.randn(2, 18, 16)
    assert_close("group 6 out", naive_fit(fit, x), fit(x), TOL["out"])


def test_fit_block_alone_matches_naive_block():
    """A causal FITBlock called on its own builds its mask; outputs and latents match."""
    from seqshard.ops.fit.fit import latent_mask
    from seqshard.ops.fit.naive import naive_block

    torch.manual_seed(5)
    block = FITBlock(dim=48, num_heads=1, group_size=3, num_latents=2, global_layers=2,
                     causal=True)
    x, lat = torch.randn(2, 12, 48), torch.randn(2, 4, 2, 48)
    y, lat2 = block(x, lat)
    y_ref, lat_ref = naive_block(block, x, lat.flatten(1, 2), 3)
    assert_close("block out", y_ref, y, TOL["out"])
    assert_close("block latents", lat_ref, lat2.flatten(1, 2), TOL["out"])
    y_shared, _ = block(x, lat, global_mask=latent_mask(4, 2))  # all rows: one process
    assert torch.equal(y, y_shared)
    with pytest.raises(ValueError, match=r"global_mask has shape \(6, 6\), expected \(8, 8\)"):
        block(x, lat, global_mask=latent_mask(3, 2))
