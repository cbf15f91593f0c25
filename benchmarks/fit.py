"""FIT vs full attention on 2 ranks: fwd+bwd time and peak memory against sequence length N.

    python benchmarks/fit.py --quick     # N = 4K .. 64K, full attention up to 16K (~1-2 min)
    python benchmarks/fit.py             # N = 8K .. 1M (2^20), full attention while it fits

Both models run on 2 gloo ranks (seqshard.dist.RankPool, 1 thread each, contiguous layout, batch 1)
with the same width, heads and MLP. FIT: `depth` blocks of 1 local + 1 global layer, m latents
per group and the cost-balancing group size n = 2^round(log2((N m^2)^(1/3))), so the work
grows as N^(4/3). Full attention: `depth` pre-norm transformer layers whose attention is the
exact ring attention of seqshard.ops.attention over the whole sequence (its N^2 term is what
FIT avoids); it stops once a step would exceed --full-cap seconds.
Time: the slower rank's fwd+bwd wall time, best of the repetitions (the machine may be shared;
the 1-minute load average is printed and a point whose repetitions disagree by > 30 % is run
again); also each rank's CPU time for the step (time.process_time, max over ranks), which
other jobs on a shared machine disturb much less than wall time. Memory: the rise of each
rank's peak resident set over its resident set before the step (seqshard.dist.memory's
PeakWindow), max over ranks. Exponents: least-squares fits of log time against log N.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path

# big tensors are mmapped and given back when freed, so the resident set follows live tensors
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from seqshard.dist import Mesh, RankFailure, RankPool  # noqa: E402
from seqshard.dist.memory import PeakWindow  # noqa: E402
from seqshard.ops.attention import sharded_attention  # noqa: E402
from seqshard.ops.fit import FIT  # noqa: E402
from seqshard.ops.fit.layers import MLP  # noqa: E402

WORLD = 2
COLLECTIVE_TIMEOUT_S = 1800  # the longest collective wait (a full-attention step at 1M tokens)


class FullLayer(nn.Module):
    """Pre-norm transformer layer whose attention spans the whole sharded sequence (ring)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, causal: bool):
        super().__init__()
        self.num_heads, self.causal = num_heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, m) -> torch.Tensor:
        b, n_local, dim = x.shape
        qkv = self.qkv(self.norm1(x)).unflatten(-1, (3, self.num_heads, -1))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, N_local, d]
        o = sharded_attention(q, k, v, m, causal=self.causal, strategy="ring")
        x = x + self.out(o.transpose(1, 2).reshape(b, n_local, dim))
        return x + self.mlp(self.norm2(x))


class FullStack(nn.Module):
    def __init__(self, depth: int, **kw):
        super().__init__()
        self.layers = nn.ModuleList(FullLayer(**kw) for _ in range(depth))

    def forward(self, x: torch.Tensor, m) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, m)
        return x


def group_size_for(n_tokens: int, num_latents: int) -> int:
    """The power of two nearest (N m^2)^(1/3), where local and global costs balance."""
    return 2 ** round(math.log2((n_tokens * num_latents**2) ** (1 / 3)))


def _step_rank(rank: int, world: int, kind: str, n_tokens: int, cfg: dict, reps: int) -> dict:
    """On every rank: build the model, run fwd+bwd `reps` times; best/median time, peak rise."""
    m = Mesh.new(timeout_s=COLLECTIVE_TIMEOUT_S)
    torch.manual_seed(0)
    kw = dict(dim=cfg["dim"], num_heads=cfg["heads"], mlp_ratio=cfg["mlp_ratio"],
              causal=cfg["causal"])
    if kind == "fit":
        model = FIT(group_size=group_size_for(n_tokens, cfg["latents"]),
                    num_latents=cfg["latents"], depth=cfg["depth"], **kw)
    else:
        model = FullStack(cfg["depth"], **kw)
    x = torch.randn(1, n_tokens // world, cfg["dim"])
    times, cpus, peak = [], [], 0
    for _ in range(reps):
        gc.collect()
        dist.barrier(group=m.group)
        with PeakWindow() as window:
            t0, c0 = time.perf_counter(), time.process_time()
            xr = x.clone().requires_grad_()
            model(xr, m).sum().backward()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        peak = max(peak, window.rise)
        del xr
        model.zero_grad(set_to_none=True)
        if times[-1] > cfg["long_step"]:
            break  # one long step is already a stable measurement
    times.sort()
    return {"best": times[0], "median": times[len(times) // 2], "cpu": min(cpus), "peak": peak}


class Ranks:
    """WORLD one-thread gloo ranks (seqshard.dist.RankPool). A run that fails or stalls
    raises, and the next one starts on a fresh group: the old one may be wedged."""

    def __init__(self):
        self.pool = RankPool(WORLD, threads=1, timeout_s=COLLECTIVE_TIMEOUT_S)

    def run(self, fn, *args) -> list:
        try:
            return self.pool.run(fn, args, timeout_s=COLLECTIVE_TIMEOUT_S)
        except (RankFailure, TimeoutError):
            self.pool.close()
            self.pool = RankPool(WORLD, threads=1, timeout_s=COLLECTIVE_TIMEOUT_S)
            raise

    def close(self) -> None:
        self.pool.close()


def measure(ranks: Ranks, kind: str, n_tokens: int, cfg: dict, reps: int) -> dict:
    """Run one point on WORLD ranks; re-run once when its repetitions disagree (noisy machine)."""
    for attempt in range(2):
        load = os.getloadavg()[0]
        try:
            per_rank = ranks.run(_step_rank, kind, n_tokens, cfg, reps)
        except (RankFailure, TimeoutError) as err:  # a rank died or stalled
            if attempt:
                raise
            print(f"# {kind} N={n_tokens}: rank failure, running it again: {str(err)[-300:]}")
            continue
        best = max(r["best"] for r in per_rank)
        median = max(r["median"] for r in per_rank)
        point = {"best": best, "median": median, "cpu": max(r["cpu"] for r in per_rank),
                 "peak": max(r["peak"] for r in per_rank),
                 "load": load, "noisy": median > 1.3 * best}
        if not point["noisy"]:
            break
    return point


def fit_exponent(ns: list[int], ts: list[float]) -> float:
    """Least-squares slope of log t against log N."""
    xs, ys = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def print_row(row: dict) -> None:
    f, u = row["fit"], row.get("full")
    mib = 2**20
    cells = (f"{u['best']:9.3f} {u['cpu']:7.3f} {u['peak'] / mib:6.0f} | {u['best'] / f['best']:13.2f} "
             f"{u['cpu'] / f['cpu']:6.2f} {u['peak'] / max(f['peak'], 1):5.2f}"
             if u else f"{'-':>9} {'-':>7} {'-':>6} | {'-':>13} {'-':>6} {'-':>5}")
    flag = " noisy" if f["noisy"] or (u and u["noisy"]) else ""
    print(f"{row['N']:>8} {row['group_size']:>4} {row['latents']:>6} | {f['best']:8.3f} "
          f"{f['cpu']:7.3f} {f['peak'] / mib:7.0f} | {cells} | {f['load']:4.1f}{flag}", flush=True)


def print_exponent(rows: list[dict], kind: str, key: str) -> None:
    """Fitted exponent over all points and over the upper half (where N^(4/3) terms show)."""
    if len(rows) < 2:
        return
    what = "wall" if key == "best" else "cpu"
    ns, ts = [r["N"] for r in rows], [r[kind][key] for r in rows]
    text = f"{kind} {what} time ~ N^{fit_exponent(ns, ts):.2f} over N = {ns[0]}..{ns[-1]}"
    if len(rows) >= 4:
        half = len(rows) // 2
        text += f"; N^{fit_exponent(ns[half:], ts[half:]):.2f} over N >= {ns[half]}"
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sweep (~1-2 minutes)")
    ap.add_argument("--min-log2n", type=int, default=None)
    ap.add_argument("--max-log2n", type=int, default=None)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--latents", type=int, default=4, help="m, latents per group")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--bidirectional", action="store_true", help="default: causal")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--full-cap", type=float, default=None, help="seconds; stop full attention")
    ap.add_argument("--json", type=Path, default=None, help="write the points here")
    args = ap.parse_args()
    lo = args.min_log2n or (12 if args.quick else 13)
    hi = args.max_log2n or (16 if args.quick else 20)
    full_cap = args.full_cap or (4.0 if args.quick else 100.0)
    cfg = dict(dim=args.dim, heads=args.heads, latents=args.latents, depth=args.depth,
               mlp_ratio=4, causal=not args.bidirectional, long_step=10.0)
    print(f"# FIT vs ring full attention, {WORLD} ranks x 1 thread, {cfg}, "
          f"cpus={os.cpu_count()}, torch {torch.__version__}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the ranks inherit it: gloo on the CPU
    ranks = Ranks()
    try:
        rows = sweep(ranks, args, cfg, lo, hi, full_cap)
    finally:
        ranks.close()
    for kind, key in (("fit", "best"), ("fit", "cpu"), ("full", "best"), ("full", "cpu")):
        print_exponent([r for r in rows if kind in r], kind, key)
    if args.json:
        args.json.write_text(json.dumps({"config": cfg, "rows": rows}, indent=1))


def sweep(ranks: Ranks, args, cfg: dict, lo: int, hi: int, full_cap: float) -> list[dict]:
    """FIT at every N = 2^lo .. 2^hi, full attention while its predicted step fits full_cap."""
    # warm both code paths (first-call costs) on a small sequence
    measure(ranks, "fit", 2**lo, cfg, 1)
    measure(ranks, "full", 2**lo, cfg, 1)
    print(f"{'N':>8} {'n':>4} {'lat':>6} | {'FIT wall':>8} {'cpu s':>7} {'MiB':>7} | "
          f"{'full wall':>9} {'cpu s':>7} {'MiB':>6} | {'full/FIT wall':>13} {'cpu':>6} "
          f"{'MiB':>5} | load")
    rows, full_next = [], 0.0
    for log2n in range(lo, hi + 1):
        n_tokens = 2**log2n
        n = group_size_for(n_tokens, args.latents)
        row = {"N": n_tokens, "group_size": n, "latents": n_tokens // n * args.latents,
               "fit": measure(ranks, "fit", n_tokens, cfg, args.reps)}
        if full_next <= full_cap:  # full attention ~ N^2: predicted from the last point
            row["full"] = measure(ranks, "full", n_tokens, cfg, args.reps)
            full_next = 4 * row["full"]["best"]
        rows.append(row)
        print_row(row)
    return rows


if __name__ == "__main__":
    main()
