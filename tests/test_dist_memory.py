"""The one peak-memory probe (seqshard.dist.memory) sees a real allocation on the CPU."""

import torch

from seqshard.dist.memory import PeakWindow, peak_bytes, reset_peak, rss_bytes


def test_peak_window_sees_a_large_allocation_and_resets():
    size = 256 << 20  # 256 MiB, touched so it becomes resident
    with PeakWindow() as window:
        block = torch.ones(size // 4, dtype=torch.float32)
        del block
    assert window.resettable  # Linux: clear_refs resets VmHWM
    assert window.rise >= size * 0.9, window.rise
    assert reset_peak()
    assert peak_bytes() < rss_bytes() + size // 2  # the old peak is gone after the reset


def test_cpu_device_strings_are_accepted():
    assert peak_bytes("cpu") > 0 and peak_bytes(torch.device("cpu")) > 0
