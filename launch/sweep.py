"""`seqshard sweep` (being built)."""

from __future__ import annotations


def register(command) -> None:
    """Add `seqshard sweep` to the `seqshard` CLI's registry (launch/cli.py's `command`)."""
