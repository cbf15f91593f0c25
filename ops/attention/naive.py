"""The readable reference: softmax attention on one device, the test oracle.

    s   = scale * q k^T                        # [B, Hq, Nq, Nk]
    s   = -inf where the mask forbids a pair   (causal: key j > query i; documents: different doc)
    lse = logsumexp(s, -1)                     # [B, Hq, Nq]
    out = softmax(s) v                         # [B, Hq, Nq, D]

Grouped-query attention: query head h reads key/value head h // (Hq // Hkv).
Everything runs through plain torch autograd, so its gradients are the reference too.
"""

from __future__ import annotations

import math

import torch


def doc_ids(doc_lens, seq_len: int, device=None) -> torch.Tensor:
    """Document index of every global position, from document lengths. int64 [seq_len]."""
    lens = torch.as_tensor(doc_lens, dtype=torch.int64).flatten()
    if lens.numel() == 0 or bool((lens <= 0).any()) or int(lens.sum()) != seq_len:
        raise ValueError(
            f"doc_lens={lens.tolist()} must be positive and sum to the global sequence length "
            f"{seq_len}"
        )
    return torch.repeat_interleave(torch.arange(lens.numel()), lens).to(device)


def attention_mask(
    n_q: int, n_k: int, *, causal: bool, doc_lens=None, device=None
) -> torch.Tensor | None:
    """Boolean [Nq, Nk] mask, True where query i may read key j (None: no mask at all).

    Causal aligns the last query with the last key (torch SDPA's convention for Nq == Nk).
    """
    mask = None
    if causal:
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)
    if doc_lens is not None:
        if n_q != n_k:
            raise ValueError(f"doc_lens needs as many queries as keys, got {n_q} and {n_k}")
        ids = doc_ids(doc_lens, n_k, device)
        same = ids[:, None] == ids[None, :]
        mask = same if mask is None else mask & same
    return mask


def naive_attention(q, k, v, *, causal=False, scale=None, doc_lens=None, mask=None):
    """Plain attention. q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] -> (out like q, lse [B, Hq, Nq]).

    `mask` (bool [Nq, Nk], True = may attend) overrides causal/doc_lens. Computed in fp32.
    Rows that may read no key get out 0 and lse -inf.

    >>> q = k = v = torch.randn(1, 2, 5, 8)
    >>> out, lse = naive_attention(q, k, v, causal=True)
    """
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=1)  # [B, Hq, Nk, D]
    vf = v.float().repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q.float() @ kf.transpose(-1, -2)  # [B, Hq, Nq, Nk]
    if mask is None:
        mask = attention_mask(q.shape[2], k.shape[2], causal=causal, doc_lens=doc_lens,
                              device=q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hq, Nq]
    # a row with no visible key has lse -inf: give it zero weights instead of NaN
    p = torch.exp(s - lse.masked_fill(lse.isinf(), 0.0).unsqueeze(-1))
    out = p @ vf
    return out.to(q.dtype), lse
