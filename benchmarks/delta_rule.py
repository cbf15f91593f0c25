"""Delta-rule benchmarks on this CPU; every ratio comes from timings taken in the same run.

    python benchmarks/delta_rule.py            # fuller: sweep up to 1M tokens
    python benchmarks/delta_rule.py --quick    # about 1-2 minutes: sweep up to 256K tokens

1. chunked (WY) vs the token-by-token recurrence (naive.py) on one process, N = 8K:
   forward and forward+backward.
2. sharded over 2 gloo ranks (1 thread each) vs chunked on one process (2 threads): the same
   two cores, forward+backward, both schedules.
3. tokens/s of forward+backward on 2 ranks ("scan") from 4K up to 1M tokens, with
   time(1M) / time(64K) (16 would be exactly linear), and each rank's peak resident memory.

Timings are the minimum over repeats (the least disturbed sample; the machine may be shared:
the load average is printed with each section). Sharded timings are the slowest rank's.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F


def load() -> str:
    return "load avg %.1f %.1f %.1f" % os.getloadavg()


def inputs(B, H, N, D, *, requires_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen)
    k = F.normalize(torch.randn(B, H, N, D, generator=gen), dim=-1)
    v = torch.randn(B, H, N, D, generator=gen)
    beta = torch.rand(B, H, N, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, beta)]


def best_time(fn, repeats: int, sync=None) -> float:
    """Minimum wall time of fn() over repeats (after one warm-up when repeats > 1)."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(sync(elapsed) if sync else elapsed)
    return min(times)


def fwd_bwd(op, tensors, **kwargs):
    def step():
        o, _ = op(*tensors, **kwargs)
        o.backward(torch.ones_like(o))
        for t in tensors:
            t.grad = None
    return step


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- 1. chunk vs naive ----------------------------------------------------------------------
def chunk_vs_naive(cfg) -> dict:
    from seqshard.ops.delta_rule import delta_rule
    from seqshard.ops.delta_rule.naive import naive_delta_rule

    torch.set_num_threads(1)
    B, H, D, N = 1, cfg.heads, cfg.dim, cfg.naive_tokens
    ts = inputs(B, H, N, D)
    with torch.no_grad():
        chunk_f = best_time(lambda: delta_rule(*ts), 5)
        naive_f = best_time(lambda: naive_delta_rule(*ts), 1)
    chunk_fb = best_time(fwd_bwd(delta_rule, ts), 3)
    naive_fb = best_time(fwd_bwd(naive_delta_rule, ts), 1)
    print(f"\n[1] chunked vs naive recurrence, one process, 1 thread, B={B} H={H} D={D} N={N} "
          f"({load()})")
    print(f"    forward:          naive {naive_f * 1e3:8.1f} ms   chunked {chunk_f * 1e3:7.1f} ms"
          f"   speed-up {naive_f / chunk_f:5.1f}x")
    print(f"    forward+backward: naive {naive_fb * 1e3:8.1f} ms   chunked {chunk_fb * 1e3:7.1f} ms"
          f"   speed-up {naive_fb / chunk_fb:5.1f}x")
    return {"naive_fwd": naive_f, "chunk_fwd": chunk_f, "naive_fb": naive_fb, "chunk_fb": chunk_fb}


# --- 2 and 3: two ranks ---------------------------------------------------------------------
def _rank_main(rank, world, port, cfg, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from seqshard.dist import Contiguous, Mesh, init_process_group
    from seqshard.ops.delta_rule import delta_rule

    init_process_group("gloo", timeout_s=600)
    mesh = Mesh.new(timeout_s=600)

    def slowest(elapsed=None):
        if elapsed is None:
            dist.barrier(mesh.group)
            return None
        t = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.group)
        return float(t)

    B, H, D = 1, cfg.heads, cfg.dim
    out = {"compare": {}, "sweep": []}
    for schedule in ("scan", "pass"):
        full = inputs(B, H, cfg.compare_tokens, D, requires_grad=False)
        mine = [Contiguous().shard(t, 2, rank, world).requires_grad_() for t in full]
        step = fwd_bwd(delta_rule, mine, mesh=mesh, schedule=schedule)
        out["compare"][schedule] = best_time(step, cfg.repeats, slowest)
    for n in cfg.sweep:
        full = inputs(B, H, n, D, requires_grad=False)
        mine = [Contiguous().shard(t, 2, rank, world).requires_grad_() for t in full]
        del full
        step = fwd_bwd(delta_rule, mine, mesh=mesh, schedule="scan")
        t = best_time(step, cfg.repeats if n <= 65536 else 1, slowest)
        rss = torch.tensor([peak_rss_mib()])
        dist.all_reduce(rss, op=dist.ReduceOp.MAX, group=mesh.group)
        out["sweep"].append((n, t, float(rss)))
        del mine, step
    if rank == 0:
        results.put(out)
    dist.barrier(mesh.group)
    dist.destroy_process_group()


def two_ranks(cfg) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, cfg, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = results.get()
    for p in procs:
        p.join()
    return out


def single_process_baseline(cfg) -> float:
    from seqshard.ops.delta_rule import delta_rule

    torch.set_num_threads(2)
    ts = inputs(1, cfg.heads, cfg.compare_tokens, cfg.dim)
    return best_time(fwd_bwd(delta_rule, ts), cfg.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sweep, fewer repeats")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64, help="head dim (Dk = Dv)")
    cfg = parser.parse_args()
    cfg.naive_tokens = 8192
    cfg.compare_tokens = 32768 if cfg.quick else 65536
    top = 18 if cfg.quick else 20
    cfg.sweep = [2 ** e for e in range(12, top + 1, 2)]  # 4K, 16K, 64K, 256K (, 1M)
    cfg.repeats = 2 if cfg.quick else 3
    print(f"delta rule benchmarks: torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"chunk 64, fp32 ({load()})")

    chunk_vs_naive(cfg)

    single = single_process_baseline(cfg)
    ranks = two_ranks(cfg)
    n = cfg.compare_tokens
    print(f"\n[2] sharded on 2 ranks (1 thread each) vs chunked on 1 process (2 threads), "
          f"forward+backward, B=1 H={cfg.heads} D={cfg.dim} N={n} ({load()})")
    print(f"    one process: {single * 1e3:8.1f} ms")
    for schedule, t in ranks["compare"].items():
        print(f"    2 ranks {schedule:4s}: {t * 1e3:8.1f} ms   time ratio sharded / one process "
              f"{t / single:5.2f}")

    print(f"\n[3] forward+backward on 2 ranks, scan schedule, B=1 H={cfg.heads} D={cfg.dim} "
          f"({load()})")
    print("    tokens      time (s)   tokens/s    peak RSS per rank (MiB)")
    times = {}
    for n, t, rss in ranks["sweep"]:
        times[n] = t
        print(f"    {n:9d} {t:11.3f} {n / t:11.0f} {rss:14.0f}")
    big = max(times)
    base = big // 16
    if base in times:
        print(f"    time({big // 1024}K) / time({base // 1024}K) = {times[big] / times[base]:.1f}"
              f"  (16.0 = linear)")


if __name__ == "__main__":
    main()
