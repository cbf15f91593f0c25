"""Sharded attention vs single-process SDPA and DeepSpeed Ulysses: fwd+bwd time, peak memory.

    python benchmarks/attention.py --quick      # N up to 4K, ~1-2 min
    python benchmarks/attention.py              # N sweep up to 16K

Every strategy runs on 2 gloo ranks (1 thread each); the baseline is torch SDPA on the full
sequence in one process with 2 threads -- the same two cores either way. Everything is
measured in the same run and reported as ratios to the SDPA baseline. Time: the slower
rank's fwd+bwd wall time, best over interleaved rounds (the machine may be shared; the
1-minute load average is printed with each N). CPU: the ranks' summed process CPU time,
which load disturbs less. Peak memory: the rise of the process's peak resident set over its
resident set before the inputs were made (seqshard.dist.memory.PeakWindow), max over ranks.
It counts the inputs (q, k, v and the output gradient), the output and the three gradients:
1/P of the baseline's tensors, which at P = 2, N = 16K is 64 MiB or 0.44x of its 146 MiB
peak; what a strategy holds on top of that floor is what its design controls.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

# big tensors come from mmap and go back to the OS when freed, so RSS tracks live tensors
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from seqshard.dist import RankPool  # noqa: E402
from seqshard.dist.memory import PeakWindow  # noqa: E402

# what runs (sharded_attention's strategy names, or DeepSpeed's Ulysses) -> the layout it runs on
LAYOUTS = {
    "ring": "zigzag",
    "ulysses": "contiguous",
    "allgather": "zigzag",
    "deepspeed-ulysses": "contiguous",
}
COLLECTIVE_TIMEOUT_S = 600  # the longest collective wait (a 16K-token step on a busy host)


# --- measuring ---------------------------------------------------------------------------------
def _measure(make_inputs, step, reps: int, warmup: bool, barrier=lambda: None):
    """Best fwd+bwd wall seconds and CPU seconds over reps (after an optional warm-up), and
    the peak RSS rise in bytes."""
    times, cpus, peaks = [], [], []
    for rep in range(reps + int(warmup)):
        gc.collect()
        barrier()
        with PeakWindow() as window:  # the resident set's rise, inputs included
            inputs = make_inputs()
            barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            step(*inputs)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = window.rise
        del inputs
        if rep > 0 or not warmup:  # the warm-up pays for one-time set-up (plans, imports, buffers)
            times.append(elapsed)
            cpus.append(cpu)
            peaks.append(peak)
    return min(times), max(peaks), min(cpus)


def _tensors(shape, gen_seed, n=4):
    gen = torch.Generator().manual_seed(gen_seed)
    return [torch.randn(*shape, generator=gen).requires_grad_(i < 3) for i in range(n)]


# --- rank functions (module level: the rank processes import them) -----------------------------
def _single_sdpa(rank, world, n, heads, dim, reps, warmup):
    def step(q, k, v, g):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

    return _measure(lambda: _tensors((1, heads, n, dim), 0), step, reps, warmup)


def _sharded(rank, world, n, heads, dim, reps, warmup, strategy):
    import torch.distributed as dist

    from seqshard.dist import Mesh
    from seqshard.ops.attention import sharded_attention

    m = Mesh.new(timeout_s=COLLECTIVE_TIMEOUT_S)
    barrier = lambda: dist.barrier(group=m.group)  # noqa: E731
    if strategy == "deepspeed-ulysses":
        from deepspeed.sequence.layer import DistributedAttention

        def local(q, k, v):  # DeepSpeed hands [B, N, H/P, D]; SDPA wants [B, H/P, N, D]
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                 is_causal=True)
            return out.transpose(1, 2)

        attn = DistributedAttention(local, m.group, scatter_idx=2, gather_idx=1)
        shape = (1, n // world, heads, dim)  # DeepSpeed's [B, N/P, H, D]
        fwd = lambda q, k, v: attn(q, k, v, 0)  # noqa: E731
    else:
        shape = (1, heads, n // world, dim)
        fwd = lambda q, k, v: sharded_attention(  # noqa: E731
            q, k, v, m, causal=True, layout=LAYOUTS[strategy], strategy=strategy)

    def step(q, k, v, g):
        fwd(q, k, v).backward(g)

    return _measure(lambda: _tensors(shape, rank), step, reps, warmup, barrier)


# --- driver ------------------------------------------------------------------------------------
def _sweep_point(n, args, reps, rounds, single: RankPool, pair: RankPool):
    """Min time / max peak per config, interleaving configs over rounds so load drift on a
    shared machine hits all of them alike. `single`: one process with two threads; `pair`:
    two ranks with one thread each."""
    timeout = 6 * COLLECTIVE_TIMEOUT_S
    best: dict[str, tuple[float, float, float]] = {}
    for rnd in range(rounds):
        warm = rnd == 0
        runs = {"sdpa (1 process)": single.run(_single_sdpa, (n, args.heads, args.dim, reps,
                                                              warm), timeout_s=timeout)}
        for strategy in args.strategies:
            runs[strategy] = pair.run(_sharded, (n, args.heads, args.dim, reps, warm, strategy),
                                      timeout_s=timeout)
        for name, res in runs.items():
            t, peak = max(r[0] for r in res), max(r[1] for r in res)  # the slower rank
            cpu = sum(r[2] for r in res)  # all ranks' CPU seconds: the work, load-independent
            old = best.get(name, (float("inf"), 0.0, float("inf")))
            best[name] = (min(old[0], t), max(old[1], peak), min(old[2], cpu))
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 4K, one round")
    parser.add_argument("--sizes", type=int, nargs="*", help="sequence lengths to sweep")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=1, help="timed repetitions per call")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per N")
    parser.add_argument("--strategies", nargs="*", default=list(LAYOUTS))
    args = parser.parse_args(argv)
    sizes = args.sizes or ([1024, 2048, 4096] if args.quick else [2048, 4096, 8192, 16384])
    rounds = args.rounds or (1 if args.quick else 2)

    print(f"causal attention fwd+bwd, B=1 H={args.heads} D={args.dim} fp32, 2 gloo ranks x 1 "
          f"thread vs 1 process x 2 threads; best of {rounds} rounds x {args.reps} reps; "
          f"load avg {os.getloadavg()}")
    print(f"{'N':>6} {'strategy':>18} {'time s':>8} {'x sdpa':>7} {'cpu s':>8} {'x sdpa':>7} "
          f"{'peak MiB':>9} {'x sdpa':>7} {'load':>5}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the ranks inherit it: gloo on the CPU
    with RankPool(1, threads=2, timeout_s=COLLECTIVE_TIMEOUT_S) as single, \
            RankPool(2, threads=1, timeout_s=COLLECTIVE_TIMEOUT_S) as pair:
        for n in sizes:
            _report_point(n, _sweep_point(n, args, args.reps, rounds, single, pair))
    print(f"load avg at the end {os.getloadavg()}")


def _report_point(n: int, best: dict) -> None:
    t_ref, m_ref, c_ref = best["sdpa (1 process)"]
    load = os.getloadavg()[0]  # 1-minute load when this N finished: read wall times by it
    for name, (t, peak, cpu) in best.items():
        print(f"{n:>6} {name:>18} {t:8.3f} {t / t_ref:7.2f} {cpu:8.3f} {cpu / c_ref:7.2f} "
              f"{peak / 2**20:9.1f} {peak / m_ref:7.2f} {load:5.1f}", flush=True)


if __name__ == "__main__":
    main()
