"""`seqshard data prepare` (being built)."""

from __future__ import annotations


def register(command) -> None:
    """Add `seqshard data prepare` to the `seqshard` CLI's registry (launch/cli.py's `command`)."""
