"""`seqshard generate`: the worker side (any prompt length, exact against the unsharded
model's `generate` on one process) on 2 and 4 gloo ranks, and the driver's refusals, which
need no Ray. The end-to-end run on Ray trains a tiny run first."""

from __future__ import annotations

import pytest
import torch

from seqshard.launch import config
from seqshard.launch.cli import main
from seqshard.launch.generate_cmd import Printer, plan, read_prompt
from seqshard.launch.generate_run import shard_unit
from tests.harness import mesh, run_ranks

TINY = dict(vocab_size=40, dim=16, num_layers=2, num_heads=2, init_std=0.2)
NEW = 5


def _stream_cases(rank, world, cases):
    """Each case (kind, config, N): stream_greedy's tokens on this mesh, streamed and
    returned, against models.generate of the same weights on one process."""
    from seqshard.dist import Mesh
    from seqshard.launch.generate_run import stream_greedy
    from seqshard.models import build_model
    from seqshard.models.generate import generate

    prefixes = []
    for i, (kind, config, n) in enumerate(cases):
        m = mesh()
        torch.manual_seed(i)
        sharded = build_model(kind, config, m)
        single = build_model(kind, dict(config, layout="contiguous"), Mesh.single())
        single.load_state_dict(sharded.state_dict())
        prompt = torch.randint(0, TINY["vocab_size"], (1, n),
                               generator=torch.Generator().manual_seed(i))
        unit = shard_unit(sharded.config.layout, world, getattr(sharded.config, "group_size",
                                                                None))
        prefix = n // unit * unit
        streamed = []
        got = stream_greedy(sharded, prompt, prefix, NEW, n + NEW,
                            lambda j, t: streamed.append(int(t[0])))
        want = generate(single, prompt, Mesh.single(), NEW)
        tag = f"{kind} {config.get('layout')} P={world} N={n} prefix={prefix}"
        assert torch.equal(got, want), f"{tag}: {got.tolist()} != {want.tolist()}"
        assert streamed == got[0].tolist(), f"{tag}: streamed {streamed}"
        prefixes.append(prefix)
    return prefixes


def test_any_prompt_length_matches_unsharded_generate():
    p2 = [("transformer", dict(TINY, layout="zigzag", strategy="ring"), 13),  # tail of 1
          ("transformer", dict(TINY, layout="zigzag", strategy="ring"), 12),  # generate itself
          ("deltanet", dict(TINY, layout="contiguous", chunk_size=4), 7),
          ("fit", dict(TINY, group_size=4, num_latents=2), 12)]  # prefix 8, 4 fed
    assert run_ranks(_stream_cases, 2, p2)[0] == [12, 12, 6, 8]
    p4 = [("transformer", dict(TINY, layout="zigzag", strategy="ring"), 19)]  # prefix 16
    assert run_ranks(_stream_cases, 4, p4)[0] == [16]


JOB = """
[job]
name = "tiny"
task = "train"
[mesh]
workers = 2
collective_timeout_s = 300
[launch]
progress = false
poll_s = 0.2
[model]
kind = "{kind}"
dim = 16
num_heads = 2
vocab_size = {vocab}
{extra}
[train]
steps = 1
seq_len = 32
layout = "{layout}"
vocab_size = {vocab}
"""


def _cfg(tmp_path, kind="transformer", vocab=256, layout="zigzag", extra=""):
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(kind=kind, vocab=vocab, layout=layout, extra=extra))
    cfg = config.load(path)
    cfg.job.out = str(tmp_path / "run")
    return path, cfg


def test_prompt_formats_and_their_refusals(tmp_path):
    text = tmp_path / "p.txt"
    text.write_bytes("hé 1".encode())
    assert read_prompt(str(text), "auto", 256) == [104, 195, 169, 32, 49]
    ids = tmp_path / "ids.txt"
    ids.write_text("3 17\n5\t0\n")
    assert read_prompt(str(ids), "auto", 40) == [3, 17, 5, 0]
    assert read_prompt(str(ids), "bytes", 256)[:2] == [ord("3"), ord(" ")]
    with pytest.raises(ValueError, match="'hé' is not a token id"):
        read_prompt(str(text), "ids", 300)
    with pytest.raises(ValueError, match="token 17 is outside .* vocabulary \\[0, 10\\)"):
        read_prompt(str(ids), "ids", 10)
    with pytest.raises(ValueError, match="token 195 is outside"):
        read_prompt(str(text), "bytes", 128)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty: nothing to generate"):
        read_prompt(str(tmp_path / "empty"), "bytes", 256)
    with pytest.raises(ValueError, match="missing"):
        read_prompt(str(tmp_path / "missing"), "bytes", 256)


def test_plan_shards_the_longest_even_prefix_and_refuses_bad_lengths(tmp_path):
    _, cfg = _cfg(tmp_path)  # zigzag on 2 ranks: multiples of 4
    spec = plan(cfg, list(range(10)), 3, None)
    assert (spec["prefix"], spec["max_len"], spec["max_new_tokens"]) == (8, 32, 3)
    assert plan(cfg, list(range(30)), 2, None)["prefix"] == 28
    with pytest.raises(ValueError, match="more than the maximum 32 .*train.seq_len"):
        plan(cfg, list(range(30)), 3, None)
    assert plan(cfg, list(range(30)), 3, 64)["max_len"] == 64  # --max-len raises it
    with pytest.raises(ValueError, match="needs at least 4"):
        plan(cfg, [1, 2, 3], 1, None)
    with pytest.raises(ValueError, match="--max-new-tokens 0"):
        plan(cfg, [1, 2, 3, 4], 0, None)
    _, fit = _cfg(tmp_path, kind="fit", layout="contiguous", extra="group_size = 4")
    assert plan(fit, list(range(13)), 1, None)["prefix"] == 8  # 2 ranks x whole groups


def test_missing_checkpoint_is_refused_before_ray(tmp_path, capsys):
    path, _ = _cfg(tmp_path)
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    rc = main(["generate", str(path), "--out", str(tmp_path / "run"), "--prompt-file",
               str(prompt), "--max-new-tokens", "2"])
    assert rc == 2
    assert "has no intact checkpoint" in capsys.readouterr().err


def test_printer_decodes_bytes_across_tokens():
    import io

    out = io.StringIO()
    printer = Printer(as_text=True, stream=out)
    for i, b in enumerate("é!".encode()):  # a two-byte character arrives in two records
        printer({"type": "token", "index": i, "id": b})
    printer({"type": "event"})
    printer.end()
    assert out.getvalue() == "é!\n" and printer.ids == [195, 169, 33]


def _trained_weights(step_dir):
    """The model's state dict from a DeepSpeed checkpoint folder, tensors only."""
    from seqshard.models.safe_load import deepspeed_globals, load_weights_only

    (tag,) = [p for p in step_dir.iterdir() if p.is_dir()]
    states = load_weights_only(tag / "mp_rank_00_model_states.pt", allowed=deepspeed_globals())
    return states["module"]


def test_generate_streams_the_tokens_of_generate_on_one_process(tmp_path, capsys):
    """A tiny run trained on Ray, then `seqshard generate` on its 2-rank mesh: the streamed text
    is the greedy continuation that models.generate gives on one process, from its weights."""
    ray = pytest.importorskip("ray")
    from seqshard.dist import Mesh
    from seqshard.launch.ray_launcher import launch
    from seqshard.models import build_model
    from seqshard.models.generate import generate

    job, cfg = _cfg(tmp_path, extra="num_layers = 1\ninit_std = 0.2")
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"hello, world!")  # 13 bytes: a prefix of 12 on 2 zigzag ranks + 1
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert launch(cfg)["status"] == "completed"
        capsys.readouterr()
        rc = main(["generate", str(job), "--out", str(tmp_path / "run"), "--prompt-file",
                   str(prompt), "--max-new-tokens", "6"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        too_long = main(["generate", str(job), "--out", str(tmp_path / "run"), "--prompt-file",
                         str(prompt), "--max-new-tokens", "20"])  # 13 + 20 > seq_len 32
        assert too_long == 2 and "more than the maximum 32" in capsys.readouterr().err
    finally:
        ray.shutdown()
    single = build_model("transformer", dict(dim=16, num_layers=1, num_heads=2, vocab_size=256,
                                             layout="contiguous"), Mesh.single())
    single.load_state_dict(_trained_weights(tmp_path / "run" / "checkpoints" / "step-00000001"))
    ids = torch.tensor([list(b"hello, world!")])
    want = generate(single, ids, Mesh.single(), 6)[0].tolist()
    assert out == bytes(want).decode("utf-8", errors="replace") + "\n"
    assert "at step 1 after a 13-token prompt" in err and "output in" in err
