"""Launcher pieces that need no worker: configs, checkpoints, records, rank assignment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from seqshard.launch import checkpoint as ckpt
from seqshard.launch import config
from seqshard.launch.ray_launcher import assign_ranks
from seqshard.launch.records import Recorder, read_records

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
DEMO = CONFIGS / "demo.toml"


# --- configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    if "[sweep" in path.read_text():  # a sweep file: every point is a job file, checked as one
        from seqshard.launch import sweep

        _, points = sweep.plan(path)
        assert points and not [p.error for p in points if p.error]
        cfgs = [p.cfg for p in points]
    else:
        cfgs = [config.load(path)]
    assert all(cfg.mesh.shape().world_size == cfg.mesh.workers for cfg in cfgs)


PYTHON_310 = """
import sys, tomllib
sys.modules["tomli"] = tomllib  # tomli is the package tomllib came from: the same API
sys.modules["tomllib"] = None  # what Python 3.10 lacks: importing it raises ImportError
from seqshard.launch import config
assert config.tomllib is sys.modules["tomli"]
print(config.load(sys.argv[1], ["train.steps=3"]).train["steps"])
"""


def test_config_loads_without_tomllib_as_on_python_310():
    """Python 3.10 has no tomllib: config falls back to tomli (declared for < 3.11)."""
    done = subprocess.run([sys.executable, "-c", PYTHON_310, str(DEMO)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr[-2000:]


def test_old_piece_tokens_key_names_the_new_keys():
    with pytest.raises(ValueError) as err:
        config.load(DEMO, ["model.piece_tokens=64"])
    said = str(err.value)
    assert "model.piece_tokens (renamed: tokenwise_piece_tokens" in said, said
    assert "mixer_piece_tokens" in said, said
    cfg = config.load(DEMO, ["model.kind=deltanet", "train.layout=contiguous",
                             "model.mixer_piece_tokens=64", "model.tokenwise_piece_tokens=32"])
    assert cfg.model["mixer_piece_tokens"] == 64


def test_demo_config_values_and_overrides():
    cfg = config.load(DEMO, ["train.steps=3", "mesh.ulysses=2", "train.strategy=ulysses",
                             "train.layout=contiguous", "launch.poll_s=1"])
    assert cfg.train["steps"] == 3 and cfg.train["layout"] == "contiguous"
    assert cfg.mesh.shape().ulysses == 2 and cfg.mesh.shape().ring == 1
    assert cfg.launch.poll_s == 1.0 and isinstance(cfg.launch.poll_s, float)
    assert cfg.model["kind"] == "transformer"


@pytest.mark.parametrize("override, names", [
    (["mesh.wrokers=2"], ["mesh.wrokers"]),
    (["train.stepz=2"], ["train.stepz"]),
    (["model.num_hedas=2"], ["model.num_hedas"]),
    (["fault.rnak=1"], ["fault.rnak"]),
    (["fault.mode=explode"], ["fault.mode", "'explode'"]),
    (["launch.max_restarts=two"], ["launch.max_restarts", "'two'"]),
    (["job.task=fly"], ["job.task", "'fly'"]),
    (["model.kind=lstm"], ["model.kind", "'lstm'"]),
    (["mesh.ulysses=3"], ["mesh.workers = 2", "mesh.ulysses = 3"]),
    (["mesh.dp=2", "mesh.ring=2"], ["mesh.dp = 2", "mesh.ring = 2"]),
    (["train.seq_len=130"], ["train.seq_len = 130", "multiple of 4"]),
    (["launch.keep_checkpoints=1"], ["launch.keep_checkpoints = 1"]),
    (["mesh.ulysses=2", "model.num_heads=3", "model.dim=48", "train.strategy=ulysses"],
     ["model.num_heads = 3", "mesh.ulysses = 2"]),
    (["nosuch.key=1"], ["[nosuch]"]),
    (["train.recall_pairs=9"], ["train.recall_pairs = 9", "train.vocab_size = 32"]),
    (["steps=1"], ["steps=1", "section.key"]),
])
def test_bad_config_names_the_key(override, names):
    with pytest.raises(ValueError) as err:
        config.load(DEMO, override)
    for name in names:
        assert name in str(err.value), (name, str(err.value))


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[job\nname = 1\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        config.load(tmp_path / "missing.toml")


# --- checkpoints ---------------------------------------------------------------------------
def _write_checkpoint(root: Path, step: int, payload: bytes) -> Path:
    tmp = ckpt.prepare(root, step)
    (tmp / "rank0.bin").write_bytes(payload)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "rank1.bin").write_bytes(payload[::-1])
    return ckpt.commit(root, step, world_size=2)


def test_checkpoint_manifest_and_fallback(tmp_path):
    root = tmp_path / "ck"
    for step in (2, 4, 6):
        _write_checkpoint(root, step, bytes(range(step, step + 50)))
    manifest = ckpt.read_manifest(ckpt.step_dir(root, 6))
    assert manifest["step"] == 6 and set(manifest["files"]) == {"rank0.bin", "sub/rank1.bin"}
    assert manifest["files"]["rank0.bin"]["sha256"] == ckpt.sha256_file(root / "step-00000006" / "rank0.bin")
    assert ckpt.latest_complete(root) == (6, ckpt.step_dir(root, 6))

    # a torn write (temp folder, never renamed) is invisible
    ckpt.prepare(root, 8)
    assert ckpt.latest_complete(root)[0] == 6

    # a flipped byte in the newest: skipped for the previous one, with the reason logged
    f = root / "step-00000006" / "sub" / "rank1.bin"
    data = bytearray(f.read_bytes())
    data[7] ^= 0xFF
    f.write_bytes(bytes(data))
    notes: list[str] = []
    assert ckpt.latest_complete(root, log=notes.append) == (4, ckpt.step_dir(root, 4))
    assert "step-00000006" in notes[0] and "sha256" in notes[0]

    # a missing manifest (torn) and a truncated file in the next ones: back to step 2
    (root / "step-00000004" / ckpt.MANIFEST).unlink()
    notes.clear()
    assert ckpt.latest_complete(root, log=notes.append)[0] == 2
    assert "no MANIFEST" in notes[1]
    (root / "step-00000002" / "rank0.bin").write_bytes(b"x")
    assert ckpt.latest_complete(root, log=notes.append) is None


def test_checkpoint_garbled_manifest_and_prune(tmp_path):
    root = tmp_path / "ck"
    for step in (1, 2, 3, 4):
        _write_checkpoint(root, step, b"abc" * step)
    (root / "step-00000004" / ckpt.MANIFEST).write_bytes(b"\xc1\xc1garbage")
    assert "unreadable" in ckpt.verify(root / "step-00000004")
    removed = ckpt.prune(root, keep=2)
    assert [p.name for p in removed] == ["step-00000001"]
    assert [s for s, _ in ckpt.candidates(root)] == [4, 3, 2]
    # the same step saved again (a restarted attempt) replaces the old folder
    _write_checkpoint(root, 3, b"new")
    assert (root / "step-00000003" / "rank0.bin").read_bytes() == b"new"
    assert ckpt.verify(root / "step-00000003") is None


# --- records -------------------------------------------------------------------------------
def test_recorder_writes_records_and_summary(tmp_path, capsys):
    rec = Recorder(tmp_path, {"name": "t", "task": "probe", "workers": 2, "dp": 1,
                              "ulysses": 1, "ring": 2}, total_steps=3)
    for attempt, steps in ((0, (1, 2)), (1, (2, 3))):
        for s in steps:
            rec.add({"type": "step", "step": s, "loss": 1.0 / s + attempt * 0, "tokens": 64,
                     "seconds": 0.5, "peak_mem_bytes": 2**21, "attempt": attempt})
    rec.add({"type": "restart", "attempt": 1, "reason": "rank 1: died"})
    summary = rec.finish({"status": "completed", "attempts": 2, "exactness": 1e-7,
                          "exactness_seq_len": 16, "digest": "ab" * 32}).read_text()
    records = read_records(tmp_path)
    kinds = [r["type"] for r in records]
    assert kinds[0] == "meta" and kinds[-1] == "final" and kinds.count("step") == 4
    assert [r["attempt"] for r in records if r["type"] == "step" and r["step"] == 2] == [0, 1]
    assert "**completed** after 2 attempt(s), 1 restart(s)" in summary
    assert "loss 1.00000 -> 0.33333" in summary and "128 tokens/s" in summary
    assert "restart 1: rank 1: died" in summary
    assert "step 3/3" in capsys.readouterr().out


# --- rank assignment -----------------------------------------------------------------------
def test_assign_ranks_groups_nodes_and_gpus():
    infos = [{"node": "A", "gpus": ["0"]}, {"node": "B", "gpus": ["1"]},
             {"node": "A", "gpus": ["3"]}, {"node": "B", "gpus": ["0"]}]
    plan = assign_ranks(infos)
    assert [p["bundle"] for p in plan] == [0, 2, 1, 3]  # node A's bundles take ranks 0, 1
    assert [p["rank"] for p in plan] == [0, 1, 2, 3]
    assert [p["local_rank"] for p in plan] == [0, 1, 0, 1]
    assert [p["local_world"] for p in plan] == [2, 2, 2, 2]
    assert plan[1]["gpus"] == ["0", "3"] and plan[3]["gpus"] == ["1", "0"]
    for p in plan:  # cuda:LOCAL_RANK is the actor's own GPU
        assert p["gpus"][p["local_rank"]] == infos[p["bundle"]]["gpus"][0]


def test_manifest_is_msgpack(tmp_path):
    path = _write_checkpoint(tmp_path, 5, b"hello")
    raw = msgpack.unpackb((path / ckpt.MANIFEST).read_bytes())
    assert raw["format"] == ckpt.FORMAT and raw["world_size"] == 2
