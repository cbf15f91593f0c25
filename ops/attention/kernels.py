"""Local block attention that also returns the log-sum-exp, and the exact LSE merge.

This is the ONLY module that touches torch's private fused kernels. They return the row
log-sum-exp that sharded attention needs to merge partial results, and their backward accepts
the *final* output and LSE, so a block's gradient is recomputed flash-attention style without
storing its probabilities (what PyTorch's own context parallel does). Per block, `choose_path`
picks one of:

- 'cpu':       `_scaled_dot_product_flash_attention_for_cpu` (any float dtype, any head dim);
- 'flash':     CUDA bf16/fp16 with head dim <= 256: `_scaled_dot_product_flash_attention`;
- 'efficient': other CUDA float16/bfloat16/float32 blocks: `_scaled_dot_product_efficient_attention`
               with compute_log_sumexp=True (its LSE comes padded along N: sliced to the rows);
- 'plain':     plain torch in query tiles (plain.py): float64 on CUDA, empty blocks, or a torch
               whose private kernels changed. On CUDA it warns once, saying why.

Packed documents and sliding windows on CUDA (bf16/fp16, head dim <= 256) take the varlen
flash kernel `_flash_attention_forward/_backward` instead (`varlen_ok`, `varlen_attention`):
many segments in one call, each a run of queries against a run of keys, with an optional
window; see `varlen_forward`.

Every private schema is pinned in SCHEMAS and compared with torch's by
tests/test_kernel_schemas.py; a changed one makes its path unavailable (the plain path runs).

A block is a piece of queries [B, Hq, nq, D] meeting a piece of keys/values [B, Hkv, nk, D]
under one kind: 'full', 'causal' (query i sees keys <= i, nq == nk) or 'strict' (keys < i).
Packed documents never reach here as masks: plans cut them into such blocks (plan.py).
Dropout is always 0: attention here is exact.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
import torch.nn.functional as F

from ..dtypes import compute_dtype
from .checks import check_qkv
from .plain import check_kind, plain_backward, plain_forward

# The exact schemas this module was written against; tests/test_kernel_schemas.py compares
# them with torch's (the CUDA ops' schemas are registered in CPU builds too).
SCHEMAS = {
    "_scaled_dot_product_flash_attention_for_cpu":
    "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, "
    "float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) "
    "-> (Tensor output, Tensor logsumexp)",
    "_scaled_dot_product_flash_attention_for_cpu_backward":
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, Tensor query, "
    "Tensor key, Tensor value, Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, *, "
    "Tensor? attn_mask=None, float? scale=None) -> (Tensor grad_query, Tensor grad_key, "
    "Tensor grad_value)",
    "_scaled_dot_product_flash_attention":
    "aten::_scaled_dot_product_flash_attention(Tensor query, Tensor key, Tensor value, "
    "float dropout_p=0., bool is_causal=False, bool return_debug_mask=False, *, "
    "float? scale=None) -> (Tensor output, Tensor logsumexp, Tensor cum_seq_q, "
    "Tensor cum_seq_k, SymInt max_q, SymInt max_k, Tensor rng_state, Tensor unused, "
    "Tensor debug_attn_mask)",
    "_scaled_dot_product_flash_attention_backward":
    "aten::_scaled_dot_product_flash_attention_backward(Tensor grad_out, Tensor query, "
    "Tensor key, Tensor value, Tensor out, Tensor logsumexp, Tensor cum_seq_q, "
    "Tensor cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, "
    "Tensor philox_seed, Tensor philox_offset, *, float? scale=None) -> (Tensor grad_query, "
    "Tensor grad_key, Tensor grad_value)",
    "_scaled_dot_product_efficient_attention":
    "aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, Tensor value, "
    "Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, *, "
    "float? scale=None) -> (Tensor output, Tensor log_sumexp, Tensor philox_seed, "
    "Tensor philox_offset)",
    "_scaled_dot_product_efficient_attention_backward":
    "aten::_scaled_dot_product_efficient_attention_backward(Tensor grad_out_, Tensor query, "
    "Tensor key, Tensor value, Tensor attn_bias, Tensor out, Tensor logsumexp, "
    "Tensor philox_seed, Tensor philox_offset, float dropout_p, bool[4] grad_input_mask, "
    "bool is_causal=False, *, float? scale=None) -> (Tensor, Tensor, Tensor, Tensor)",
    "_flash_attention_forward":
    "aten::_flash_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? cum_seq_q, "
    "Tensor? cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, "
    "bool return_debug_mask, *, float? scale=None, SymInt? window_size_left=None, "
    "SymInt? window_size_right=None, Tensor? seqused_k=None, Tensor? alibi_slopes=None, "
    "Tensor? block_table=None, int? num_splits=None) -> (Tensor output, "
    "Tensor softmax_logsumexp, Tensor rng_state, Tensor unused, Tensor debug_attn_mask)",
    "_flash_attention_backward":
    "aten::_flash_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
    "Tensor out, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, "
    "SymInt max_k, float dropout_p, bool is_causal, Tensor rng_state, Tensor unused, *, "
    "float? scale=None, SymInt? window_size_left=None, SymInt? window_size_right=None) "
    "-> (Tensor, Tensor, Tensor)",
}


def _load(fwd_name: str, bwd_name: str | None = None):
    """(forward, backward) overloads of a private kernel, or None when torch lacks them or
    their schemas differ from SCHEMAS."""
    ops = []
    for name in (fwd_name, bwd_name or fwd_name + "_backward"):
        try:
            op = getattr(torch.ops.aten, name).default
        except (AttributeError, RuntimeError):
            return None
        if str(op._schema) != SCHEMAS[name]:
            return None
        ops.append(op)
    return tuple(ops)


FUSED_CPU = _load("_scaled_dot_product_flash_attention_for_cpu")
FLASH_CUDA = _load("_scaled_dot_product_flash_attention")
EFFICIENT_CUDA = _load("_scaled_dot_product_efficient_attention")
VARLEN_CUDA = _load("_flash_attention_forward", "_flash_attention_backward")

FLASH_MAX_HEAD_DIM = 256  # the largest head dim torch's flash kernel takes
HEAD_DIM_MULTIPLE = 8  # the CUDA kernels want a head dim that divides by this: pad with zeros
# The efficient kernel's LSE is padded along N to a multiple of this (some builds; we slice)
EFFICIENT_LSE_ROWS = 32
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Test-only: route `meta` tensors through the CUDA branch (see `cuda_paths_on_meta`)
_META_AS_CUDA = [False]
_WARNED: set = set()  # plain-path reasons already warned about (once per process each)


@contextlib.contextmanager
def cuda_paths_on_meta():
    """Test-only switch: while active, blocks on the `meta` device take the CUDA paths, so
    CPU-only CI checks their shapes, dtypes, LSE slicing and GQA folding. Never on by default."""
    _META_AS_CUDA[0] = True
    try:
        yield
    finally:
        _META_AS_CUDA[0] = False


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or (t.device.type == "meta" and _META_AS_CUDA[0])


def choose_path(q: torch.Tensor, k: torch.Tensor) -> tuple[str, str]:
    """(path, why) for a block q [B, Hq, nq, D] against k [B, Hkv, nk, D]: 'cpu', 'flash',
    'efficient' or 'plain' (see the module docstring). `why` explains a plain path."""
    if q.numel() == 0 or k.numel() == 0:
        return "plain", "empty block"  # the fused kernels divide by B, N or D
    if _on_cuda(q):
        if q.dtype not in CUDA_DTYPES:
            return "plain", f"dtype {q.dtype} has no fused CUDA attention kernel"
        if (q.dtype != torch.float32 and q.shape[-1] <= FLASH_MAX_HEAD_DIM
                and FLASH_CUDA is not None):
            return "flash", ""
        if EFFICIENT_CUDA is not None:
            return "efficient", ""
        return "plain", "torch's fused CUDA kernels changed (see SCHEMAS)"
    if q.device.type == "cpu" and FUSED_CPU is not None:
        return "cpu", ""
    return "plain", f"no fused kernel for device {q.device.type}"


def _plain_warning(q, why: str) -> None:
    if _on_cuda(q) and why != "empty block" and why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"seqshard attention runs the plain-torch path on CUDA ({why}): "
                      f"O(tile x keys) memory but much slower than the fused kernels",
                      RuntimeWarning, stacklevel=3)


def default_scale(head_dim: int, scale: float | None) -> float:
    """scale, or D^-1/2. With D = 0 every logit is an empty sum (0) whatever the scale: 1."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t with stride 1 in its last dim, which the private fused kernels assume without
    checking (public SDPA ensures it before calling them). Copies only when needed: a
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


def _pad_head_dim(t: torch.Tensor) -> torch.Tensor:
    """Zero columns up to a head dim the CUDA kernels take: zeros add nothing to q k^T (the
    scale is always passed explicitly), give zero output columns and zero gradient columns,
    which are sliced away."""
    extra = -t.shape[-1] % HEAD_DIM_MULTIPLE
    return t if extra == 0 else F.pad(t, (0, extra))


# --- the fused kernels: one call = 'full' or square 'causal' on expanded heads ------------------
def _fused_fwd(path, q, k, v, causal: bool, scale: float):
    """(out [B, H, nq, Dv] in q's dtype, lse [B, H, nq] fp32) of one fused call."""
    if path == "cpu":
        out, lse = FUSED_CPU[0](q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    d = q.shape[-1]
    q, k, v = (_unit_stride(_pad_head_dim(t)) for t in (q, k, v))
    if path == "flash":
        out, lse = FLASH_CUDA[0](q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:  # efficient: its LSE has (some builds) padded rows beyond nq
        out, lse = EFFICIENT_CUDA[0](q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        lse = lse[:, :, :q.shape[2]]
    return out[..., :d], lse.float()


def _fused_bwd(path, do, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) of one fused call from the FINAL out and lse of its rows."""
    if path == "cpu":
        # the kernel keeps its LSE in the accumulation dtype: fp64 for fp64 inputs, else fp32
        acc = compute_dtype(q.dtype)
        return FUSED_CPU[1](do, q, k, v, out, lse.to(acc).contiguous(), 0.0, causal,
                            scale=scale)
    d, (nq, nk) = q.shape[-1], (q.shape[2], k.shape[2])
    do, q, k, v, out = (_unit_stride(_pad_head_dim(t)) for t in (do, q, k, v, out))
    lse = lse.float().contiguous()
    if path == "flash":
        # dropout is 0, so the kernel never reads the RNG state: empty stand-ins
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        grads = FLASH_CUDA[1](do, q, k, v, out, lse, None, None, nq, nk, 0.0, causal,
                              seed, offset, scale=scale)
    else:  # efficient: give back the LSE in the padded shape its forward returns
        lse = F.pad(lse, (0, -nq % EFFICIENT_LSE_ROWS))
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        grads = EFFICIENT_CUDA[1](do, q, k, v, None, out, lse, seed, seed, 0.0,
                                  [True, True, True, False], causal, scale=scale)[:3]
    return tuple(g[..., :d] for g in grads)


# --- one block, whichever path -------------------------------------------------------------------
def _prepare(q, k, kind: str):
    check_kind(kind)
    path, why = choose_path(q, k)
    if path == "plain":
        _plain_warning(q, why)
    return path


def block_forward(q, k, v, kind: str, scale: float):
    """Attention of one block. q [B, Hq, nq, D], k/v [B, Hkv, nk, D].

    Returns (out [B, Hq, nq, D] in q's dtype, lse [B, Hq, nq] fp32); rows that see no key
    get out 0 and lse -inf, which the merge treats as 'nothing here'.
    """
    path = _prepare(q, k, kind)
    hq = q.shape[1]
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    if path == "plain":
        return plain_forward(q, k, v, kind, scale)
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    if kind != "strict":
        return _fused_fwd(path, q, k, v, kind == "causal", scale)
    # strict = causal between queries 1.. and keys ..-2; query 0 sees nothing here
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    if q.shape[2] > 1:
        o1, l1 = _fused_fwd(path, q[:, :, 1:], k[:, :, :-1], v[:, :, :-1], True, scale)
        out[:, :, 1:] = o1
        lse[:, :, 1:] = l1
    return out, lse


def block_backward(do, q, k, v, out, lse, kind: str, scale: float):
    """Gradients of one block, given the FINAL out and lse of these query rows.

    Returns fp32 (dq [B, Hq, nq, D], dk [B, Hkv, nk, D], dv [B, Hkv, nk, D]).
    """
    path = _prepare(q, k, kind)
    hq, hkv = q.shape[1], k.shape[1]
    ke, ve = _expand_kv(k, hq), _expand_kv(v, hq)
    if path == "plain":
        dq, dk, dv = plain_backward(do, q, ke, ve, out, lse, kind, scale)
        return dq, _fold_kv(dk, hkv), _fold_kv(dv, hkv)
    do, q, ke, ve, out = (_unit_stride(t.to(q.dtype)) for t in (do, q, ke, ve, out))
    if kind != "strict":
        dq, dk, dv = _fused_bwd(path, do, q, ke, ve, out, lse, kind == "causal", scale)
    else:
        dq = torch.zeros_like(q)
        dk, dv = torch.zeros_like(ke), torch.zeros_like(ve)
        if q.shape[2] > 1:
            sl_q, sl_k = slice(1, None), slice(None, -1)
            g = _fused_bwd(path, do[:, :, sl_q], q[:, :, sl_q], ke[:, :, sl_k], ve[:, :, sl_k],
                           out[:, :, sl_q], lse[:, :, sl_q], True, scale)
            dq[:, :, sl_q], dk[:, :, sl_k], dv[:, :, sl_k] = g
    return dq.float(), _fold_kv(dk.float(), hkv), _fold_kv(dv.float(), hkv)


# --- the varlen flash kernel: many (query run, key run) segments in one call --------------------
def varlen_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True when q [.., Hq, D] / k on CUDA can take the varlen flash kernel: bf16/fp16, head
    dim <= 256, non-empty, and this torch's schema as pinned. Else callers keep their path."""
    return (VARLEN_CUDA is not None and q.numel() > 0 and k.numel() > 0 and _on_cuda(q)
            and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= FLASH_MAX_HEAD_DIM)


@functools.cache
def varlen_lse_is_packed() -> bool:
    """The layout of this torch's varlen LSE, read from its meta implementation: True for
    [H, total_q] (rows packed like the queries), False for [S, H, max_q] (padded per
    segment, older flash-attn builds). The backward wants the same layout back."""
    q = torch.empty(3, 1, 8, dtype=torch.float16, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    return VARLEN_CUDA[0](q, q, q, cu, cu, 2, 2, 0.0, False, False, scale=1.0)[1].dim() == 2


def _segment_rows(cu_q: torch.Tensor, total: int):
    """(segment id, row within the segment) of every packed query row, int64 [total] each."""
    lens = cu_q.diff().long()
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=cu_q.device), lens,
                                  output_size=total)
    return seg, torch.arange(total, device=cu_q.device) - cu_q[:-1].long()[seg]


def lse_to_packed(lse: torch.Tensor, cu_q: torch.Tensor, total: int) -> torch.Tensor:
    """The kernel's LSE -> [H, total] fp32 (padded [S, H, max_q] rows gathered)."""
    if lse.dim() == 2:
        return lse.float()
    seg, row = _segment_rows(cu_q, total)
    return lse[seg, :, row].float().t()  # [total, H] -> [H, total]


def lse_from_packed(lse: torch.Tensor, cu_q: torch.Tensor, max_q: int) -> torch.Tensor:
    """[H, total] -> the layout this torch's kernel returns (and its backward takes)."""
    lse = lse.float().contiguous()
    if varlen_lse_is_packed():
        return lse
    seg, row = _segment_rows(cu_q, lse.shape[1])
    out = lse.new_zeros(cu_q.numel() - 1, lse.shape[0], max_q)  # [S, H, max_q]
    out[seg, :, row] = lse.t()
    return out


def _window_args(causal: bool, window: int | None) -> dict:
    # the kernel's window: key j visible from query i iff i' - left <= j <= i' + right, where
    # i' = i + nk - nq (the diagonal is bottom-right aligned in every segment); None = no
    # limit on that side. A causal call always has right = 0.
    return dict(window_size_left=None if window is None else window - 1,
                window_size_right=0 if causal else None)


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool,
                   window: int | None, scale: float):
    """One varlen flash call. q [Tq, Hq, D], k/v [Tk, Hkv, D] (Hq % Hkv == 0: the kernel
    shares kv heads itself), bf16/fp16; segment s is query rows cu_q[s]:cu_q[s+1] against
    key rows cu_k[s]:cu_k[s+1] (cu_* int32 [S+1] on q's device). causal: query i of a
    segment sees its keys up to i + nk - nq (bottom-right: a query run that ends where its
    key run ends sees keys up to itself); window W: and no key more than W - 1 before that.
    Returns (out [Tq, Hq, D] in q's dtype, lse [Hq, Tq] fp32). Every query must see a key."""
    d = q.shape[-1]
    q, k, v = (_unit_stride(_pad_head_dim(t)) for t in (q, k, v))
    out, lse = VARLEN_CUDA[0](q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                              scale=scale, **_window_args(causal, window))[:2]
    return out[..., :d], lse_to_packed(lse, cu_q, q.shape[0])


def varlen_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, *,
                    causal: bool, window: int | None, scale: float):
    """Gradients of `varlen_forward` from the FINAL out and lse [Hq, Tq] of its rows:
    (dq [Tq, Hq, D], dk, dv [Tk, Hkv, D]) in q's dtype (kv heads folded by the kernel)."""
    d = q.shape[-1]
    do, q, k, v, out = (_unit_stride(_pad_head_dim(t.to(q.dtype))) for t in (do, q, k, v, out))
    # dropout is 0, so the kernel never reads the RNG state: empty stand-ins
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    grads = VARLEN_CUDA[1](do, q, k, v, out, lse_from_packed(lse, cu_q, max_q), cu_q, cu_k,
                           max_q, max_k, 0.0, causal, seed, offset, scale=scale,
                           **_window_args(causal, window))
    return tuple(g[..., :d] for g in grads)


class _Varlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, window, scale):
        args = (cu_q, cu_k, max_q, max_k)
        kw = dict(causal=causal, window=window, scale=scale)
        out, lse = varlen_forward(q, k, v, *args, **kw)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, kw)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, kw = ctx.args
        grads = varlen_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, **kw)
        return (*grads, *(None,) * 7)


def varlen_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool,
                     window: int | None, scale: float) -> torch.Tensor:
    """Differentiable `varlen_forward` (its out only: the segments are whole attentions, so
    their LSE is final). Same arguments; check `varlen_ok` first."""
    return _Varlen.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, scale)


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
