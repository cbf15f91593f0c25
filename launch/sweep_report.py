"""What a sweep reports: each point's numbers from its run folder, sweep.md and sweep.json.

Per point, from its records.msgpack (the latest attempt of each step, over every driver start,
so a resumed point counts the steps it ran before):

    final_loss      mean training loss over the last tenth of the steps (at least one step):
                    one step's loss is one batch's, too noisy to compare lengths by
    tokens_per_s    tokens / seconds inside step(), steps 2.. when there are two or more
                    (step 1 pays one-time warm-up: allocator, DeepSpeed's first step)
    peak_mem_bytes  the largest peak memory rank 0 reported (step records come from rank 0;
                    every rank holds an equal shard of the sequence)
    heldout_loss    with [eval] at_end: the mean next-token loss over held-out tokens at the
                    shortest evaluated length (loss_by_position records, weighted by their
                    token counts); the number to compare lengths by. NaN without it
    wall_s          the point's launch as the sweep timed it: placing workers, starting them,
                    training, checkpoints, the exactness check, the evaluation
    started, finished   its launch's start and end (local clock; start_s / end_s: epoch
                    seconds in sweep.json), which show the points that ran side by side
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

from .records import RECORDS, read_records

TABLE = "sweep.md"
DATA = "sweep.json"


def run_numbers(out_dir: Path) -> dict:
    """final_loss, tokens_per_s, peak_mem_bytes and steps of one run folder (NaN / 0 where it
    recorded no step)."""
    path = Path(out_dir) / RECORDS
    steps: dict[int, dict] = {}
    buckets: dict[tuple, dict] = {}
    if path.exists():
        for record in read_records(path):
            if record.get("type") == "step":
                steps[int(record["step"])] = record  # a later attempt replaces an earlier one
            elif record.get("type") == "eval" and record.get("metric") == "loss_by_position":
                buckets[(record["length"], record["bucket"])] = record  # the latest evaluation
    recs = [steps[s] for s in sorted(steps)]
    heldout = _heldout_loss(list(buckets.values()))
    if not recs:
        return {"steps": 0, "final_loss": math.nan, "tokens_per_s": math.nan, "peak_mem_bytes": 0,
                "heldout_loss": heldout}
    tail = recs[-max(1, math.ceil(len(recs) / 10)):]
    timed = recs[1:] if len(recs) > 1 else recs
    seconds = sum(r["seconds"] for r in timed)
    return {"steps": recs[-1]["step"],
            "final_loss": sum(float(r["loss"]) for r in tail) / len(tail),
            "tokens_per_s": sum(r["tokens"] for r in timed) / seconds if seconds > 0 else math.nan,
            "peak_mem_bytes": max(int(r.get("peak_mem_bytes") or 0) for r in recs),
            "heldout_loss": heldout}


def _heldout_loss(buckets: list[dict]) -> float:
    """Token-weighted mean loss of the loss-by-position buckets at the shortest length."""
    if not buckets:
        return math.nan
    shortest = min(b["length"] for b in buckets)
    counted = [b for b in buckets if b["length"] == shortest and b.get("tokens")]
    tokens = sum(b["tokens"] for b in counted)
    return sum(b["loss"] * b["tokens"] for b in counted) / tokens if tokens else math.nan


def machine() -> str:
    """Host, cores and the 1/5/15-minute load: the machine may be shared."""
    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{platform.node()}, {os.cpu_count()} cores, load {load}"


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def rows(points) -> list[dict]:
    """One plain dict per point (what sweep.json holds and the plots read)."""
    out = []
    for p in points:
        seq_len = (p.cfg.train.get("seq_len") if p.cfg else None) or p.values.get("train.seq_len")
        out.append({"index": p.index, "name": p.name, "values": p.values, "label": p.label,
                    "seq_len": seq_len, "out": p.cfg.job.out if p.cfg else "",
                    "status": "invalid" if p.error else "pending", "error": p.error,
                    **p.result})
    return out


def write(root: Path, points, header: dict, plots: list[str] = ()) -> Path:
    """Write sweep.md and sweep.json in `root`; the table's path."""
    table = rows(points)
    (root / DATA).write_text(json.dumps({**header, "points": table}, indent=1, default=str))
    lines = [f"# seqshard sweep: {root.name}", "",
             f"- command: `{header.get('command') or '(from Python)'}`",
             f"- started {header['started']}, machine {header['machine']}",
             *([f"- parallel = {header['parallel']}"] if header.get("parallel") else []),
             f"- finished {header.get('finished', '(running)')}"
             + (f", machine {header['machine_end']}" if header.get("machine_end") else ""),
             f"- points: {len(table)}; " + ", ".join(
                 f"{sum(r['status'] == s for r in table)} {s}"
                 for s in ("completed", "failed", "invalid", "interrupted", "running", "pending")
                 if any(r["status"] == s for r in table)),
             "- final loss: mean training loss over the last tenth of the steps; held-out loss: "
             "[eval] at_end's loss by position at N, over all positions; tokens/s inside step(), "
             "steps 2..; peak memory: rank 0's (equal shards on every rank)", "",
             "| point | N | line | status | final loss | held-out loss | tokens/s | peak mem/rank "
             "| started | finished | wall | run folder |",
             "|---|---:|---|---|---:|---:|---:|---:|---|---|---:|---|"]
    for r in table:
        mem = r.get("peak_mem_bytes")
        lines.append(
            f"| {r['name']} | {r['seq_len'] or '-'} | {r['label'] or '-'} | {r['status']} | "
            f"{_num(r.get('final_loss'), '.4f')} | {_num(r.get('heldout_loss'), '.4f')} | "
            f"{_num(r.get('tokens_per_s'), ',.0f')} | "
            f"{_num(mem / 2**20, ',.0f') + ' MiB' if mem else '-'} | "
            f"{r.get('started') or '-'} | {r.get('finished') or '-'} | "
            f"{_num(r.get('wall_s'), '.1f') + ' s' if r.get('wall_s') else '-'} | "
            f"{os.path.relpath(r['out'], root) if r['out'] else '-'} |")
    failed = [r for r in table if r["error"]]
    if failed:
        lines += ["", "## Errors", ""]
        lines += [f"- {r['name']} ({r['status']}): {r['error']}" for r in failed]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    (root / TABLE).write_text("\n".join(lines) + "\n")
    return root / TABLE


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
