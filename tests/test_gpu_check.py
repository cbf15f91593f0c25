"""benchmarks/gpu_check.py on a CPU-only machine: every GPU stage is recorded as skipped and
says why, in the report and the msgpack record, exit 0; and nothing on its path imports ray
or deepspeed (a bare GPU box may lack both)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# Makes `import ray` / `import deepspeed` fail, then imports what gpu_check uses and runs it.
BLOCKED = textwrap.dedent("""
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "deepspeed"):
                raise ImportError(f"{name} is blocked: gpu_check must not import it")
            return None

    sys.meta_path.insert(0, Blocker())
    sys.path.insert(0, BENCH)
    import gpu_check
    from seqshard.dist import Mesh, get_layout
    from seqshard.dist.rank_pool import RankPool
    from seqshard.models import build_model, sharded_lm_loss
    from seqshard.ops.attention import local_attention, sharded_attention
    from seqshard.ops.delta_rule import delta_rule
    assert not any(m.split(".")[0] in ("ray", "deepspeed") for m in sys.modules)
    sys.exit(gpu_check.main(sys.argv[1:]))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_gpu_check_on_cpu_skips_every_gpu_stage_and_imports_no_ray_or_deepspeed(tmp_path):
    msgpack = pytest.importorskip("msgpack")
    code = BLOCKED.replace("BENCH", repr(str(SCRIPT.parent)))
    done = subprocess.run([sys.executable, "-c", code, "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    record = msgpack.unpackb((tmp_path / "gpu_check.msgpack").read_bytes())
    assert record["device"] == "no CUDA device"
    assert set(record["stages"]) == {"kernel", "sharded", "max_n", "delta", "train"}
    for name, stage in record["stages"].items():
        assert stage["status"] == "skipped: no CUDA device", (name, stage)
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.count("status: skipped: no CUDA device") == 5, report
    assert "Local kernel vs SDPA" in report and "Largest N" in report


def test_msgpack_writer_round_trips():
    msgpack = pytest.importorskip("msgpack")
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    value = {"a": [1, -2, 3.5, None, True, False, "é"], "b": {"c": (1 << 40)}}
    assert msgpack.unpackb(module._pack(value)) == {**value, "a": value["a"]}
