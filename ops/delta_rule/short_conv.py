"""The DeltaNet layer's short depthwise causal convolution, computed where the rows lie.

For n rows x [B, n, C] and the K - 1 rows before them, context [B, K - 1, C]
(x_ext = [context; x], [B, K - 1 + n, C]):

    y[b, t, c] = sum_k w[c, k] x_ext[b, t + k, c]          k = 0 .. K - 1,  t = 0 .. n - 1

torch's conv1d wants channels first ([B, C, N]): from the token-major stream that is a
transposing copy in, one out, and two more in backward, which cost more than the convolution
itself (a K-tap depthwise kernel is K multiply-adds per element). Here the K taps are K
shifted multiply-adds over [B, n, C] (tap k reads the row K - 1 - k tokens back), the rows
before the first K - 1 tokens coming from the context, so nothing is transposed or
concatenated. Backward is the same shifts reversed, and each tap's weight gradient is one
multiply-reduce. Half-precision inputs are computed in fp32 and rounded once, as conv1d
accumulates; float64 stays float64. `naive.naive_short_conv` is the conv1d reference.
"""

from __future__ import annotations

import torch

from ..dtypes import compute_dtype


def _taps(K: int):
    """(k, j): tap k of the kernel reads the row j = K - 1 - k tokens back, for j = 1 .. K - 1;
    tokens t < j read context row K - 1 - j + t."""
    return [(K - 1 - j, j) for j in range(1, K)]


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, context, weight):
        ctx.save_for_backward(x, context, weight)
        work = compute_dtype(x.dtype)
        xw, cw, w = x.to(work), context.to(work), weight.to(work)  # [B, n, C], [B, K-1, C], [C, K]
        n, K = x.shape[1], weight.shape[1]
        y = xw * w[:, K - 1]  # [B, n, C]: the tap on the row itself
        for k, j in _taps(K):
            m = min(j, n)  # the first m tokens read the context
            if n > j:
                y[:, j:].addcmul_(xw[:, :n - j], w[:, k])
            y[:, :m].addcmul_(cw[:, k:k + m], w[:, k])
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, context, weight = ctx.saved_tensors
        work = compute_dtype(x.dtype)
        xw, cw, w, g = x.to(work), context.to(work), weight.to(work), dy.to(work)
        n, K = x.shape[1], weight.shape[1]
        dx = g * w[:, K - 1]  # [B, n, C]
        dcontext = torch.zeros_like(cw)  # [B, K - 1, C]
        dweight = torch.empty_like(w)  # [C, K]
        dweight[:, K - 1] = (g * xw).sum((0, 1))
        for k, j in _taps(K):
            m = min(j, n)
            tap = (g[:, :m] * cw[:, k:k + m]).sum((0, 1))  # [C]
            if n > j:
                dx[:, :n - j].addcmul_(g[:, j:], w[:, k])
                tap += (g[:, j:] * xw[:, :n - j]).sum((0, 1))
            dcontext[:, k:k + m].addcmul_(g[:, :m], w[:, k])
            dweight[:, k] = tap
        return dx.to(x.dtype), dcontext.to(context.dtype), dweight.to(weight.dtype)


def causal_conv(x: torch.Tensor, context: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution of x [B, n, C] (any strides) whose K - 1 preceding rows
    are context [B, K - 1, C], with weight [C, K] (tap K - 1 on the row itself).
    Returns [B, n, C] in x's dtype.

    >>> x, context, w = torch.randn(2, 5, 3), torch.randn(2, 3, 3), torch.randn(3, 4)
    >>> from seqshard.ops.delta_rule.naive import naive_short_conv
    >>> ref = naive_short_conv(torch.cat([context, x], 1), w)
    >>> torch.allclose(causal_conv(x, context, w), ref, atol=1e-6)
    True
    """
    if x.dim() != 3 or context.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"causal_conv: x {tuple(x.shape)} and context "
                         f"{tuple(context.shape)} must be [B, n, C] and [B, K - 1, C], "
                         f"weight {tuple(weight.shape)} [C, K]")
    B, _, C = x.shape
    K = weight.shape[1]
    if context.shape != (B, K - 1, C) or weight.shape[0] != C:
        raise ValueError(f"causal_conv: context {tuple(context.shape)} must be "
                         f"[B, K - 1, C] = {(B, K - 1, C)} for x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    return _CausalConv.apply(x, context, weight)
