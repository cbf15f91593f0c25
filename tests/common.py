"""Shared test helpers."""

import torch


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    """max |out - ref| <= tol * max(1, max |ref|): a tolerance relative to the tensor's scale.

    `name` says which tensor failed (output, a gradient, a state) so a multi-rank failure
    report points at it directly.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    ref64, out64 = ref.detach().double(), out.detach().double()
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:.1e} x scale {scale:.3g}"
