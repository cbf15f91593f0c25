"""The DeltaNet layer's short conv: short_conv.causal_conv (shifted multiply-adds along the
tokens of the [B, n, C] stream) against torch's conv1d on the channels-first transpose of the
same rows (naive.naive_short_conv, what the layer ran before), forward and forward + backward,
CPU seconds of one thread, best of --reps.

    python benchmarks/short_conv.py
    python benchmarks/short_conv.py --tokens 16384,65536 --channels 256 --size 4 --reps 7
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from seqshard.ops.delta_rule.naive import naive_short_conv
from seqshard.ops.delta_rule.short_conv import causal_conv


def _best(fn, reps: int) -> tuple[float, float]:
    """(forward, forward + backward) CPU seconds, the best of reps."""
    fwd, both = [], []
    for _ in range(reps):
        start = time.process_time()
        y = fn()
        fwd.append(time.process_time() - start)
        y.backward(torch.ones_like(y))
        both.append(time.process_time() - start)
    return min(fwd), min(both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="16384,65536")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=4, help="conv_size (taps)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'tokens':>8}{'conv1d fwd':>12}{'ours fwd':>10}{'ratio':>7}"
          f"{'conv1d f+b':>12}{'ours f+b':>10}{'ratio':>7}{'load':>7}")
    for n in (int(t) for t in args.tokens.split(",")):
        torch.manual_seed(0)
        C, K = args.channels, args.size
        x = torch.randn(1, n, C, requires_grad=True)  # [B, n, C], as the projections give it
        context = torch.randn(1, K - 1, C, requires_grad=True)
        weight = torch.randn(C, K, requires_grad=True)
        old = _best(lambda: naive_short_conv(torch.cat([context, x], 1), weight), args.reps)
        new = _best(lambda: causal_conv(x, context, weight), args.reps)
        print(f"{n:>8}{old[0]:>12.4f}{new[0]:>10.4f}{old[0] / new[0]:>7.2f}"
              f"{old[1]:>12.4f}{new[1]:>10.4f}{old[1] / new[1]:>7.2f}"
              f"{os.getloadavg()[0]:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
