"""Evaluation of a sharded LM: loss by position and passkey retrieval (the `[eval]` section).

(Being built for issue 15.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """What to evaluate at the end of training and under `seqshard eval`."""

    at_end: bool = False
    """Run the evaluation after the last training step."""
