"""benchmarks/inference.py on a tiny TransformerLM over 2 gloo ranks: its cache column is the
KV cache's exact size, and a table row comes out of every rank's repeats."""

from __future__ import annotations

from benchmarks.inference import HEADER, _point, _summary, format_row
from tests.harness import run_ranks

CONFIG = dict(vocab_size=256, dim=16, num_layers=2, num_heads=2, layout="zigzag",
              strategy="ring")


def test_point_reports_the_kv_cache_size_and_a_row():
    n, new, world = 64, 4, 2
    per_rank = run_ranks(_point, world, "transformer", CONFIG, n, new, 2, True)
    # per layer and rank: K and V [1, 2 heads, capacity, 8] fp32 + int64 positions, where
    # capacity = the prompt shard + this rank's share of the decoded tokens
    capacity = n // world + -(-new // world)
    want = CONFIG["num_layers"] * (2 * 2 * capacity * 8 * 4 + capacity * 8)
    assert all(rep["cache_bytes"] == want for rank in per_rank for rep in rank)
    assert all(len(rank) == 2 and rank[0]["prefill_s"] > 0 and rank[0]["forward_s"] > 0
               for rank in per_rank)
    row = _summary("transformer", world, n, new, per_rank)
    assert row["cache_mib"] == want / 2**20 and row["decode_tok_s"] > 0
    line = format_row(row)
    assert line.startswith("| transformer | 2 | 64 | ")
    assert line.count("|") == HEADER.splitlines()[0].count("|")
