"""Loading checkpoints without ever executing code from them.

A checkpoint folder is as trusted as whoever can write to it: on a shared filesystem that can be
anyone on the cluster, and the manifest's sha256 only proves the files were not torn, since an
attacker can recompute it. Plain `torch.load` (DeepSpeed's default, weights_only=False) runs any
pickle payload, so every load here is `torch.load(weights_only=True)`: tensors, containers,
numbers and strings, plus exactly the plain-data classes DeepSpeed writes (`deepspeed_globals`,
found by saving ZeRO 0-3 checkpoints and listing the pickles' globals). Anything else fails with
`UnsafeCheckpointError` (a ValueError, so the launcher does not retry) naming the file.

    from seqshard.models.safe_load import load_weights_only
    state = load_weights_only(path)                  # tensors and plain data, or ValueError
    install_safe_engine(engine)                      # DeepSpeed's own loads become weights-only
    check_checkpoint(folder)                         # every *.pt in a folder, tensor data unread
    raise_on_every_rank(problem, mesh, what)         # one rank refused: all raise, none hangs
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist

from seqshard.dist import all_reduce

_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors and plain data (or is not one)."""


def deepspeed_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into ZeRO 0-3 checkpoints: all plain data
    (a loss-scale record, an int enum, a (numel, start) dataclass), with no code in their
    construction. Deferred import: importing deepspeed costs about a second."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location=None, *, allowed=(), mmap: bool = False):
    """`torch.load(path, weights_only=True)` with only `allowed` classes added to torch's
    tensor-and-plain-data allowlist. mmap=True maps the tensor data without reading it (a cheap
    check of the pickle alone; needs the zip format, which is all we write)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:  # UnpicklingError, RuntimeError (not a torch file), EOFError, ...
        raise UnsafeCheckpointError(
            f"checkpoint file {str(path)!r} is not a tensors-only checkpoint ({_reason(err)}); "
            f"refusing to load it: it may have been tampered with") from None


def _reason(err: Exception) -> str:
    """The cause in a line. torch's own message advises retrying with weights_only=False or
    allowlisting the offending global: exactly wrong for a planted file, so it is dropped."""
    text = str(err)
    found = _UNSUPPORTED.search(text)
    if found:
        return f"it calls or builds {found.group(1)}, which is not allowed"
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def check_checkpoint(folder) -> None:
    """Raise UnsafeCheckpointError naming the first *.pt file under `folder` (sorted) whose
    pickle is not weights-only. Tensor data is memory-mapped, not read, so this costs about the
    size of the pickles, not of the checkpoint."""
    allowed = deepspeed_globals()
    for path in sorted(Path(folder).rglob("*.pt")):
        load_weights_only(path, "cpu", allowed=allowed, mmap=True)


def install_safe_engine(engine) -> None:
    """Make a DeepSpeed engine's checkpoint loads weights-only (its saves are unchanged).

    Every load of ZeRO 0-3 model and optimizer files in `engine.load_checkpoint` goes through
    `engine.checkpoint_engine.load`; DeepSpeed's TorchCheckpointEngine uses weights_only=False.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        # another engine (async writers, datastates) has its own loads we have not made safe
        raise TypeError(f"expected DeepSpeed's TorchCheckpointEngine, got {type(current).__name__}")
    allowed = deepspeed_globals()

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location, allowed=allowed)

    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # same name and serialization settings for saves
    engine.checkpoint_engine = safe


def raise_on_every_rank(problem: str, mesh, what: str) -> None:
    """Raise ValueError on every rank if any rank has a `problem` (its own text there; the
    others name the refusing ranks). Without this the ranks that found nothing would walk on
    into a collective that the refusing rank never joins, and hang until its timeout."""
    if mesh.world_size > 1:
        flags = torch.zeros(mesh.world_size, dtype=torch.float64)  # [world]: 1 = refused
        flags[mesh.global_rank] = 1.0 if problem else 0.0
        flags = all_reduce(flags, dist.group.WORLD, timeout=mesh.timeout)  # None: no group
        refused = [r for r in range(mesh.world_size) if flags[r] > 0]
        if refused and not problem:
            problem = f"{what} was refused by rank(s) {refused}; see their errors"
    if problem:
        raise ValueError(problem)
