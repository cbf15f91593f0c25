"""A Gemma-3-like attention stack (5 sliding-window layers per global causal layer) on the
zigzag layout against the contiguous one: fwd+bwd time of the slowest rank and CPU time per
rank.

    python benchmarks/windows.py                       # N = 16K, P = 2 and 4, 3 repeats
    python benchmarks/windows.py --tokens 4096 --reps 1

The stack is attention only (the part whose balance the layout decides; projections and
MLPs cost the same on every rank): x [1, H, n, D] goes through `layers` layers, every
`global_every`-th global causal attention (ring strategy), the others a window of W tokens,
each x <- x + attention(x, x, x). The window layers cost the same on either layout (every
token reads W keys); the global layer costs rank r (2r + 1) / P^2 of the work on the
contiguous layout and 1/P on zigzag. Each rank runs one torch thread on a RankPool; the
machine may be shared, so every repeat is kept: the table gives median and spread (min-max)
of the slowest rank's wall time, the per-rank CPU time (median over repeats) and the
1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from seqshard.dist import RankPool

COLLECTIVE_TIMEOUT_S = 900  # a 16K-token stack on a busy shared host


def _stack(rank, world, layout, tokens, heads, dim, window, layers, global_every, reps):
    """Per repeat: (wall seconds, CPU seconds) of this rank's fwd+bwd of the stack."""
    import torch.distributed as dist

    from seqshard.dist import Mesh
    from seqshard.ops.attention import sharded_attention

    m = Mesh.new(timeout_s=COLLECTIVE_TIMEOUT_S)
    n = tokens // world
    gen = torch.Generator().manual_seed(rank)
    results = []
    for _ in range(reps + 1):  # the first is a warm-up (plans, buffers)
        x0 = torch.randn(1, heads, n, dim, generator=gen, requires_grad=True)  # [1, H, n, D]
        dist.barrier(group=m.group)
        t0, c0 = time.perf_counter(), time.process_time()
        x = x0
        for i in range(layers):
            is_global = (i + 1) % global_every == 0
            out = sharded_attention(x, x, x, m, causal=True, layout=layout,
                                    strategy="ring" if is_global else "auto",
                                    window=None if is_global else window,
                                    check_agreement=False)
            x = x + out
        x.square().mean().backward()
        results.append((time.perf_counter() - t0, time.process_time() - c0))
    return results[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--global-every", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; N={args.tokens}, H={args.heads}, D={args.dim}, "
          f"W={args.window}, {args.layers} layers (global every {args.global_every}), fp32, "
          f"1 thread per rank, {args.reps} repeats after a warm-up")
    print("| P | layout | slowest rank wall s, median (min-max) | CPU s per rank (median) "
          "| load before / after |")
    print("|---|---|---|---|---|")
    for world in args.worlds:
        with RankPool(world, threads=1, timeout_s=COLLECTIVE_TIMEOUT_S) as pool:
            for layout in ("contiguous", "zigzag"):
                load0 = os.getloadavg()[0]
                per_rank = pool.run(_stack, (layout, args.tokens, args.heads, args.dim,
                                             args.window, args.layers, args.global_every,
                                             args.reps), timeout_s=3 * COLLECTIVE_TIMEOUT_S)
                print(table_row(world, layout, per_rank, args.reps, load0), flush=True)


def table_row(world: int, layout: str, per_rank: list, reps: int, load0: float) -> str:
    """One markdown row from each rank's [(wall s, CPU s)] per repeat: the slowest rank's wall
    per repeat (median, min-max), each rank's median CPU, the load before and now."""
    walls = [max(r[i][0] for r in per_rank) for i in range(reps)]
    cpus = [statistics.median(c for _, c in r) for r in per_rank]
    return (f"| {world} | {layout} | {statistics.median(walls):.2f} "
            f"({min(walls):.2f}-{max(walls):.2f}) | {' / '.join(f'{c:.2f}' for c in cpus)} | "
            f"{load0:.1f} / {os.getloadavg()[0]:.1f} |")


if __name__ == "__main__":
    main()
