"""The delta rule, token by token: the readable reference every faster form is tested against.

State orientation: S is [B, H, Dk, Dv] (keys index rows), so a read is `o = S^T q`.
For each token t (a_t = exp(g_t) when a log-decay gate g is given, else 1):

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
        = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T     (the form computed below)
    o_t = S_t^T (scale * q_t)

This is the paper's `S_t = S_{t-1}(I - b k k^T) + b v k^T` with S transposed. O(N Dk Dv) work
in N sequential steps; fp32 (float64 stays float64) so it is a trustworthy oracle.
"""

from __future__ import annotations

import torch

from ..dtypes import compute_dtype


def naive_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B, H, N, Dk]; v [B, H, N, Dv]; beta, gate (log-decay) [B, H, N];
    initial_state [B, H, Dk, Dv]. Returns (o [B, H, N, Dv] in v's dtype, final state or None).

    >>> q = k = torch.nn.functional.normalize(torch.randn(1, 2, 5, 4), dim=-1)
    >>> o, s = naive_delta_rule(q, k, torch.randn(1, 2, 5, 3), torch.rand(1, 2, 5),
    ...                         output_final_state=True)
    >>> o.shape, s.shape
    (torch.Size([1, 2, 5, 3]), torch.Size([1, 2, 4, 3]))
    """
    work = compute_dtype(q.dtype)
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    q, k, v, beta = (t.to(work) for t in (q, k, v, beta))
    q = q * scale
    if initial_state is None:
        S = q.new_zeros(B, H, Dk, Dv)
    else:
        S = initial_state.to(work)
    # unbind once: indexing x[:, :, t] in a loop would make backward O(N^2) (a full-size
    # gradient per selected token)
    gates = gate.to(work).exp().unbind(2) if gate is not None else [None] * N
    outs = []
    for q_t, k_t, v_t, b_t, a_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), beta.unbind(2),
                                       gates):
        if a_t is not None:
            S = S * a_t[..., None, None]
        predicted = torch.einsum("bhkv,bhk->bhv", S, k_t)  # what the memory returns for k_t
        correction = b_t[..., None] * (v_t - predicted)  # [B, H, Dv]
        S = S + k_t[..., :, None] * correction[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q_t))
    o = torch.stack(outs, dim=2).to(v.dtype)  # [B, H, N, Dv]
    return o, (S if output_final_state else None)


def naive_short_conv(x_ext: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The short depthwise causal convolution as torch's conv1d: x_ext [B, K - 1 + n, C] (the
    K - 1 rows before the n rows first), weight [C, K] -> [B, n, C]; the reference for
    short_conv.causal_conv. Computed in fp32 (float64 stays float64), returned in x's dtype.

    >>> naive_short_conv(torch.ones(1, 5, 2), torch.ones(2, 3))[0, :, 0]
    tensor([3., 3., 3.])
    """
    work = compute_dtype(x_ext.dtype)
    if x_ext.shape[1] < weight.shape[1]:  # no rows (conv1d refuses an input shorter than K)
        return x_ext[:, :0] * weight[:, 0]
    out = torch.nn.functional.conv1d(x_ext.to(work).transpose(1, 2), weight.to(work)[:, None],
                                     groups=x_ext.shape[-1])  # [B, C, n]
    return out.transpose(1, 2).to(x_ext.dtype)
