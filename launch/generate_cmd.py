"""`seqshard generate` (being built)."""

from __future__ import annotations


def register(command) -> None:
    """Add `seqshard generate` to the `seqshard` CLI's registry (launch/cli.py's `command`)."""
