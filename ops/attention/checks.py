"""Argument checks shared by every attention entry point (each raises a ValueError that
names the offending value; sharded callers run them before any communication)."""

from __future__ import annotations

import torch

from ..dtypes import FLOAT_DTYPES


def check_qkv(q, k, v, *, same_len: bool = True) -> None:
    """q [B, Hq, N, D]; k, v [B, Hkv, N_k, D] with Hq % Hkv == 0, one float dtype and one
    device. same_len: N_k must equal N (self-attention over a sharded sequence)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N_local, D], got {shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v have different dtypes: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"attention needs a floating dtype ({', '.join(map(str, FLOAT_DTYPES))}), "
                         f"got {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    b, hq, n, d = q.shape
    if (k.shape[0], k.shape[3]) != (b, d) or (same_len and k.shape[2] != n):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, "
            f"{'local sequence length and ' if same_len else ''}head dim ([B, H, N_local, D])"
        )
    if k.shape[1] < 1 or hq % k.shape[1] != 0:
        raise ValueError(f"query heads {hq} are not divisible by key/value heads {k.shape[1]}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
