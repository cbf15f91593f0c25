"""Sharded inference of seqshard's three LMs on P gloo ranks of this CPU: time to first token
(the prefill) against prompt length N, decode tokens/s at context N, cache memory per rank,
and the prefill against the forward of a training step at the same N.

    python benchmarks/inference.py                                  # 3 models, P = 1, 2, 4
    python benchmarks/inference.py --models deltanet,fit --worlds 2 --sizes 1048576 --reps 1
    python benchmarks/inference.py --largest --worlds 2 --budget-s 120  # largest prompt
    python benchmarks/inference.py --out inference.md               # the table to a file too

Each point builds the model on every rank (same seed, so the same weights), shards a random
prompt [1, N] by the model's layout and, per repeat:
- forward: the training step's forward as the Trainer runs it (activation checkpointing on,
  grad enabled, the loss through the head in pieces), no backward;
- prefill: `models.generate.prefill` (no grad), the time to the first token's logits;
- decode: --decode-tokens `decode_step` calls after it, each at the next position (tokens/s
  at a context of about N).
Times are the slowest rank's, the best of --reps repeats (the machine is shared: every row
also records the most CPU seconds one rank spent in the prefill and the 1-minute load).
"cache MiB" is `ModelCache.memory_bytes()` on the rank holding the most (preallocated room for
the decoded tokens included); "peak MiB" is the most any rank's resident set rose during
prefill + decode above what it held before (the weights and the prompt), so it counts the
prefill's transient activations too. Each rank runs one torch thread (one rank = one core)
and allocations >= 64 KiB are their own mmaps, so the resident set tracks live tensors.

--largest grows N by doubling from the first --sizes value for each model and world until a
prefill takes longer than --budget-s or fails (e.g. out of memory), and reports the largest
that fitted (no training forward, one repeat). Rows go to stdout as a markdown table (and to
--out), ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time

from seqshard.dist import RankPool
from seqshard.launch.perf.runner import THREADS_PER_RANK, _pin_malloc

COLLECTIVE_TIMEOUT_S = 3600.0  # one rank may wait a whole long prefill layer for another
DEFAULT_SIZES = "4096,16384"


def model_config(kind: str, dim: int, layers: int, heads: int, group_size: int) -> dict:
    """The benchmark's model: benchmarks/models.py's widths, vocab 256 (bytes)."""
    config = {"dim": dim, "num_layers": layers, "num_heads": heads, "vocab_size": 256,
              "mlp_ratio": 2}
    if kind == "transformer":
        config.update(layout="zigzag", strategy="ring")  # the balanced causal layout
    if kind == "deltanet":
        config["chunk_size"] = 64
    if kind == "fit":
        config.update(group_size=group_size, num_latents=4)
    return config


def _point(rank, world, kind: str, config: dict, seq_len: int, decode_tokens: int, reps: int,
           forward: bool) -> list[dict]:
    """On every rank: per repeat, this rank's seconds of the training forward, the prefill
    and the decode, the prefill's CPU seconds, its cache bytes and its resident-set rise."""
    import torch
    import torch.distributed as dist

    from seqshard.dist import Mesh, get_layout
    from seqshard.dist.memory import PeakWindow
    from seqshard.models import build_model, next_token_targets
    from seqshard.models.generate import decode_step, prefill

    mesh = Mesh.new(timeout_s=COLLECTIVE_TIMEOUT_S)
    torch.manual_seed(0)
    model = build_model(kind, config, mesh).eval()
    layout = config.get("layout", "contiguous")
    ids = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(0))
    ids_local = get_layout(layout).shard(ids, 1, mesh.rank, mesh.size)  # [1, N_local]
    del ids
    trainer_model = None
    if forward:  # the same weights, built as the Trainer builds it
        trainer_model = build_model(kind, dict(config, activation_checkpointing=True), mesh)
        trainer_model.load_state_dict(model.state_dict())
        targets = next_token_targets(ids_local, mesh, layout=layout)  # [1, N_local]
    # warm-up on a prefix of the shard (a valid shorter prompt): first-call costs (attention
    # plans, buffers, lazy imports) stay out of the timed repeats
    warm = ids_local[:, :min(ids_local.shape[1], config.get("group_size", 512))]
    prefill(model, warm, warm.shape[1] * mesh.size + 1)
    if trainer_model is not None:
        trainer_model(warm, next_token_targets(warm, mesh, layout=layout))
    rows = []
    for _ in range(reps):
        row = {"forward_s": None, "forward_cpu_s": None}
        if trainer_model is not None:
            dist.barrier(group=mesh.group)
            start, cpu = time.perf_counter(), time.process_time()
            loss, _ = trainer_model(ids_local, targets)
            row["forward_s"] = time.perf_counter() - start
            row["forward_cpu_s"] = time.process_time() - cpu
            del loss
        dist.barrier(group=mesh.group)
        with PeakWindow(mesh.device) as window:
            start, cpu = time.perf_counter(), time.process_time()
            cache, logits = prefill(model, ids_local, seq_len + decode_tokens)
            row["prefill_s"] = time.perf_counter() - start
            row["prefill_cpu_s"] = time.process_time() - cpu
            token = logits.argmax(-1)  # [1]
            dist.barrier(group=mesh.group)
            start = time.perf_counter()
            for _ in range(decode_tokens):
                token = decode_step(model, token, cache).argmax(-1)
            row["decode_s"] = time.perf_counter() - start
        row["cache_bytes"] = cache.memory_bytes()
        row["peak_bytes"] = window.rise
        del cache, logits
        rows.append(row)
    return rows


def _summary(kind: str, world: int, seq_len: int, decode_tokens: int,
             per_rank: list[list[dict]]) -> dict:
    """One table row from every rank's repeats: the slowest rank per repeat, the best repeat."""
    reps = list(zip(*per_rank))  # per repeat: one dict per rank

    def slowest(key):
        return [max(r[key] for r in rep) for rep in reps]

    forward = slowest("forward_s") if reps[0][0]["forward_s"] is not None else None
    prefill = min(slowest("prefill_s"))
    return {"model": kind, "P": world, "N": seq_len, "prefill_s": prefill,
            "prefill_cpu_s": min(slowest("prefill_cpu_s")),
            "forward_s": min(forward) if forward else None,
            "forward_cpu_s": min(slowest("forward_cpu_s")) if forward else None,
            "decode_tok_s": decode_tokens / min(slowest("decode_s")),
            "cache_mib": max(r["cache_bytes"] for rep in reps for r in rep) / 2**20,
            "peak_mib": max(r["peak_bytes"] for rep in reps for r in rep) / 2**20,
            "load": os.getloadavg()[0]}


HEADER = ("| model | P | N | prefill s | prefill CPU s/rank | train fwd s | train fwd CPU s/rank "
          "| prefill / fwd (wall, CPU) | decode tok/s | cache MiB/rank | peak MiB/rank | load |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(row: dict) -> str:
    fwd, fwd_cpu, ratio = "-", "-", "-"
    if row["forward_s"]:
        fwd, fwd_cpu = f"{row['forward_s']:.2f}", f"{row['forward_cpu_s']:.2f}"
        ratio = (f"{row['prefill_s'] / row['forward_s']:.2f}, "
                 f"{row['prefill_cpu_s'] / max(row['forward_cpu_s'], 1e-9):.2f}")
    return (f"| {row['model']} | {row['P']} | {row['N']} | {row['prefill_s']:.2f} "
            f"| {row['prefill_cpu_s']:.2f} | {fwd} | {fwd_cpu} | {ratio} "
            f"| {row['decode_tok_s']:.1f} "
            f"| {row['cache_mib']:.2f} | {row['peak_mib']:.0f} | {row['load']:.1f} |")


class Bench:
    """One RankPool per world size, restarted after a failed point (its group may be wedged)."""

    def __init__(self, args):
        self.args = args
        self.pools: dict[int, RankPool] = {}

    def point(self, kind: str, world: int, seq_len: int, reps: int, forward: bool) -> dict:
        args = self.args
        if world not in self.pools:
            self.pools[world] = RankPool(world, threads=THREADS_PER_RANK, setup=_pin_malloc,
                                         timeout_s=COLLECTIVE_TIMEOUT_S, deepspeed=False)
        config = model_config(kind, args.dim, args.layers, args.heads, args.group_size)
        try:
            per_rank = self.pools[world].run(
                _point, (kind, config, seq_len, args.decode_tokens, reps, forward),
                timeout_s=args.point_timeout_s, fail_fast=True)
        except BaseException:
            self.pools.pop(world).close()
            raise
        return _summary(kind, world, seq_len, args.decode_tokens, per_rank)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="transformer,deltanet,fit")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated rank counts P")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated prompt lengths N")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=256, help="FIT tokens per group")
    parser.add_argument("--no-forward", action="store_true", help="skip the training forward")
    parser.add_argument("--largest", action="store_true",
                        help="double N per model and world until a prefill passes --budget-s")
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--point-timeout-s", type=float, default=1800.0)
    parser.add_argument("--out", default="", help="also write the markdown table here")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # `kill` (SIGTERM) unwinds through bench.close(), so no rank process outlives the run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    lines = [f"<!-- {' '.join(sys.argv)} | {datetime.datetime.now():%Y-%m-%d %H:%M} | "
             f"{os.cpu_count()} CPUs -->", HEADER]
    print("\n".join(lines), flush=True)
    bench = Bench(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        for kind in args.models.split(","):
            for world in [int(w) for w in args.worlds.split(",")]:
                if args.largest:
                    lines += _largest(bench, kind, world, sizes[0])
                    continue
                for seq_len in sizes:
                    try:
                        row = bench.point(kind, world, seq_len, args.reps, not args.no_forward)
                        line = format_row(row)
                    except Exception as err:  # a failed point is a row, the sweep goes on
                        line = (f"| {kind} | {world} | {seq_len} | failed: "
                                f"{str(err).splitlines()[0][:120]} |")
                    lines.append(line)
                    print(line, flush=True)
    finally:
        bench.close()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def _largest(bench: Bench, kind: str, world: int, seq_len: int) -> list[str]:
    """Rows of the doubling search; the last line says the largest N whose prefill fitted."""
    lines, best = [], None
    while True:
        try:
            row = bench.point(kind, world, seq_len, 1, False)
        except Exception as err:
            lines.append(f"| {kind} | {world} | {seq_len} | failed: "
                         f"{str(err).splitlines()[0][:120]} |")
            print(lines[-1], flush=True)
            break
        lines.append(format_row(row))
        print(lines[-1], flush=True)
        if row["prefill_s"] > bench.args.budget_s:
            break
        best = seq_len
        seq_len *= 2
    lines.append(f"| {kind} | {world} | largest N with prefill <= {bench.args.budget_s:.0f} s: "
                 f"{best} |")
    print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
