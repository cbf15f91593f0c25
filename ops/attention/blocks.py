"""Run one step's plan: every block of queries against the keys this rank holds now.

A plan (plan.py) lists pieces: query rows meeting key rows under a kind 'full' / 'causal' /
'strict'. With packed documents a plan has a few pieces per document. Run one kernel call
per piece and a GPU with many short documents spends its time launching kernels. So where
the varlen flash kernel takes the block (CUDA, bf16/fp16, `kernels.varlen_ok`), all the
pieces of one kind go into ONE varlen call, each piece a segment:

- forward: at most one call for the 'full' pieces and one for the 'causal' ones ('strict'
  is causal between queries 1.. and keys ..-2, so it joins the causal call), more only when
  pieces of one kind share query rows (their results must merge by log-sum-exp, so such
  pieces go to separate calls);
- backward: one call per kind; gradients of rows in several pieces simply add up.

Elsewhere (CPU, fp32 on CUDA) each piece is one `block_forward` / `block_backward` call,
merged exactly as before. Both entry points accumulate, so a ring loop calls them once per
step with its running (out, lse) or (dq, dk, dv).
"""

from __future__ import annotations

import torch

from .kernels import block_backward, block_forward, merge_into, varlen_backward, \
    varlen_forward, varlen_ok
from .plan import Piece


def _add_rows(acc, part, rows, n: int):
    """acc[..., rows, :] += part (rows: a slice or an index tensor); acc None: allocated
    only when part does not cover all n rows (a covering part becomes the accumulator)."""
    if acc is None:
        if isinstance(rows, slice) and rows == slice(0, n):
            return part
        acc = torch.zeros(part.shape[:2] + (n,) + part.shape[3:], dtype=part.dtype,
                          device=part.device)
    if isinstance(rows, slice):
        acc[:, :, rows] += part
    else:
        acc.index_add_(2, rows, part)
    return acc


def _start(q, out, lse):
    if out is None:  # fp32 accumulators with nothing seen yet
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


# --- one call per piece (every path) -------------------------------------------------------------
def _pieces_forward(q, k, v, pieces, scale, out, lse):
    for p in pieces:
        o_blk, lse_blk = block_forward(q[:, :, p.q_slice], k[:, :, p.k_slice],
                                       v[:, :, p.k_slice], p.kind, scale)
        if out is None and p.q_slice == slice(0, q.shape[2]):
            out, lse = o_blk.float(), lse_blk
            continue
        out, lse = _start(q, out, lse)
        merge_into(out[:, :, p.q_slice], lse[:, :, p.q_slice], o_blk, lse_blk)
    return out, lse


def _pieces_backward(do, q, k, v, out, lse, pieces, scale, dq, dk, dv):
    nq, nk = q.shape[2], k.shape[2]
    for p in pieces:
        qs, ks = p.q_slice, p.k_slice
        g_q, g_k, g_v = block_backward(do[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks],
                                       out[:, :, qs], lse[:, :, qs], p.kind, scale)
        dq = _add_rows(dq, g_q, qs, nq)
        dk, dv = _add_rows(dk, g_k, ks, nk), _add_rows(dv, g_v, ks, nk)
        del g_q, g_k, g_v
    return dq, dk, dv


# --- one varlen call per kind --------------------------------------------------------------------
def _by_kind(pieces) -> dict[bool, list[Piece]]:
    """{causal: pieces}: 'strict' pieces as their causal part, empty pieces dropped."""
    groups: dict[bool, list[Piece]] = {False: [], True: []}
    for p in pieces:
        if p.kind == "strict":  # query 0 sees nothing; the rest is causal one key back
            p = Piece(p.q_start + 1, p.q_len - 1, p.k_start, p.k_len - 1, "causal")
        if p.q_len > 0 and p.k_len > 0:
            groups[p.kind == "causal"].append(p)
    return groups


def _layers(pieces) -> list[list[Piece]]:
    """Pieces split into lists whose query rows do not overlap (usually one list)."""
    layers: list[list[Piece]] = []
    ends: list[int] = []
    for p in sorted(pieces, key=lambda p: p.q_start):
        for i, end in enumerate(ends):
            if end <= p.q_start:
                layers[i].append(p)
                ends[i] = p.q_start + p.q_len
                break
        else:
            layers.append([p])
            ends.append(p.q_start + p.q_len)
    return layers


class _Segments:
    """The varlen arguments of pieces over a batch of B rows: row b's copy of piece s is
    segment b * S + s; q_idx / k_idx are the pieces' local rows, concatenated."""

    def __init__(self, pieces, batch: int, device):
        def idx(rows):
            return torch.cat([torch.arange(r.start, r.stop) for r in rows]).to(device)

        def cuts(lens):
            total, per = sum(lens), [0]
            for n in lens:
                per.append(per[-1] + n)
            return torch.tensor([b * total + c for b in range(batch) for c in per[:-1]]
                                + [batch * total], dtype=torch.int32).to(device)

        self.q_idx, self.k_idx = idx(p.q_slice for p in pieces), idx(p.k_slice for p in pieces)
        self.cu_q, self.cu_k = cuts([p.q_len for p in pieces]), cuts([p.k_len for p in pieces])
        self.max_q, self.max_k = max(p.q_len for p in pieces), max(p.k_len for p in pieces)

    def args(self):
        return self.cu_q, self.cu_k, self.max_q, self.max_k


def _pack(x, idx):
    """[B, H, n, D] -> [B T, H, D]: rows idx of every batch row, in segment order."""
    return x[:, :, idx].transpose(1, 2).flatten(0, 1)


def _unpack(x, batch: int):
    """[B T, H, D] -> [B, H, T, D]."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


def _varlen_forward(q, k, v, pieces, scale, out, lse):
    b = q.shape[0]
    for causal, group in _by_kind(pieces).items():
        for layer in _layers(group):
            seg = _Segments(layer, b, q.device)
            o, l_ = varlen_forward(_pack(q, seg.q_idx), _pack(k, seg.k_idx),
                                   _pack(v, seg.k_idx), *seg.args(), causal=causal,
                                   window=None, scale=scale)
            o = _unpack(o, b).float()  # [B, Hq, T, D]
            l_ = l_.unflatten(1, (b, -1)).transpose(0, 1)  # [Hq, B T] -> [B, Hq, T]
            out, lse = _start(q, out, lse)
            acc_o, acc_l = out[:, :, seg.q_idx], lse[:, :, seg.q_idx]  # copies: rows of layer
            merge_into(acc_o, acc_l, o, l_)
            out[:, :, seg.q_idx], lse[:, :, seg.q_idx] = acc_o, acc_l
    return out, lse


def _varlen_backward(do, q, k, v, out, lse, pieces, scale, dq, dk, dv):
    b, (nq, nk) = q.shape[0], (q.shape[2], k.shape[2])
    for causal, group in _by_kind(pieces).items():
        if not group:
            continue
        seg = _Segments(group, b, q.device)
        lse_p = lse[:, :, seg.q_idx].transpose(0, 1).flatten(1)  # [Hq, B T]
        g_q, g_k, g_v = varlen_backward(
            _pack(do, seg.q_idx), _pack(q, seg.q_idx), _pack(k, seg.k_idx),
            _pack(v, seg.k_idx), _pack(out, seg.q_idx), lse_p, *seg.args(), causal=causal,
            window=None, scale=scale)
        dq = _add_rows(dq, _unpack(g_q, b).float(), seg.q_idx, nq)
        dk = _add_rows(dk, _unpack(g_k, b).float(), seg.k_idx, nk)
        dv = _add_rows(dv, _unpack(g_v, b).float(), seg.k_idx, nk)
    return dq, dk, dv


# --- entry points ---------------------------------------------------------------------------------
def plan_forward(q, k, v, pieces, scale: float, out=None, lse=None):
    """Merge the blocks of `pieces` into the running fp32 (out [B, Hq, nq, D], lse [B, Hq, nq]).

    q [B, Hq, nq, D]; k, v [B, Hkv, nk, D]. out/lse None: nothing merged yet (they stay None
    when pieces is empty; the first block covering every row becomes them, no copy).
    """
    if len(pieces) > 1 and varlen_ok(q, k):
        return _varlen_forward(q, k, v, pieces, scale, out, lse)
    return _pieces_forward(q, k, v, pieces, scale, out, lse)


def plan_backward(do, q, k, v, out, lse, pieces, scale: float, dq=None, dk=None, dv=None):
    """Add the gradients of `pieces` into fp32 (dq, dk, dv) (None: not allocated yet), given
    the FINAL out and lse of the query rows. Shapes as in `plan_forward`."""
    if len(pieces) > 1 and varlen_ok(q, k):
        return _varlen_backward(do, q, k, v, out, lse, pieces, scale, dq, dk, dv)
    return _pieces_backward(do, q, k, v, out, lse, pieces, scale, dq, dk, dv)
