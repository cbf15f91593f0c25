"""A DeltaNet hybrid LM (delta, window, delta, global by default) on the zigzag layout against
the contiguous one: the training step's fwd+bwd time of the slowest rank and CPU time per rank.

    python benchmarks/windows_deltanet.py                    # N = 16K, P = 2, 3 repeats
    python benchmarks/windows_deltanet.py --tokens 4096 --reps 1 --worlds 2 4

The whole model runs (embedding, blocks, the loss in pieces), as the Trainer runs it. On the
contiguous layout the global layer costs rank r (2r + 1) / P^2 of its work; on zigzag 1/P,
but the residual stream moves to contiguous before the first delta layer and back before the
global layer (`seqshard.dist.relayout`, and the reverse moves in backward). Each rank runs one
torch thread on a RankPool; the machine may be shared, so every repeat is kept: median and
spread (min-max) of the slowest rank's wall time, the per-rank CPU time (median over
repeats) and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from seqshard.dist import RankPool
from windows import table_row  # the same row as the attention-only stack's (run as a script)

COLLECTIVE_TIMEOUT_S = 900  # a 16K-token step on a busy shared host


def _steps(rank, world, layout, tokens, model_args, reps):
    """Per repeat: (wall seconds, CPU seconds) of this rank's fwd+bwd of one LM step."""
    import torch.distributed as dist

    from seqshard.dist import Mesh, get_layout
    from seqshard.models import build_model, next_token_targets

    m = Mesh.new(timeout_s=COLLECTIVE_TIMEOUT_S)
    torch.manual_seed(0)
    model = build_model("deltanet", dict(model_args, layout=layout), m)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens),
                        generator=torch.Generator().manual_seed(0))
    ids_local = get_layout(layout).shard(ids, 1, m.rank, m.size)  # [1, N_local]
    targets = next_token_targets(ids_local, m, layout=layout)
    results = []
    for _ in range(reps + 1):  # the first is a warm-up (plans, buffers)
        model.zero_grad(set_to_none=True)
        dist.barrier(group=m.group)
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = model(ids_local, targets)
        loss.backward()
        results.append((time.perf_counter() - t0, time.process_time() - c0))
    return results[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2])
    parser.add_argument("--layouts", nargs="+", default=["contiguous", "zigzag"])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--mixers", default="delta,window,delta,global",
                        help="one per layer: delta | window | global")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    mixers = args.mixers.split(",")
    if set(mixers) - {"delta", "window", "global"}:
        raise ValueError(f"--mixers {args.mixers!r}: each must be delta, window or global")
    model_args = dict(vocab_size=256, dim=args.dim, num_heads=args.heads, num_layers=len(mixers),
                      window=args.window, strategy="ring",
                      attn_layers=tuple(i for i, k in enumerate(mixers) if k == "global"),
                      window_layers=tuple(i for i, k in enumerate(mixers) if k == "window"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; DeltaNetLM N={args.tokens}, dim={args.dim}, "
          f"H={args.heads}, W={args.window}, layers {args.mixers}, fp32, 1 thread per rank, "
          f"{args.reps} repeats after a warm-up")
    print("| P | layout | slowest rank wall s, median (min-max) | CPU s per rank (median) "
          "| load before / after |")
    print("|---|---|---|---|---|")
    for world in args.worlds:
        with RankPool(world, threads=1, timeout_s=COLLECTIVE_TIMEOUT_S) as pool:
            for layout in args.layouts:
                load0 = os.getloadavg()[0]
                per_rank = pool.run(_steps, (layout, args.tokens, model_args, args.reps),
                                    timeout_s=3 * COLLECTIVE_TIMEOUT_S)
                print(table_row(world, layout, per_rank, args.reps, load0), flush=True)


if __name__ == "__main__":
    main()
