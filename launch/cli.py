"""The `seqshard` command.

    seqshard --version
    seqshard env                                  versions, backend and devices a worker would use
    seqshard run CONFIG.toml [--set k=v ...] [--address ADDR] [--out DIR] [--fresh]    on Ray
    seqshard worker CONFIG.toml [--set k=v ...] [--out DIR] [--fresh]    under torchrun / deepspeed

Subcommands live in a small registry (`command`), so `seqshard bench` and `seqshard plan`
plug in with one decorated function each. Config errors (a changed config over an old
checkpoint and an unwritable output folder included) are reported before any worker or Ray
instance starts, with exit status 2. A job's first line says where it writes and whether it
resumes; its last line says where its output is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help: str):
    """Register `fn(args) -> int` as a subcommand; `fn.add_arguments(parser)` adds its flags."""

    def register(fn):
        COMMANDS[name] = (help, getattr(fn, "add_arguments", lambda p: None), fn)
        return fn

    return register


def version() -> str:
    try:
        return metadata.version("seqshard")
    except metadata.PackageNotFoundError:
        return "unknown"


def _job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job TOML file, e.g. launch/configs/demo.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=20 (repeatable)")
    p.add_argument("--out", help="output folder (overrides job.out)")
    p.add_argument("--fresh", action="store_true",
                   help="start at step 0 even where the output folder holds checkpoints; the "
                        "previous run's checkpoints, records, summary and plot are moved into "
                        "OUT/previous-<date>-<time>/ (nothing is deleted: remove it yourself)")


def _shown(path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(os.getcwd()))
    except ValueError:
        return str(path)


def _move_aside(out):
    """Move a previous run's outputs in `out` into a new out/previous-<time>/; its path, or None."""
    from .records import PLOT, RECORDS, SUMMARY

    present = [out / n for n in ("checkpoints", RECORDS, SUMMARY, PLOT) if (out / n).exists()]
    if not present:
        return None
    stamp = time.strftime("previous-%Y%m%d-%H%M%S")
    dest, n = out / stamp, 1
    while dest.exists():  # two fresh starts within a second
        dest, n = out / f"{stamp}-{n}", n + 1
    dest.mkdir()
    for path in present:
        os.replace(path, dest / path.name)  # a rename: instant, whatever the checkpoints weigh
    return dest


def _start(cfg, fresh: bool) -> str:
    """Check the output folder and the resume point before any worker starts (ValueError if the
    folder cannot be written or holds another config's checkpoint); the run's first line."""
    from . import config
    from .worker import find_resume, train_config_steps

    config.check_out_dir(cfg)
    out = _shown(cfg.out_dir)
    if fresh:
        moved = _move_aside(cfg.out_dir)
        return f"fresh start in {out}" + (f"; the previous run is in {_shown(moved)}" if moved else "")
    found = find_resume(cfg)
    if found is None:
        return f"new run in {out}"
    return (f"resuming {out} at step {found[0]}/{train_config_steps(cfg)}; "
            f"use --out or --fresh to start over")


def _load(args):
    from . import config

    cfg = config.load(args.config, list(args.overrides))
    if getattr(args, "out", None):
        cfg.job.out = args.out
    return cfg


def cmd_env(args) -> int:
    import platform

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from seqshard.dist import default_backend

    rows = [("seqshard", version()), ("python", platform.python_version()),
            ("torch", torch.__version__)]
    for pkg in ("ray", "deepspeed", "msgpack", "matplotlib"):
        try:
            rows.append((pkg, metadata.version(pkg)))
        except metadata.PackageNotFoundError:
            rows.append((pkg, "not installed"))
    if torch.cuda.is_available():
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        devices = f"cpu ({os.cpu_count()} cores)"
    rows += [("backend", default_backend()), ("devices", devices),
             ("ray_address", os.environ.get("RAY_ADDRESS") or "(none: embedded local Ray)")]
    for key, value in rows:
        print(f"{key:<12} {value}")
    return 0


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cmd_run(args) -> int:
    from . import config

    cfg = _load(args)  # raises ValueError before Ray starts
    print(_start(cfg, args.fresh), flush=True)  # ValueError, too, before Ray starts
    if not (args.address or cfg.launch.address or os.environ.get("RAY_ADDRESS")):
        # an embedded Ray runs every worker on this machine: say once if it is too small
        for line in config.resource_warnings(cfg, cpus=os.cpu_count() or 1, gpus=_gpu_count()):
            print(f"seqshard run: warning: {line}", file=sys.stderr)
    from .ray_launcher import LaunchError, launch

    try:
        result = launch(cfg, address=args.address)
    except LaunchError as err:
        print(f"seqshard: {err}", file=sys.stderr)
        print(f"seqshard: output in {_shown(cfg.out_dir)}")
        return 1
    with open(result["summary"]) as f:
        print(f.read())
    print(f"seqshard: output in {_shown(cfg.out_dir)}")
    return 0


cmd_run.add_arguments = lambda p: (_job_arguments(p), p.add_argument(
    "--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)"))


def cmd_worker(args) -> int:
    cfg = _load(args)
    from .worker import find_resume, main_from_env

    rank = int(os.environ.get("RANK", "0"))
    # a restarted attempt (torchrun --max-restarts) resumes its own checkpoints, --fresh or not
    fresh = args.fresh and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    if rank == 0:
        print(_start(cfg, fresh), flush=True)
    elif not args.fresh:
        find_resume(cfg)  # every rank refuses another config's checkpoint before joining
    main_from_env(cfg)
    if rank == 0:
        print(f"seqshard: output in {_shown(cfg.out_dir)}")
    return 0


def _worker_arguments(p: argparse.ArgumentParser) -> None:
    _job_arguments(p)
    # the deepspeed launcher appends --local_rank=N unless given --no_local_rank; the rank
    # comes from the LOCAL_RANK variable either way
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


cmd_worker.add_arguments = _worker_arguments

command("env", "show versions, the backend and the devices a worker would use")(cmd_env)
command("run", "run a job on Ray (embedded local Ray unless --address / RAY_ADDRESS)")(cmd_run)
command("worker", "run one rank of a job under torchrun / deepspeed (reads RANK, WORLD_SIZE, ...)")(cmd_worker)

from .perf import register as _register_perf  # noqa: E402  (seqshard bench, seqshard plan)

_register_perf(command)
from .data_cmd import register as _register_data  # noqa: E402  (seqshard data prepare)
from .eval_cmd import register as _register_eval  # noqa: E402  (seqshard eval)
from .generate_cmd import register as _register_generate  # noqa: E402  (seqshard generate)
from .sweep import register as _register_sweep  # noqa: E402  (seqshard sweep)

for _register in (_register_data, _register_eval, _register_sweep, _register_generate):
    _register(command)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqshard", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"seqshard {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args)
    except ValueError as err:
        print(f"seqshard {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
