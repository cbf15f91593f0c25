"""Delta-rule benchmarks on this CPU; every ratio comes from timings taken in the same run.

    python benchmarks/delta_rule.py            # fuller: sweep up to 1M tokens
    python benchmarks/delta_rule.py --quick    # about 1-2 minutes on an idle machine: up to 256K

1. chunked (WY) vs the token-by-token recurrence (naive.py) on one process, N = 8K:
   forward and forward+backward.
2. sharded over 2 gloo ranks (1 thread each) vs chunked on one process (2 threads): the same
   two cores, forward+backward, both schedules.
3. tokens/s of forward+backward on 2 ranks ("scan") from 4K up to 1M tokens, with
   time(1M) / time(64K) (16 would be exactly linear), and each rank's peak resident memory.

Timings are the minimum over repeats (the least disturbed sample; the machine may be shared:
the load average is printed with each section). Sharded timings are the slowest rank's.
Every process asks glibc to keep freed memory in its heap (as jemalloc / tcmalloc do, see
`keep_freed_memory`); --default-malloc measures without that, where each large tensor is a
fresh mmap whose pages fault in again on every call (system time that grows with N).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

import torch
import torch.nn.functional as F

from seqshard.dist import RankPool
from seqshard.dist.memory import peak_bytes
from seqshard.ops.delta_rule import fused_chain


def keep_freed_memory() -> bool:
    """glibc mallopt: no mmap for large blocks (M_MMAP_MAX = 0) and no trimming of the heap
    top (M_TRIM_THRESHOLD), so freed tensors are reused instead of faulted in afresh."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def load() -> str:
    return "load avg %.1f %.1f %.1f" % os.getloadavg()


def inputs(B, H, N, D, *, requires_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen)
    k = F.normalize(torch.randn(B, H, N, D, generator=gen), dim=-1)
    v = torch.randn(B, H, N, D, generator=gen)
    beta = torch.rand(B, H, N, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, beta)]


def best_time(fn, repeats: int, sync=None) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(): the minimum of each over repeats, after one warm-up run
    (fresh pages, first-touch costs) unless repeats is 1. CPU time is this process's, so it
    does not count time spent waiting behind other jobs on a shared machine. `sync` (two
    ranks) lines the ranks up before each run and returns the slowest rank's times."""
    if repeats > 1:
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if sync:
            sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if sync:
            wall, cpu = sync((wall, cpu))
        walls.append(wall)
        cpus.append(cpu)
    return min(walls), min(cpus)


def fwd_bwd(op, tensors, **kwargs):
    def step():
        o, _ = op(*tensors, **kwargs)
        o.backward(torch.ones_like(o))
        for t in tensors:
            t.grad = None
    return step


def peak_rss_mib() -> float:
    """This process's peak resident set since it started (nothing here resets it)."""
    return peak_bytes() / 2**20


# --- 1. chunk vs naive ----------------------------------------------------------------------
def chunk_vs_naive(cfg) -> dict:
    from seqshard.ops.delta_rule import delta_rule
    from seqshard.ops.delta_rule.naive import naive_delta_rule

    torch.set_num_threads(1)
    B, H, D, N = 1, cfg.heads, cfg.dim, cfg.naive_tokens
    ts = inputs(B, H, N, D)
    with torch.no_grad():
        chunk_f = best_time(lambda: delta_rule(*ts, chunk_size=cfg.chunk), 5)
        naive_f = best_time(lambda: naive_delta_rule(*ts), 1)
    chunk_fb = best_time(fwd_bwd(delta_rule, ts, chunk_size=cfg.chunk), 3)
    naive_fb = best_time(fwd_bwd(naive_delta_rule, ts), 1)
    # the same kernel with the state chain as torch calls (the fused C chain switched off)
    fused, setting = fused_chain.available(), os.environ.get("SEQSHARD_FUSED_CHAIN")
    os.environ["SEQSHARD_FUSED_CHAIN"] = "0"
    with torch.no_grad():
        loop_f = best_time(lambda: delta_rule(*ts, chunk_size=cfg.chunk), 5)
    loop_fb = best_time(fwd_bwd(delta_rule, ts, chunk_size=cfg.chunk), 3)
    if setting is None:
        del os.environ["SEQSHARD_FUSED_CHAIN"]
    else:
        os.environ["SEQSHARD_FUSED_CHAIN"] = setting
    print(f"\n[1] chunked vs naive recurrence, one process, 1 thread, B={B} H={H} D={D} N={N} "
          f"({load()})\n    state chain: {'fused C' if fused else 'torch loop (no fused C chain)'}")
    for what, naive, chunk, loop in (("forward", naive_f, chunk_f, loop_f),
                                     ("forward+backward", naive_fb, chunk_fb, loop_fb)):
        for i, clock in enumerate(("wall", "CPU ")):
            print(f"    {what:16s} {clock}: naive {naive[i] * 1e3:8.1f} ms   chunked "
                  f"{chunk[i] * 1e3:7.1f} ms   speed-up {naive[i] / chunk[i]:5.1f}x   "
                  f"(torch-loop chain {loop[i] * 1e3:6.1f} ms: {naive[i] / loop[i]:5.1f}x)")


# --- 2 and 3: two ranks ---------------------------------------------------------------------
def _rank_task(rank, world, cfg):
    """Sections 2 and 3 on one rank of the pool (1 thread, group already joined)."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's collective renames

    from seqshard.dist import Contiguous, Mesh
    from seqshard.ops.delta_rule import delta_rule

    mesh = Mesh.new(timeout_s=RANK_TIMEOUT_S)

    def slowest(times=None):
        if times is None:
            dist.barrier(mesh.group)
            return None
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.group)
        return tuple(t.tolist())

    def own_shard(full, rank, world):
        """This rank's contiguous piece of each full-length input, as a data loader hands a rank
        its shard; the full tensors are freed. (A view into them would keep all N tokens alive
        on every rank and reach the kernel strided: at 1M the backward ran 1.5x slower.)"""
        return [Contiguous().shard(t, 2, rank, world).contiguous().requires_grad_() for t in full]

    B, H, D = 1, cfg.heads, cfg.dim
    out = {"compare": {}, "sweep": []}
    for schedule in ("scan", "pass"):
        mine = own_shard(inputs(B, H, cfg.compare_tokens, D, requires_grad=False), rank, world)
        step = fwd_bwd(delta_rule, mine, mesh=mesh, schedule=schedule, chunk_size=cfg.chunk)
        out["compare"][schedule] = best_time(step, cfg.repeats, slowest)
    for n in cfg.sweep:
        mine = own_shard(inputs(B, H, n, D, requires_grad=False), rank, world)
        step = fwd_bwd(delta_rule, mine, mesh=mesh, schedule="scan", chunk_size=cfg.chunk)
        t = best_time(step, cfg.repeats, slowest)
        rss = torch.tensor([peak_rss_mib()])
        dist.all_reduce(rss, op=dist.ReduceOp.MAX, group=mesh.group)
        out["sweep"].append((n, t, float(rss)))
        del mine, step
    return out


RANK_TIMEOUT_S = 600  # the longest collective wait (a 1M-token step)


def two_ranks(cfg) -> dict:
    """Rank 0's results of sections 2 and 3 on a pool of 2 one-thread gloo ranks; a rank that
    fails or stalls raises instead of leaving this process waiting."""
    setup = keep_freed_memory if cfg.tuned_malloc else None
    with RankPool(2, threads=1, timeout_s=RANK_TIMEOUT_S, setup=setup) as pool:
        return pool.run(_rank_task, (cfg,), timeout_s=6 * 3600)[0]


def single_process_baseline(cfg, threads: int) -> float:
    from seqshard.ops.delta_rule import delta_rule

    torch.set_num_threads(threads)
    ts = inputs(1, cfg.heads, cfg.compare_tokens, cfg.dim)
    return best_time(fwd_bwd(delta_rule, ts, chunk_size=cfg.chunk), cfg.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sweep, fewer repeats")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64, help="head dim (Dk = Dv)")
    parser.add_argument("--sections", default="123", help="which of sections 1, 2, 3 to run")
    parser.add_argument("--chunk", type=int, default=None,
                        help="chunk size C (default: the op's choice for the CPU)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (see keep_freed_memory)")
    cfg = parser.parse_args()
    cfg.tuned_malloc = not cfg.default_malloc and keep_freed_memory()
    cfg.naive_tokens = 8192
    cfg.compare_tokens = 16384 if cfg.quick else 65536
    top = 18 if cfg.quick else 20
    cfg.sweep = [2 ** e for e in range(12, top + 1, 2)]  # 4K, 16K, 64K, 256K (, 1M)
    cfg.repeats = 2 if cfg.quick else 3
    from seqshard.ops.delta_rule.chunk import default_chunk_size

    chunk = cfg.chunk or default_chunk_size(torch.device("cpu"))
    print(f"delta rule benchmarks: torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"chunk {chunk}{'' if cfg.chunk else ' (default)'}, fp32, "
          f"freed memory kept: {cfg.tuned_malloc} ({load()})")

    if "1" in cfg.sections:
        chunk_vs_naive(cfg)
    if "2" not in cfg.sections and "3" not in cfg.sections:
        return
    if "2" not in cfg.sections:
        cfg.compare_tokens = 4096  # the ranks still run it; not reported
    if "3" not in cfg.sections:
        cfg.sweep = []
    single = {t: single_process_baseline(cfg, t) for t in (2, 1)} if "2" in cfg.sections else {}
    ranks = two_ranks(cfg)
    if "2" in cfg.sections:
        report_compare(cfg, single, ranks)
    if "3" in cfg.sections:
        report_sweep(cfg, ranks)


def report_compare(cfg, single, ranks) -> None:
    n = cfg.compare_tokens
    print(f"\n[2] sharded on 2 ranks (1 thread each) vs chunked on 1 process, "
          f"forward+backward, B=1 H={cfg.heads} D={cfg.dim} N={n} ({load()})")
    for t, (wall, cpu) in single.items():
        print(f"    one process, {t} thread{'s' if t > 1 else ' '}: wall {wall * 1e3:8.1f} ms"
              f"   CPU {cpu * 1e3:8.1f} ms")
    for schedule, (wall, cpu) in ranks["compare"].items():
        print(f"    2 ranks, {schedule:4s}:        wall {wall * 1e3:8.1f} ms   CPU {cpu * 1e3:8.1f} ms"
              f" (slowest rank)")
        print(f"        wall ratio sharded / one process: {wall / single[2][0]:5.2f} (2 threads), "
              f"{wall / single[1][0]:5.2f} (1 thread);  CPU per rank / one thread's CPU: "
              f"{cpu / single[1][1]:5.2f} (0.50 = work split evenly, no overhead)")


def report_sweep(cfg, ranks) -> None:
    print(f"\n[3] forward+backward on 2 ranks, scan schedule, B=1 H={cfg.heads} D={cfg.dim} "
          f"({load()})")
    print("    tokens    wall (s)   tokens/s    CPU (s)   peak RSS per rank (MiB)")
    times = {}
    for n, (wall, cpu), rss in ranks["sweep"]:
        times[n] = (wall, cpu)
        print(f"    {n:8d} {wall:10.3f} {n / wall:10.0f} {cpu:10.3f} {rss:12.0f}")
    big = max(times)
    base = big // 16
    if base in times:
        print(f"    time({big // 1024}K) / time({base // 1024}K) = wall "
              f"{times[big][0] / times[base][0]:.1f}, CPU {times[big][1] / times[base][1]:.1f}"
              f"  (16.0 = linear)")


if __name__ == "__main__":
    main()
