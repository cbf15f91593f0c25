"""Peak memory of this process: the one probe the trainer, the benchmarks and the tests use.

On CUDA it is the caching allocator's peak (`torch.cuda.max_memory_allocated`). On a CPU it is
the resident set's high-water mark, VmHWM in /proc/self/status, which Linux resets to the
current resident set when "5" is written to /proc/self/clear_refs. That count includes what
torch's allocator holds, gloo's buffers and Python itself, so a benchmark reports the rise
over a base taken right after the reset (`PeakWindow`). Where /proc is missing (not Linux)
the reset does nothing and the peak is the process-wide `ru_maxrss`.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    """A /proc/self/status size field ("VmRSS", "VmHWM") in bytes, None where unreadable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The resident set now (0 where /proc is missing)."""
    return _status_bytes("VmRSS") or 0


def reset_peak(device: torch.device | str | None = None) -> bool:
    """Start a new peak window for `device` (None or a CPU device: the resident set).

    Returns False where the CPU high-water mark cannot be reset (no /proc, or writing
    clear_refs is not allowed), so the peak that follows is process-wide.
    """
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
    except OSError:
        return False
    return True


def peak_bytes(device: torch.device | str | None = None) -> int:
    """The peak since the last `reset_peak(device)` (or since the process started)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


class PeakWindow:
    """`with PeakWindow(device) as w: run()`, then `w.rise`: the peak during the block above
    the memory in use when it began (bytes; CUDA: allocated, CPU: resident set)."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device or "cpu")
        self.rise = 0
        self.resettable = True

    def __enter__(self) -> "PeakWindow":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        self.resettable = reset_peak(self.device)
        if self.device.type != "cuda":
            self._base = rss_bytes()
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.rise = max(0, peak_bytes(self.device) - self._base)
        return False
