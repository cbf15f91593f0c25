"""`seqshard sweep`: --over parsing, the cross product, bad keys and values refused before
anything starts, a point that fails only in combination recorded, and one 2-point sweep end to
end on a real embedded Ray whose second point is killed (the sweep goes on, writes sweep.md,
sweep.json and the PNGs, and exits 1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgpack
import pytest

from seqshard.launch import cli, sweep, sweep_report
from seqshard.launch.sweep_plots import _lines, write_plots

REPO = Path(__file__).resolve().parents[1]
VARIANTS = """
[job]
name = "tiny"
[mesh]
workers = 2
[launch]
progress = false
[model]
dim = 24
num_layers = 1
num_heads = 2
vocab_size = 32
[model.transformer]
layout = "zigzag"
strategy = "ulysses"
[model.fit]
group_size = 4
num_latents = 2
[train]
steps = 2
seq_len = 32
task = "recall"
recall_pairs = 4
recall_queries = 4
vocab_size = 32
[sweep]
over = { "train.seq_len" = [32, 64] }
"""

PROBE = """
[job]
name = "probe-sweep"
task = "probe"
[mesh]
workers = 2
[launch]
progress = false
poll_s = 0.2
max_restarts = 0
[fault]
at_step = 1
[train]
steps = 3
seq_len = 24
"""


@pytest.fixture
def variants(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(VARIANTS)
    return path


def test_over_values_parse_as_toml_and_split_at_top_level_commas():
    assert sweep.parse_over("train.seq_len=1024,2048").values == [1024, 2048]
    assert sweep.parse_over(" train.lr = 1e-3 , 3e-3").values == [1e-3, 3e-3]
    assert sweep.parse_over("train.strategy=ring,ulysses").values == ["ring", "ulysses"]
    axis = sweep.parse_over('model.attn_layers=[],[0,1],"a,b"')
    assert axis.key == "model.attn_layers" and axis.values == [[], [0, 1], "a,b"]
    assert sweep.parse_over("model=transformer,fit").values == ["transformer", "fit"]


def test_cross_product_in_order_with_folders_labels_and_merged_model_tables(variants, tmp_path):
    root, points = sweep.plan(variants, ["model=transformer,fit"], ["train.steps=3"],
                              str(tmp_path / "out"))
    assert root == tmp_path / "out"
    # [sweep] axes first, --over axes after: the last axis varies fastest
    assert [p.values for p in points] == [
        {"train.seq_len": 32, "model": "transformer"}, {"train.seq_len": 32, "model": "fit"},
        {"train.seq_len": 64, "model": "transformer"}, {"train.seq_len": 64, "model": "fit"}]
    assert [p.name for p in points] == ["0_seq_len-32_transformer", "1_seq_len-32_fit",
                                        "2_seq_len-64_transformer", "3_seq_len-64_fit"]
    assert [p.label for p in points] == ["transformer ulysses", "fit"] * 2
    assert not any(p.error for p in points)
    t, f = points[2].cfg, points[3].cfg
    # [model] keys, then the variant's, kind from the variant's name; --set in every point
    assert t.model == {"dim": 24, "num_layers": 1, "num_heads": 2, "vocab_size": 32,
                       "layout": "zigzag", "strategy": "ulysses", "kind": "transformer"}
    assert f.model["kind"] == "fit" and f.model["group_size"] == 4 and "layout" not in f.model
    assert t.train["seq_len"] == 64 and t.train["steps"] == f.train["steps"] == 3
    assert t.job.out == str(root / "2_seq_len-64_transformer")
    assert not root.exists()  # planning creates nothing


def test_sweep_over_table_with_dotted_keys_is_the_same_sweep(variants, tmp_path):
    dotted = tmp_path / "dotted.toml"
    dotted.write_text(VARIANTS.replace('[sweep]\nover = { "train.seq_len" = [32, 64] }',
                                       '[sweep.over]\ntrain.seq_len = [32, 64]\n'
                                       'model = ["transformer", "fit"]'))
    _, inline = sweep.plan(variants, ["model=transformer,fit"], [], str(tmp_path / "a"))
    _, nested = sweep.plan(dotted, [], [], str(tmp_path / "a"))
    assert [p.values for p in nested] == [p.values for p in inline]


@pytest.mark.parametrize("over, sets, named", [
    (["train.seq_len"], [], "--over 'train.seq_len': expected KEY=V1,V2"),
    (["train.seq_len=32,,64"], [], "an empty value"),
    (["train.seq_len=32,32"], [], "value(s) 32 listed twice"),
    (["a.b.c=1"], [], "the key must be section.key"),
    (["model=transformer,gpt"], [], "no [model.<name>] table for 'gpt'"),
    (["model=fit", "model=transformer"], [], "--over model given more than once"),
    (["model=fit", "train.bogus=1,2"], [], "unknown config key(s) train.bogus"),
    (["model=fit", "train.steps=2,-1"], [], "--over train.steps=-1:"),
    (["model=fit"], ["train.seq_len=64"], "train.seq_len is swept"),
    ([], [], "sweep them with --over model=transformer,fit"),
])
def test_bad_keys_and_values_are_named_before_anything_starts(variants, tmp_path, over, sets,
                                                              named):
    out = tmp_path / "never"
    with pytest.raises(ValueError) as err:
        sweep.plan(variants, over, sets, str(out))
    assert named in str(err.value)
    assert not out.exists()


def test_shipped_cpu_sweep_plans_three_models_at_five_lengths(tmp_path):
    root, points = sweep.plan(REPO / "launch" / "configs" / "sweep_cpu.toml", [], [],
                              str(tmp_path / "cpu"))
    assert [p.values for p in points[:5]] == [{"model": "transformer", "train.seq_len": 2**k}
                                              for k in range(10, 15)]
    assert [p.label for p in points[::5]] == ["transformer ring", "deltanet", "fit"]
    assert not any(p.error for p in points)
    assert {p.cfg.train["task"] for p in points} == {"data"} and points[0].cfg.data["path"] == ""


def test_cli_reports_a_bad_value_with_status_2(variants, tmp_path, capsys):
    code = cli.main(["sweep", str(variants), "--over", "model=fit,transformer",
                     "--over", "train.lr=abc", "--out", str(tmp_path / "never")])
    assert code == 2
    assert "config key train.lr = 'abc': expected float" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_point_failing_only_in_combination_is_recorded_not_raised(variants, tmp_path):
    # 3 heads do not split over Ulysses' 2 ranks (the transformer variant), but FIT has no
    # sharded attention: only that one point is invalid, both values and models run elsewhere
    _, points = sweep.plan(variants, ["model=transformer,fit", "model.num_heads=2,3"],
                           ["model.dim=48"], str(tmp_path / "out"))
    bad = [p for p in points if p.error]
    assert [p.values for p in bad] == [
        {"train.seq_len": s, "model": "transformer", "model.num_heads": 3} for s in (32, 64)]
    assert all("num_heads = 3 is not divisible by the Ulysses degree 2" in p.error for p in bad)
    assert [p.label for p in points if p.values["train.seq_len"] == 32] == [
        "transformer model.num_heads=2 ulysses", "transformer model.num_heads=3",
        "fit model.num_heads=2",
        "fit model.num_heads=3"]


def test_run_numbers_from_records_latest_attempts_and_heldout_buckets(tmp_path):
    def step(n, loss, seconds, attempt=0):
        return {"type": "step", "step": n, "loss": loss, "tokens": 100, "seconds": seconds,
                "peak_mem_bytes": n * 2**20, "attempt": attempt}

    def bucket(length, i, loss, tokens):
        return {"type": "eval", "metric": "loss_by_position", "length": length, "bucket": i,
                "loss": loss, "tokens": tokens}

    records = [{"type": "meta"}] + [step(n, 9.0, 1.0) for n in range(1, 12)]
    records += [step(11, 4.0, 1.0, attempt=1), step(12, 2.0, 3.0, attempt=1)]  # after a restart
    records += [bucket(64, 0, 9.0, 4), bucket(64, 1, 3.0, 4),  # an earlier evaluation
                bucket(64, 0, 1.0, 1), bucket(64, 1, 3.0, 3), bucket(128, 0, 0.5, 100)]
    (tmp_path / "records.msgpack").write_bytes(b"".join(msgpack.packb(r) for r in records))
    got = sweep_report.run_numbers(tmp_path)
    assert got["steps"] == 12 and got["peak_mem_bytes"] == 12 * 2**20
    assert got["final_loss"] == 3.0  # mean of steps 11 and 12 (the last tenth, rounded up)
    assert got["tokens_per_s"] == 1100 / 13.0  # steps 2..12: step 1 pays the warm-up
    assert got["heldout_loss"] == (1.0 * 1 + 3.0 * 3) / 4  # the shortest length, token-weighted
    empty = sweep_report.run_numbers(tmp_path / "never-ran")
    assert empty["steps"] == 0 and math.isnan(empty["final_loss"])


def test_plots_draw_one_line_per_label_over_completed_points(tmp_path):
    rows = [{"name": f"p{i}", "label": label, "seq_len": n, "status": status,
             "final_loss": loss, "tokens_per_s": 100.0, "peak_mem_bytes": 2**20}
            for i, (label, n, status, loss) in enumerate([
                ("a", 2048, "completed", 2.0), ("a", 1024, "completed", 3.0),
                ("b", 1024, "completed", 1.0), ("b", 2048, "failed", math.nan)])]
    assert _lines(rows, "final_loss", 1.0) == {"a": ([1024, 2048], [3.0, 2.0]),
                                               "b": ([1024], [1.0])}
    names = write_plots(tmp_path, rows, "t")  # no point evaluated: no held-out plot
    assert names == ["sweep.png", "sweep_loss.png", "sweep_tokens_per_s.png",
                     "sweep_peak_mem.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows[0]["heldout_loss"] = 2.5
    assert "sweep_heldout_loss.png" in write_plots(tmp_path, rows, "t")


def test_two_point_sweep_on_ray_records_a_killed_point_and_goes_on(tmp_path, capsys):
    pytest.importorskip("ray")
    config = tmp_path / "probe.toml"
    config.write_text(PROBE)
    out = tmp_path / "sweep"
    # fault.rank = 1 SIGKILLs rank 1 after step 1 with no restart left; -1 is no fault
    code = cli.main(["sweep", str(config), "--over", "fault.rank=1,-1", "--out", str(out)])
    assert code == 1  # a point failed
    data = json.loads((out / "sweep.json").read_text())
    first, second = data["points"]
    assert (first["name"], first["status"]) == ("0_rank-1", "failed")
    assert "worker process died" in first["error"] and "gave up after 0 restart(s)" in first["error"]
    assert (second["name"], second["status"], second["error"]) == ("1_rank--1", "completed", "")
    assert second["steps"] == 3 and second["final_loss"] > 0 and second["tokens_per_s"] > 0
    assert second["seq_len"] == 24 and second["label"] == "probe fault.rank=-1"
    assert (out / "1_rank--1" / "summary.md").exists()  # each point has its own run folder
    table = (out / "sweep.md").read_text()
    assert "| 0_rank-1 | 24 | probe fault.rank=1 | failed |" in table
    assert "| 1_rank--1 | 24 | probe fault.rank=-1 | completed |" in table
    assert "## Errors" in table and "worker process died" in table
    for name in ("sweep.png", "sweep_loss.png", "sweep_tokens_per_s.png", "sweep_peak_mem.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "seqshard sweep: output in" in capsys.readouterr().out
