"""The Triton state chain (ops/delta_rule/triton_chain.py) against chain.py's torch loops, run
on the CPU by Triton's interpreter: all three entry points (forward states, backward with and
without the per-chunk gradients, a shard's map), fp32, with and without the gate, Dv not a
multiple of the column tile, C and Dk not powers of two, a padded last chunk, strided keys,
several chunks, heads and batches. And the dispatch: CPU tensors never reach Triton.

TRITON_INTERPRET is read when a kernel is decorated, so the kernels run in a child process
that sets it before importing triton (this process's triton, if any, stays compiled: on a
GPU machine other tests may launch the real kernels). The child saves each pair of results;
this process compares them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.common import assert_close

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # B, H, N, Dk, Dv, C, gate, strided keys, block_v
    # Dv = 20: a full column tile of 16 and a partial one; C = 6 and Dk = 12 padded to 16; the
    # last chunk zero-padded (20 = 3 x 6 + 2)
    (2, 2, 20, 12, 20, 6, False, False, 16),
    (2, 2, 20, 12, 20, 6, True, False, 16),
    # keys that are every other column of a [B, H, N, 2 Dk] tensor: Kt is k itself (no gate),
    # a view with rows 2 Dk apart and columns 2 apart; 4 whole chunks
    (1, 2, 24, 8, 40, 6, False, True, 32),
    (1, 3, 17, 16, 8, 8, True, False, 16),  # Dv smaller than one tile, under a gate
]
NAMES = ("states", "deltas", "dS after each chunk", "dS0", "dS0 (not kept)", "map")


def case_id(case) -> str:
    return "-".join(map(str, case))


def _inputs(B, H, N, Dk, Dv, gate, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    k = F.normalize(rand(B, H, N, Dk), dim=-1)
    if strided:  # every other column of [B, H, N, 2 Dk]: rows 2 Dk apart, columns 2
        k = torch.empty(B, H, N, 2 * Dk)[..., ::2].copy_(k)
    gate_t = -torch.rand(B, H, N, generator=gen) * 0.3 if gate else None
    return [rand(B, H, N, Dk), k, rand(B, H, N, Dv), torch.rand(B, H, N, generator=gen), gate_t]


def run_cases(out_path: str) -> None:
    """The child: each case through the torch loops and the interpreted kernels; saves
    {case id: [(name, loop result, Triton result), ...]}."""
    from seqshard.ops.delta_rule import chain, chunk_math, triton_chain

    results = {}
    for seed, case in enumerate(CASES):
        B, H, N, Dk, Dv, C, gate, strided, block_v = case
        ch = chunk_math.prepare_blocked(_inputs(B, H, N, Dk, Dv, gate, strided, seed),
                                        Dk ** -0.5, C)
        w, u, kt, decay4 = chain._heads_flat(ch)
        decay = chain._decay_2d(decay4)
        if strided and not gate:
            assert kt.stride(-1) == 2, "the strided keys must reach the kernel uncopied"
        nc, BH = w.shape[:2]
        gen = torch.Generator().manual_seed(100 + seed)
        s0, g_end = torch.randn(2, BH, Dk, Dv, generator=gen)
        ds = torch.randn(nc, BH, Dk, Dv, generator=gen)
        m0 = torch.cat([torch.eye(Dk).expand(BH, Dk, Dk), torch.randn(BH, Dk, Dv, generator=gen)],
                       dim=-1)  # a nonzero Bm, so the map's U columns are checked as added
        pairs = []
        for run in ("loop", "triton"):
            # NaN-filled: a value the kernel fails to write shows up
            states = torch.full((nc + 1, BH, Dk, Dv), float("nan"))
            states[0] = s0
            deltas = torch.full(u.shape, float("nan"))
            g, g_lone = g_end.clone(), g_end.clone()
            after = torch.full((nc, BH, Dk, Dv), float("nan"))
            m = m0.clone()
            if run == "loop":
                chain.loop_forward(states, deltas, w, u, kt, decay4)
                chain.loop_backward(g, w, kt, decay4, ds, after)
                chain.loop_backward(g_lone, w, kt, decay4, ds, None)
                chain.loop_map(m, w, u, kt, decay4)
            else:
                triton_chain.forward(states, deltas, w, u, kt, decay, block_v=block_v)
                triton_chain.backward(g, w, kt, decay, ds, after, block_v=block_v)
                triton_chain.backward(g_lone, w, kt, decay, ds, None, block_v=block_v)
                triton_chain.shard_map(m, w, u, kt, decay, block_v=block_v)
            pairs.append((states, deltas, after, g, g_lone, m))
        results[case_id(case)] = [(n, a, b) for n, a, b in zip(NAMES, *pairs)]
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the optional `gpu` extra): no Triton chain here")
    out = tmp_path_factory.mktemp("triton_chain") / "results.pt"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    done = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_chain_matches_torch_loop(case, interpreted):
    for name, ref, out in interpreted[case_id(case)]:
        assert torch.isfinite(out).all(), f"{name}: the kernel left values unwritten"
        assert_close(f"triton {name}", ref, out, 1e-5)


def test_cpu_tensors_never_reach_triton():
    """Off CUDA the entry points decline (False, nothing written) and the torch loop runs;
    no triton import is needed for that."""
    from seqshard.ops.delta_rule import triton_chain

    w = kt = torch.ones(2, 1, 4, 3)
    u = torch.ones(2, 1, 4, 5)
    states, deltas = torch.zeros(3, 1, 3, 5), torch.zeros(2, 1, 4, 5)
    assert not triton_chain.chain_forward(states, deltas, w, u, kt, None)
    assert not triton_chain.chain_backward(torch.zeros(1, 3, 5), w, kt, None,
                                           torch.zeros(2, 1, 3, 5), None)
    assert not triton_chain.chain_map(torch.zeros(1, 3, 8), w, u, kt, None)
    assert states.eq(0).all() and deltas.eq(0).all()


def test_block_v_must_be_a_power_of_two():
    from seqshard.ops.delta_rule import triton_chain

    with pytest.raises(ValueError, match="block_v must be a power of two >= 16, got 24"):
        triton_chain._blocks(8, 8, 24)


if __name__ == "__main__":
    run_cases(sys.argv[1])


def test_shape_errors_name_the_triton_chain():
    # the C and Triton backends share one set of shape checks; each names its own backend
    from seqshard.ops.delta_rule import triton_chain

    nc, bh, c, dk, dv = 2, 3, 4, 5, 6
    w = kt = torch.zeros(nc, bh, c, dk)
    u = torch.zeros(nc, bh, c, dv)
    states = torch.zeros(nc, bh, dk, dv)  # one chunk-start state short: nc + 1 expected
    with pytest.raises(ValueError, match=r"^triton chain: states has shape \(2, 3, 5, 6\)"):
        triton_chain.forward(states, torch.zeros(nc, bh, c, dv), w, u, kt, None)
