"""`python -m seqshard.launch.perf {bench,plan} ...`: the same as `seqshard bench|plan`."""

import argparse
import sys

from .bench_cmd import cmd_bench
from .plan_cmd import cmd_plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqshard.launch.perf")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in (("bench", cmd_bench), ("plan", cmd_plan)):
        fn.add_arguments(sub.add_parser(name))
    args = p.parse_args(argv)
    try:
        return {"bench": cmd_bench, "plan": cmd_plan}[args.command](args)
    except ValueError as err:
        print(f"seqshard {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
