"""`agree`: make every rank of a group raise the same ValueError when their arguments differ.

A sharded op whose ranks disagree (a shape, a dtype, a flag) does not fail cleanly: one rank
leaves a collective early or sends a message of another size, and the others hang or read
garbage. One small all-gather at the start turns that into the same clear error on every
rank. Each rank sends what it was called with as named facts, plus the problem it found in
its own arguments (if any), so a rank with locally bad input does not leave the others
waiting in the next collective.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .collectives import all_gather, group_size

# Every rank sends a fixed-size message (an all-gather needs equal sizes). Facts are short
# (numbers, names, digests); long values travel as a digest, a long problem is cut.
WIDTH = 1024
_LONG_VALUE = 64
_LONG_PROBLEM = 400


def digest(value) -> str:
    """A short stable digest of `value`'s repr (Python's hash() differs between processes)."""
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


def _encode(facts: dict, problem: str | None) -> torch.Tensor:
    shown = {name: str(v) if len(str(v)) <= _LONG_VALUE else f"digest {digest(v)}"
             for name, v in facts.items()}
    cut = None if problem is None else problem[:_LONG_PROBLEM]
    text = json.dumps([shown, cut]).encode()
    if len(text) > WIDTH:  # too many facts for one message: compare them as one digest
        text = json.dumps([{"facts": f"digest {digest(shown)}"}, cut]).encode()
    buf = torch.zeros(1, WIDTH, dtype=torch.uint8)  # [1, WIDTH]; json never holds a NUL byte
    buf[0, :len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    return buf


def _decode(row: torch.Tensor) -> tuple[dict, str | None]:
    data = bytes(row.tolist()).rstrip(b"\0")
    facts, problem = json.loads(data.decode())
    return facts, problem


def agree(facts: dict, group, *, what: str, problem: str | None = None, timeout=None) -> None:
    """Raise the same ValueError on every rank of `group` unless all ranks passed equal
    `facts` (name -> value, compared by str) and none reported a `problem` (its own error
    message). One all-gather of WIDTH bytes per rank; nothing happens on a group of one
    (beyond raising `problem`). `what` names the operation in the message.

    Every rank of the group must call it (it is a collective), with the same fact names.
    """
    if group_size(group) == 1:
        if problem is not None:
            raise ValueError(problem)
        return
    with torch.no_grad():
        rows = all_gather(_encode(facts, problem), 0, group, timeout=timeout)  # [P, WIDTH]
    seen = [_decode(row) for row in rows]
    bad = [f"rank {r}: {p}" for r, (_, p) in enumerate(seen) if p is not None]
    if bad:
        raise ValueError(f"{what}: bad input on {len(bad)} rank(s): " + "; ".join(bad))
    first = seen[0][0]
    diffs = []
    for r, (theirs, _) in enumerate(seen[1:], start=1):
        changed = [f"{name}={theirs.get(name)} (rank 0: {first.get(name)})"
                   for name in sorted(set(first) | set(theirs))
                   if theirs.get(name) != first.get(name)]
        if changed:
            diffs.append(f"rank {r} has " + ", ".join(changed))
    if diffs:
        raise ValueError(f"{what}: the ranks were called with different arguments (every "
                         f"rank must pass the same shapes and options): " + "; ".join(diffs))
