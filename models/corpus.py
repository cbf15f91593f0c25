"""Training and evaluation tokens from real text: the `[data]` section.

(Being built for issue 15: sources, sharded reads, the held-out split, packed documents.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where tokens come from when train.task = 'data'."""

    path: str = ""
    """A .bin file of token ids, a text file or a folder of text files; empty: the source
    files of Python's own standard library, read as bytes."""
