"""Local block attention that also returns the log-sum-exp, and the exact LSE merge.

This is the ONLY module that touches torch's private fused kernels
(`aten._scaled_dot_product_flash_attention_for_cpu` and its `_backward`): they return the
row log-sum-exp that sharded attention needs to merge partial results, and their backward
accepts the *final* output and LSE, so a block's gradient is recomputed flash-attention style
without storing its probabilities. If a torch release renames or changes them, `FUSED_CPU`
becomes None, everything falls back to the plain-torch path below, and
tests/test_attention.py::test_fused_kernel_schema fails loudly.

A block is a piece of queries [B, Hq, nq, D] meeting a piece of keys/values [B, Hkv, nk, D]
under one mask kind: 'full', 'causal' (query i sees keys <= i, nq == nk) or 'strict'
(query i sees keys < i) -- optionally refined by an explicit boolean mask (packed documents),
which always takes the plain path.
"""

from __future__ import annotations

import math

import torch

from .checks import check_qkv

# The exact schemas this module was written against; a test compares them with torch's.
FUSED_CPU_SCHEMAS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, "
    "float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) "
    "-> (Tensor output, Tensor logsumexp)",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, Tensor query, "
    "Tensor key, Tensor value, Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, *, "
    "Tensor? attn_mask=None, float? scale=None) -> (Tensor grad_query, Tensor grad_key, "
    "Tensor grad_value)",
)


def _load_fused_cpu():
    try:
        fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    except (AttributeError, RuntimeError):
        return None
    if (str(fwd._schema), str(bwd._schema)) != FUSED_CPU_SCHEMAS:
        return None
    return fwd, bwd


FUSED_CPU = _load_fused_cpu()
MASK_KINDS = ("full", "causal", "strict")


def default_scale(head_dim: int, scale: float | None) -> float:
    """scale, or D^-1/2. With D = 0 every logit is an empty sum (0) whatever the scale: 1."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def _use_fused(q: torch.Tensor, k: torch.Tensor) -> bool:
    # empty blocks (B, N or D = 0) take the plain path: the fused kernel divides by them
    return (FUSED_CPU is not None and q.device.type == "cpu" and q.numel() > 0
            and k.numel() > 0
            and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16))


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t with stride 1 in its last dim, which the private fused kernel assumes without
    checking (public SDPA ensures it before calling it). Copies only when needed: a
    transposed or head-sliced view already has it; x[..., ::2] or an expanded grad does not."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, Hkv, n, D] -> [B, Hq, n, D]: query head h reads kv head h // (Hq // Hkv)."""
    group = hq // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _fold_kv(dx: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, n, D] -> [B, Hkv, n, D]: a shared kv head collects its query heads' gradients."""
    group = dx.shape[1] // hkv
    return dx if group == 1 else dx.unflatten(1, (hkv, group)).sum(2)


def kind_mask(kind: str, nq: int, nk: int, device=None) -> torch.Tensor:
    """Boolean [nq, nk] mask of a block kind (True = may attend)."""
    full = torch.ones(nq, nk, dtype=torch.bool, device=device)
    return full if kind == "full" else full.tril(0 if kind == "causal" else -1)


# --- plain torch (any device, explicit masks) --------------------------------------------------
def _plain_mask(kind, mask, nq, nk, device):
    if mask is not None:
        return mask.to(device)  # plans are built (and cached) on the CPU
    return None if kind == "full" else kind_mask(kind, nq, nk, device)


def _plain_scores(q, k, scale, mask):
    s = scale * (q.float() @ k.float().transpose(-1, -2))  # [B, Hq, nq, nk]
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _plain_fwd(q, k, v, scale, mask):
    s = _plain_scores(q, k, scale, mask)
    lse = torch.logsumexp(s, dim=-1)  # [B, Hq, nq]
    # rows that see no key in this block: lse -inf, weights 0 (not NaN)
    p = torch.exp(s - lse.masked_fill(lse.isinf(), 0.0).unsqueeze(-1))
    return (p @ v.float()).to(q.dtype), lse


def _plain_bwd(do, q, k, v, o, lse, scale, mask):
    # P from the *final* lse gives this block's share of the softmax; delta = rowsum(dO * O)
    s = _plain_scores(q, k, scale, mask)
    p = torch.exp(s - lse.masked_fill(lse.isinf(), 0.0).unsqueeze(-1))  # [B, Hq, nq, nk]
    dof = do.float()
    delta = (dof * o.float()).sum(-1, keepdim=True)  # [B, Hq, nq, 1]
    dv = p.transpose(-1, -2) @ dof
    ds = p * (dof @ v.float().transpose(-1, -2) - delta)
    dq = scale * (ds @ k.float())
    dk = scale * (ds.transpose(-1, -2) @ q.float())
    return dq, dk, dv


# --- one block, either path ------------------------------------------------------------------
def block_forward(q, k, v, kind: str, scale: float, mask=None):
    """Attention of one block. q [B, Hq, nq, D], k/v [B, Hkv, nk, D].

    Returns (out [B, Hq, nq, D] in q's dtype, lse [B, Hq, nq] fp32); rows that see no key
    get out 0 and lse -inf, which the merge treats as 'nothing here'.
    """
    hq = q.shape[1]
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    if mask is not None or not _use_fused(q, k):
        mask = _plain_mask(kind, mask, q.shape[2], k.shape[2], q.device)
        return _plain_fwd(q, k, v, scale, mask)
    fwd, _ = FUSED_CPU
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    if kind != "strict":
        out, lse = fwd(q, k, v, 0.0, kind == "causal", scale=scale)
        return out, lse.float()
    # strict = causal between queries 1.. and keys ..-2; query 0 sees nothing here
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    if q.shape[2] > 1:
        o1, l1 = fwd(q[:, :, 1:], k[:, :, :-1], v[:, :, :-1], 0.0, True, scale=scale)
        out[:, :, 1:] = o1
        lse[:, :, 1:] = l1
    return out, lse


def block_backward(do, q, k, v, out, lse, kind: str, scale: float, mask=None):
    """Gradients of one block, given the FINAL out and lse of these query rows.

    Returns fp32 (dq [B, Hq, nq, D], dk [B, Hkv, nk, D], dv [B, Hkv, nk, D]).
    """
    hq, hkv = q.shape[1], k.shape[1]
    ke, ve = _expand_kv(k, hq), _expand_kv(v, hq)
    if mask is not None or not _use_fused(q, k):
        mask = _plain_mask(kind, mask, q.shape[2], k.shape[2], q.device)
        dq, dk, dv = _plain_bwd(do, q, ke, ve, out, lse, scale, mask)
        return dq, _fold_kv(dk, hkv), _fold_kv(dv, hkv)
    _, bwd = FUSED_CPU
    do, q, ke, ve, out = (_unit_stride(t.to(q.dtype)) for t in (do, q, ke, ve, out))
    lse = _unit_stride(lse)
    if kind != "strict":
        dq, dk, dv = bwd(do, q, ke, ve, out, lse, 0.0, kind == "causal", scale=scale)
    else:
        dq = torch.zeros_like(q)
        dk, dv = torch.zeros_like(ke), torch.zeros_like(ve)
        if q.shape[2] > 1:
            sl_q, sl_k = slice(1, None), slice(None, -1)
            g = bwd(do[:, :, sl_q], q[:, :, sl_q], ke[:, :, sl_k], ve[:, :, sl_k],
                    out[:, :, sl_q], lse[:, :, sl_q].contiguous(), 0.0, True, scale=scale)
            dq[:, :, sl_q], dk[:, :, sl_k], dv[:, :, sl_k] = g
    return dq.float(), _fold_kv(dk.float(), hkv), _fold_kv(dv.float(), hkv)


def merge_into(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor):
    """Exact in-place merge of a partial result into fp32 accumulators (same rows).

    out [B, H, n, D] fp32, lse [B, H, n] fp32; -inf rows on either side contribute nothing.
    """
    new_lse = torch.logaddexp(lse, blk_lse)
    safe = new_lse.masked_fill(new_lse.isinf(), 0.0)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1))
    blk = blk_out.float()  # fp32 block outputs are scratch: scaled in place, no temporary
    out.add_(blk.mul_(torch.exp(blk_lse - safe).unsqueeze(-1)))
    lse.copy_(new_lse)


# --- the public single-device kernel -----------------------------------------------------------
def _local_fwd(q, k, v, causal, scale):
    return block_forward(q, k, v, "causal" if causal else "full", scale)


def _local_bwd(do, q, k, v, out, lse, causal, scale):
    dq, dk, dv = block_backward(do, q, k, v, out, lse, "causal" if causal else "full", scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = _local_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*_local_bwd(do, q, k, v, out, lse, *ctx.args), None, None)


def local_attention(q, k, v, causal: bool = False, scale: float | None = None):
    """Single-device attention returning (out, lse) through torch's fused kernel.

    q [B, Hq, N, D]; k, v [B, Hkv, N_k, D] with Hq % Hkv == 0. Returns out [B, Hq, N, D]
    (q's dtype, differentiable) and lse [B, Hq, N] (fp32, natural log, not differentiable).
    causal needs N == N_k. Example:

    >>> q, k, v = (torch.randn(2, 4, 37, 48, requires_grad=True) for _ in range(3))
    >>> out, lse = local_attention(q, k, v, causal=True)
    >>> out.sum().backward()
    """
    check_qkv(q, k, v, same_len=False)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal local_attention needs N == N_k, got {q.shape[2]} and {k.shape[2]}")
    return _LocalAttention.apply(q, k, v, causal, default_scale(q.shape[-1], scale))


class _Empty(torch.autograd.Function):
    """The output of attention on empty inputs (like q), with zero-size gradients."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.like = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return q.new_empty(q.shape)

    @staticmethod
    def backward(ctx, _do):
        return tuple(torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.like)


def empty_attention(q, k, v) -> torch.Tensor:
    """Attention where q, k or v has no elements (B, N or D = 0): an empty out [B, Hq, N, D]
    like torch's SDPA, every gradient empty too. Needs no communication: with B, N or D
    zero on one rank (and ranks agreeing), every rank holds nothing."""
    return _Empty.apply(q, k, v)
