"""The `seqshard` command: version, env, config errors before anything starts, the registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ray

from seqshard.launch import cli

DEMO = Path(__file__).resolve().parents[1] / "launch" / "configs" / "demo.toml"


def test_version_from_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "seqshard.launch.cli", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("seqshard ")
    assert proc.stdout.split()[1] == cli.version() != "unknown"


def test_env_lists_versions_backend_and_devices(capsys):
    assert cli.main(["env"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()
                if len(line.split(None, 1)) == 2)
    import deepspeed  # noqa: F401  (installed: its version must be the one listed)
    import torch

    assert rows["torch"] == torch.__version__
    assert rows["ray"] == ray.__version__
    assert rows["deepspeed"] == deepspeed.__version__
    assert rows["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert "devices" in rows


def test_bad_config_fails_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "never"
    code = cli.main(["run", str(DEMO), "--set", "mesh.wrokers=3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "mesh.wrokers" in err
    assert not ray.is_initialized() and not out.exists()
    code = cli.main(["worker", str(DEMO), "--set", "mesh.ring=3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "mesh.ring = 3" in err and "mesh.workers = 2" in err
    assert not out.exists()


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "run" in capsys.readouterr().out


def test_subcommand_registry_dispatches(capsys):
    def cmd_plan(args):
        print(f"planning {args.seq_len}")
        return 0

    cmd_plan.add_arguments = lambda p: p.add_argument("seq_len", type=int)
    cli.command("fake-plan", "plan a mesh")(cmd_plan)
    try:
        assert cli.main(["fake-plan", "4096"]) == 0
        assert capsys.readouterr().out == "planning 4096\n"
    finally:
        del cli.COMMANDS["fake-plan"]


def test_perf_commands_are_registered(capsys):
    """`seqshard bench` and `seqshard plan` come from launch/perf and keep their flags."""
    assert {"bench", "plan"} <= set(cli.COMMANDS)
    assert cli.main(["plan", "--n", "4K", "--world", "2", "--heads", "4", "--head-dim", "16",
                     "--hardware", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "N = 4096 tokens on 2 ranks" in out and "| ring | 1x2 |" in out
    assert cli.main(["plan", "--n", "0"]) == 2
    assert "length '0' must be >= 1 token" in capsys.readouterr().err
