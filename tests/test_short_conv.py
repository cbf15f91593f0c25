"""short_conv.causal_conv (token-major shifted multiply-adds) against the conv1d reference,
forward and backward, on the inputs the layer and users pass: views, strided rows, fewer rows
than the kernel, no rows, batches, half precision."""

import pytest
import torch

from seqshard.ops.delta_rule import DeltaNet, ShortConv
from seqshard.ops.delta_rule.naive import naive_short_conv
from seqshard.ops.delta_rule.short_conv import causal_conv

from tests.common import assert_close


def _case(B, n, C, K, dtype, strided):
    torch.manual_seed(n * 7 + K)
    if strided:  # a transposed view, as a [B, C, n] buffer read token-major
        x = torch.randn(B, C, n + 2, dtype=dtype)[:, :, 1:n + 1].transpose(1, 2)
        assert n < 2 or not x.is_contiguous()
    else:
        x = torch.randn(B, n, C, dtype=dtype)
    context = torch.randn(B, K - 1, C, dtype=dtype)
    weight = torch.randn(C, K, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return x, context, weight


@pytest.mark.parametrize("B,n,C,K", [(1, 37, 8, 4), (3, 5, 6, 4), (2, 2, 4, 4), (1, 1, 3, 4),
                                     (1, 0, 4, 4), (2, 9, 5, 1), (1, 6, 4, 2), (1, 11, 3, 7)])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_conv1d_forward_and_backward(B, n, C, K, strided):
    x, context, weight = _case(B, n, C, K, torch.float64, strided)
    leaves = [t.detach().requires_grad_() for t in (x, context, weight)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, context, weight)]
    y = causal_conv(*leaves)
    ref = naive_short_conv(torch.cat([ref_leaves[1], ref_leaves[0]], dim=1), ref_leaves[2])
    assert y.shape == (B, n, C) and y.dtype == torch.float64
    assert_close("y", ref, y, 1e-12)
    dy = torch.randn_like(ref)
    y.backward(dy)
    ref.backward(dy)
    for name, a, b in zip(("dx", "dcontext", "dweight"), ref_leaves, leaves):
        assert_close(name, a.grad, b.grad, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2),
                                       (torch.float16, 2e-3)])
def test_half_and_single_precision_accumulate_in_fp32(dtype, tol):
    x, context, weight = _case(2, 33, 16, 4, dtype, strided=False)
    leaves = [t.detach().requires_grad_() for t in (x, context, weight)]
    y = causal_conv(*leaves)
    assert y.dtype == dtype
    exact = naive_short_conv(torch.cat([context, x], 1).double(), weight.double())
    assert_close("y", exact, y.double(), tol)
    y.backward(torch.ones_like(y))
    assert leaves[0].grad.dtype == dtype and leaves[2].grad.dtype == torch.float32
    ref = [t.detach().double().requires_grad_() for t in (x, context, weight)]
    naive_short_conv(torch.cat([ref[1], ref[0]], 1), ref[2]).sum().backward()
    for name, a, b in zip(("dx", "dcontext", "dweight"), ref, leaves):
        assert_close(name, a.grad, b.grad.double(), tol)


def test_bad_shapes_name_them():
    x, context, weight = _case(1, 5, 4, 4, torch.float32, strided=False)
    with pytest.raises(ValueError, match=r"context \(1, 2, 4\) must be \[B, K - 1, C\]"):
        causal_conv(x, context[:, 1:], weight)
    with pytest.raises(ValueError, match=r"weight \(4, 4, 1\)"):
        causal_conv(x, context, weight[..., None])


def test_short_conv_module_and_layer_use_it_exactly():
    """ShortConv keeps its [C, 1, K] parameter (checkpoints load unchanged) and equals the
    conv1d of the zero-padded sequence; the layer's output equals one built from conv1d."""
    torch.manual_seed(0)
    conv = ShortConv(6, 4)
    x = torch.randn(2, 10, 6, dtype=torch.float64)
    ref = naive_short_conv(torch.cat([x.new_zeros(2, 3, 6), x], 1), conv.weight[:, 0].double())
    assert conv.weight.shape == (6, 1, 4)
    assert_close("ShortConv", ref, conv.double()(x), 1e-12)
    layer = DeltaNet(16, 2, mixer_piece_tokens=None).double()
    x = torch.randn(1, 21, 16, dtype=torch.float64)
    ctx = torch.zeros(1, layer.halo, 16, dtype=torch.float64)
    q, k, v, _, _ = layer._features(x, ctx)
    projected = layer.v_proj(torch.cat([ctx, x], 1))
    v_ref = torch.nn.functional.silu(naive_short_conv(projected, layer.convs[2].weight[:, 0]))
    assert_close("v", layer._heads(v_ref), v, 1e-12)
