"""One training step (forward, backward, DeepSpeed optimizer step) of each language model at
growing global sequence length N, sharded over 2 gloo ranks on this CPU (or one rank per GPU).

    python benchmarks/models.py                                # all three models, default sizes
    python benchmarks/models.py --models deltanet,fit --sizes 65536,1048576
    python benchmarks/models.py --models transformer --sizes 4096,16384,32768 --budget-s 600
    python benchmarks/models.py --layer --world 1 --sizes 131072 --pieces none,65536,16384
    python benchmarks/models.py --models deltanet --sizes 65536 --mixer-pieces none,16384
    python benchmarks/models.py --models deltanet --world 4 --sizes 262144 --delta-schedule pass

--layer measures one DeltaNet layer alone instead (forward + backward, no checkpointing) for
each --pieces value of its mixer_piece_tokens: seconds, CPU seconds and peak memory per rank above
the inputs, per local token.

Prints per row: seconds of the step (wall, and the most CPU seconds one rank used: on a
shared machine wall time moves with the load, CPU time much less), tokens/s, peak memory per
rank (resident set on CPU, allocated on CUDA), time per token relative to the model's first
row, and the 1-minute load average when the row finished. A model stops growing
N at the first step over --budget-s or that fails (e.g. out of memory). Activation
checkpointing is on, batch 1, random tokens (loss on every token), small width by default
(4 layers x 256).

--mmap-threshold BYTES sets glibc's MALLOC_MMAP_THRESHOLD_ for the rank processes: every
allocation above it is its own mmap, returned to the OS when freed, so the resident set tracks
the live tensors. By default glibc raises its threshold up to 32 MiB and serves the model's
many piece-sized tensors (a few MiB) from its heap, whose fragmentation roughly doubled the
resident set at 128K tokens (FIT: 1953 vs 1033 MiB/rank) and got the 1M step OOM-killed; the
price is page faults on every fresh tensor (that run took 2.3x as long).

--allocator jemalloc runs the ranks on jemalloc (the libjemalloc.so that the ray wheel ships
in ray/core, preloaded with LD_PRELOAD) as `[launch] allocator = "jemalloc"` runs the
launcher's workers (launch/allocator.py): never purging freed pages
(MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:134217728), freed blocks
are reused by size class instead of being mapped fresh, so no page faults after the first
step's growth, and its size classes fragment much less than glibc's heap. Blocks of 128 MiB
and more (whole-shard tensors from 128K tokens per rank at width 256) come from an arena of
their own, so the pieces' blocks of a few MiB never split a freed whole-shard block (at 1M
tokens on 2 ranks that arena cut jemalloc's resident peak from 5719 to 4728 MiB per rank).
glibc leaves the choice between its heap (fast, fragmented) and --mmap-threshold (lean, every fresh tensor
page-faulted and zeroed: up to half of a DeltaNetLM step's CPU time); benchmarks/RESULTS.md
has the three side by side.

Each row runs in fresh rank processes started by torchrun (`torch.distributed.run`), whose
process group and mesh wait --collective-timeout seconds in a collective. It must exceed the
longest time one rank waits for another: with the DeltaNet layer in pieces, a whole layer's
pass over the other rank's shard (minutes at 512K tokens per rank on a loaded CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

DEFAULT_SIZES = {
    "transformer": [4096, 16384, 32768, 65536],
    "deltanet": [16384, 131072, 1048576],
    "fit": [16384, 131072, 1048576],
}


def model_config(kind: str, dim: int, layers: int, heads: int, group_size: int,
                 delta_schedule: str = "scan") -> dict:
    config = {"dim": dim, "num_layers": layers, "num_heads": heads, "vocab_size": 256,
              "mlp_ratio": 2}
    if kind == "deltanet":
        config.update(chunk_size=64, schedule=delta_schedule)
    if kind == "fit":
        config.update(group_size=group_size, num_latents=4)
    return config


def run_ranks(fn, world: int, *args, timeout: float, collective_timeout: float) -> list:
    """fn(rank, world, mesh, *args) on `world` fresh torchrun ranks; the list of their
    JSON-able results by rank. AssertionError naming the failure if a rank fails or the
    whole run takes longer than `timeout` seconds."""
    with tempfile.TemporaryDirectory() as out:
        task = json.dumps({"fn": fn.__name__, "args": args, "out": out,
                           "collective_timeout": collective_timeout})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", os.path.abspath(__file__), "--rank-task", task]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(
            max(1, (os.cpu_count() or 1) // world)))
        launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            launcher.terminate()  # torchrun passes SIGTERM on to its ranks and waits for them
            launcher.communicate(timeout=60)
            raise AssertionError(f"{fn.__name__}: no result within {timeout:.0f} s") from None
        if launcher.returncode != 0:
            errors = [line for line in stderr.splitlines() if "Error" in line]
            raise AssertionError(f"{fn.__name__} failed: {(errors or ['?'])[-1].strip()}\n"
                                 f"{stderr[-3000:]}")
        results = []
        for rank in range(world):
            with open(os.path.join(out, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        return results


def _rank_task(task: str) -> None:
    """Inside one torchrun rank: join the group, run the task, write its result."""
    task = json.loads(task)
    from seqshard.dist import Mesh

    mesh = Mesh.from_env(timeout_s=task["collective_timeout"])
    result = globals()[task["fn"]](mesh.rank, mesh.size, mesh, *task["args"])
    with open(os.path.join(task["out"], f"rank{mesh.rank}.json"), "w") as f:
        json.dump(result, f)


def _one_step(rank, world, mesh, kind: str, config: dict, seq_len: int, steps: int,
              strategy: str, mixer_pieces: str = ""):
    from seqshard.models import Trainer

    train = {"seq_len": seq_len, "steps": steps, "task": "random", "vocab_size": 256,
             "activation_checkpointing": True, "warmup_steps": 0}
    if kind != "fit":
        train["strategy"] = strategy
    if mixer_pieces and kind == "deltanet":  # else the config's default; 0: the whole shard
        config = dict(config, mixer_piece_tokens=0 if mixer_pieces == "none"
                      else int(mixer_pieces))
    trainer = Trainer(kind, config, train, mesh)
    for _ in range(steps):  # report the last step: the first also pays one-time allocations
        cpu = time.process_time()  # every thread of this rank's process
        metrics = trainer.step()
        metrics["cpu_seconds"] = time.process_time() - cpu
    return {k: metrics[k] for k in ("seconds", "cpu_seconds", "peak_mem_bytes")}


def _layer_step(rank, world, mesh, dim: int, heads: int, seq_len: int, mixer_piece_tokens):
    import torch

    from seqshard.dist.memory import PeakWindow
    from seqshard.ops.delta_rule import DeltaNet

    torch.manual_seed(0)
    layer = DeltaNet(dim, heads, chunk_size=64, mixer_piece_tokens=mixer_piece_tokens)
    x = torch.randn(1, seq_len // world, dim, requires_grad=True)  # this rank's shard
    dy = torch.randn(x.shape)
    start, cpu = time.perf_counter(), time.process_time()
    with PeakWindow(mesh.device) as window:  # the rise above the inputs
        layer(x, mesh=mesh).backward(dy)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "peak_mem_bytes": window.rise}


def layer_table(args) -> None:
    print(f"{'mixer pieces':>12}{'N':>10}{'seconds':>10}{'cpu s/rank':>12}"
          f"{'MiB/rank':>10}{'KB/local token':>16}{'load':>7}")
    for seq_len in [int(s) for s in args.sizes.split(",")]:
        for piece in args.pieces.split(","):
            mixer_piece_tokens = None if piece == "none" else int(piece)
            results = run_ranks(_layer_step, args.world, args.dim, args.heads, seq_len,
                                mixer_piece_tokens, timeout=args.budget_s + 120,
                                collective_timeout=args.collective_timeout)
            peak = max(r["peak_mem_bytes"] for r in results)
            print(f"{piece:>12}{seq_len:>10}{max(r['seconds'] for r in results):>10.1f}"
                  f"{max(r['cpu_seconds'] for r in results):>12.1f}{peak / 2**20:>10.0f}"
                  f"{peak / 1024 / (seq_len // args.world):>16.2f}{os.getloadavg()[0]:>7.1f}",
                  flush=True)


def use_jemalloc() -> None:
    """Start the rank processes (they inherit this environment) on the jemalloc that the
    installed ray wheel ships, set up as the launcher's `[launch] allocator = "jemalloc"`."""
    from seqshard.launch.allocator import jemalloc_env

    try:
        os.environ.update(jemalloc_env(os.environ.get("LD_PRELOAD", "")))
    except FileNotFoundError as err:
        raise SystemExit(f"--allocator jemalloc: {err}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="transformer,deltanet,fit")
    parser.add_argument("--sizes", default="", help="comma-separated N (default: per model)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=256, help="FIT tokens per group")
    parser.add_argument("--strategy", default="ring", help="attention strategy")
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="MALLOC_MMAP_THRESHOLD_ for the ranks in bytes (0: glibc default)")
    parser.add_argument("--allocator", default="glibc", choices=("glibc", "jemalloc"),
                        help="the ranks' malloc: glibc's (with --mmap-threshold) or jemalloc "
                             "without purging (ray's bundled libjemalloc.so)")
    parser.add_argument("--layer", action="store_true",
                        help="one DeltaNet layer alone, for each --pieces value")
    parser.add_argument("--pieces", default="none,65536,16384",
                        help="with --layer: comma-separated mixer_piece_tokens ('none': whole shard)")
    parser.add_argument("--collective-timeout", type=float, default=3600.0,
                        help="seconds a rank waits in a collective before failing")
    parser.add_argument("--mixer-pieces", default="",
                        help="comma-separated mixer_piece_tokens for the DeltaNet layers ('none': "
                             "whole shard), each measured at every size (default: theirs)")
    parser.add_argument("--delta-schedule", default="scan", choices=("scan", "pass"),
                        help="DeltaNet's state across ranks at P >= 3 ('scan': maps composed "
                             "on the middle ranks; 'pass': one-way, rank to rank)")
    parser.add_argument("--rank-task", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_task:  # inside a rank started by run_ranks
        return _rank_task(args.rank_task)
    if args.mmap_threshold:  # before the first run_ranks starts the rank processes
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    if args.allocator == "jemalloc":
        use_jemalloc()
    if args.layer:
        return layer_table(args)

    print(f"{'model':<16}{'N':>10}{'seconds':>10}{'cpu s/rank':>12}{'tokens/s':>12}"
          f"{'peak MiB/rank':>15}{'s/token vs first':>18}{'load':>7}")
    for kind in args.models.split(","):
        sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
                 else DEFAULT_SIZES[kind])
        config = model_config(kind, args.dim, args.layers, args.heads, args.group_size,
                              args.delta_schedule)
        first = None
        points = [(n, p) for n in sizes for p in args.mixer_pieces.split(",")]
        for seq_len, pieces in points:
            steps = 2 if seq_len <= 8192 else 1
            label = f"{kind}/{pieces}" if pieces else kind
            try:
                results = run_ranks(_one_step, args.world, kind, config, seq_len, steps,
                                    args.strategy, pieces, timeout=args.budget_s * steps + 120,
                                    collective_timeout=args.collective_timeout)
            except AssertionError as err:  # a rank failed or timed out: stop growing N
                print(f"{label:<16}{seq_len:>10}  failed: {str(err).splitlines()[0][:100]}")
                break
            seconds = max(r["seconds"] for r in results)
            cpu = max(r["cpu_seconds"] for r in results)
            peak = max(r["peak_mem_bytes"] for r in results) / 2**20
            per_token = seconds / seq_len
            first = first or per_token
            print(f"{label:<16}{seq_len:>10}{seconds:>10.2f}{cpu:>12.1f}{seq_len / seconds:>12.0f}"
                  f"{peak:>15.0f}{per_token / first:>18.2f}{os.getloadavg()[0]:>7.1f}",
                  flush=True)
            if seconds > args.budget_s:
                break


if __name__ == "__main__":
    main()
