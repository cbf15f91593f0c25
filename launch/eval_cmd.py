"""`seqshard eval RUN_DIR_OR_CHECKPOINT [--set KEY=VALUE ...] [--out DIR] [--address ADDR]`.

Evaluates a trained run on Ray, on the run's own mesh: its config comes from the run's
records.msgpack (the config it trained with; --set changes it, e.g. --set eval.lengths=[1,2]),
the weights from its newest intact checkpoint or from the checkpoint folder named
(RUN/checkpoints/step-NNNNNNNN). The numbers go into the run's records.msgpack and
summary.md, the tables and PNGs beside them (or into --out). Passkeys on a tokenizer's .bin
are written in that tokenizer's ids: data.tokenizer names it, or, for a run whose [data] did
not, --set eval.tokenizer=DIR (a local folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .records import RECORDS, read_records


def run_config(run: Path) -> dict:
    """The job config a run recorded (the newest "meta" record's), as a plain dict."""
    if not (run / RECORDS).is_file():
        raise ValueError(f"{run} holds no {RECORDS}: not a seqshard run folder")
    metas = [r for r in read_records(run) if r.get("type") == "meta" and r.get("config")]
    if not metas:
        raise ValueError(f"{run / RECORDS} records no job config")
    return metas[-1]["config"]


def locate(target: str | Path) -> tuple[Path, Path | None]:
    """(run folder, the checkpoint folder named or None for the newest) of the argument."""
    from . import checkpoint as ckpt

    path = Path(target).resolve()
    if not path.exists():
        raise ValueError(f"{target}: no such run folder or checkpoint")
    if (path / ckpt.MANIFEST).exists() or ckpt._STEP_DIR.match(path.name):
        return path.parent.parent, path
    return path, None


def resolve(cfg, run: Path, named: Path | None) -> tuple[int, Path]:
    """(step, folder) of the checkpoint to evaluate: checked intact and written by this
    config (ValueError naming the folder or the differing keys otherwise)."""
    from . import checkpoint as ckpt
    from .config import resume_meta

    if named is None:
        found = ckpt.latest_complete(run / "checkpoints", log=lambda note: None)
        if found is None:
            raise ValueError(f"{run} has no intact checkpoint in {run / 'checkpoints'} to evaluate")
        step, named = found
    else:
        problem = ckpt.verify(named)
        if problem:
            raise ValueError(f"checkpoint {named}: {problem}")
        step = int(ckpt._STEP_DIR.match(named.name).group(1))
    saved = ckpt.read_manifest(named).get("meta", {}).get("config")
    if saved is not None:
        diffs = ckpt.meta_diff(saved, resume_meta(cfg))
        if diffs:
            raise ValueError(f"checkpoint {named} was written by another config: "
                             f"{'; '.join(diffs)} (--set may change [eval] keys, not the model)")
    return step, named


def cmd_eval(args) -> int:
    from . import config
    from .cli import _shown

    run, named = locate(args.target)
    cfg = config.build(run_config(run), list(args.overrides))  # ValueError before Ray starts
    if cfg.job.task != "train":
        raise ValueError(f"{run} ran job.task = {cfg.job.task!r}; only 'train' runs have a "
                         f"model to evaluate")
    step, folder = resolve(cfg, run, named)
    cfg.job.out = str(Path(args.out).resolve()) if args.out else str(run)
    config.check_out_dir(cfg)
    print(f"evaluating {_shown(run)} at step {step} ({_shown(folder)}); output in "
          f"{_shown(cfg.out_dir)}", flush=True)
    from .ray_launcher import LaunchError, launch

    try:
        result = launch(cfg, address=args.address, evaluate=(step, str(folder)))
    except LaunchError as err:
        print(f"seqshard: {err}", file=sys.stderr)
        print(f"seqshard: output in {_shown(cfg.out_dir)}")
        return 1
    print(Path(result["summary"]).read_text())
    print(f"seqshard: output in {_shown(cfg.out_dir)}")
    return 0


def _arguments(p) -> None:
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run's output folder (its newest checkpoint) or one checkpoint "
                        "folder, RUN/checkpoints/step-NNNNNNNN")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of the run, e.g. --set eval.lengths=[1,2] "
                        "(repeatable)")
    p.add_argument("--out", help="write records, summary, tables and PNGs here instead of "
                                 "the run folder")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an "
                                     "embedded local Ray)")


cmd_eval.add_arguments = _arguments


def register(command) -> None:
    """Add `seqshard eval` to the `seqshard` CLI's registry (launch/cli.py's `command`)."""
    command("eval", "evaluate a trained run on its mesh: loss by position, passkey "
                    "retrieval")(cmd_eval)
