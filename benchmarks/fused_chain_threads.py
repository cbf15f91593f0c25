"""The delta rule's state chain alone (chain_states + chain_grads): the fused C chain against
the torch loop at the same intra-op thread counts (1, 2 and all = os.cpu_count()), one row per
(H, N), both backends timed in the same run, alternating, so they see the same load.

    python benchmarks/fused_chain_threads.py               # B=1, H=2/4/8, D=64, N=8K..64K, C=32
    python benchmarks/fused_chain_threads.py --quick       # N=8K and 16K only

Each cell: the minimum over --repeats runs in ms, and the spread (max / min) in brackets; the
machine may be shared, so the minimum is the least disturbed sample. "C/loop" is the fused
chain's time over the torch loop's at that thread count (below 1: the fused chain is faster).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from seqshard.ops.delta_rule import chunk, fused_chain


def chunks_for(H: int, N: int, D: int, C: int, seed: int = 0):
    """The Chunks of a random sequence (as the layer makes them), the start state and the
    gradients chain_grads takes."""
    gen = torch.Generator().manual_seed(seed)
    q, v = torch.randn(1, H, N, D, generator=gen), torch.randn(1, H, N, D, generator=gen)
    k = F.normalize(torch.randn(1, H, N, D, generator=gen), dim=-1)
    beta = torch.rand(1, H, N, generator=gen)
    gate = -torch.rand(1, H, N, generator=gen) * 0.3
    ch = chunk.prepare_blocked([q, k, v, beta, gate], D ** -0.5, C)
    nc = ch.w.shape[0]
    s0 = torch.randn(1, H, D, D, generator=gen)
    ds_states = torch.randn(nc, 1, H, D, D, generator=gen)
    return ch, s0, ds_states, torch.randn(1, H, D, D, generator=gen)


def chain_once(ch, s0, ds_states, ds_end) -> None:
    _, _, final = chunk.chain_states(s0, ch)
    chunk.chain_grads(ch, ds_states, ds_end + 0 * final)


def time_row(args, threads: list[int], repeats: int) -> dict:
    """{(backend, threads): [seconds per repeat]}, the backends alternating in every repeat."""
    times: dict = {}
    for _ in range(repeats + 1):  # the first round warms up (page faults, the first build)
        for count in threads:
            torch.set_num_threads(count)
            for backend, flag in (("C", "1"), ("loop", "0")):
                os.environ["SEQSHARD_FUSED_CHAIN"] = flag
                start = time.perf_counter()
                chain_once(*args)
                times.setdefault((backend, count), []).append(time.perf_counter() - start)
    return {key: samples[1:] for key, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, nargs="+", default=[2, 4, 8])
    cfg = parser.parse_args()
    if not fused_chain.available(torch.float32):
        raise SystemExit("the fused C chain is not available here (no compiler?)")
    cpus = os.cpu_count() or 1
    threads = sorted({1, 2, cpus})
    lengths = [8192, 16384] if cfg.quick else [8192, 16384, 32768, 65536]
    D, C = 64, 32
    print(f"fp32, B=1, D={D}, C={C}, {cpus} CPUs, torch {torch.__version__}, "
          f"load avg {'%.1f %.1f %.1f' % os.getloadavg()}; min of {cfg.repeats} ms (max/min)")
    head = " | ".join(f"C {t}t | loop {t}t | C/loop {t}t" for t in threads)
    print(f"| H | N | {head} |\n|" + "---|" * (2 + 3 * len(threads)))
    for H in cfg.heads:
        for N in lengths:
            times = time_row(chunks_for(H, N, D, C), threads, cfg.repeats)
            cells = []
            for t in threads:
                fused, loop = min(times[("C", t)]), min(times[("loop", t)])
                for key, best in ((("C", t), fused), (("loop", t), loop)):
                    cells.append(f"{best * 1e3:.1f} ({max(times[key]) / best:.2f})")
                cells.append(f"{fused / loop:.2f}")
            print(f"| {H} | {N // 1024}K | " + " | ".join(cells) + " |", flush=True)
    print(f"load avg after: {'%.1f %.1f %.1f' % os.getloadavg()}")


if __name__ == "__main__":
    main()
