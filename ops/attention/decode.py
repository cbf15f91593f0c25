"""Exact attention of a few new tokens against a KV cache sharded over ranks (decoding).

During generation every rank runs the same new tokens (their queries are replicated) while
the keys/values of the context stay where they were computed: rank r holds S_r cached keys
at arbitrary global positions (its prompt shard, then the decoded tokens appended to it).
Each rank attends over its own keys only and returns a partial result

    out_r = softmax(s_r) v_r,   lse_r = logsumexp(s_r)      s_r = scale q k_r^T + mask

and one all-gather of (out_r, lse_r) merges them exactly by log-sum-exp:

    lse = log sum_r exp(lse_r),   out = sum_r exp(lse_r - lse) out_r.

A rank with no visible key (empty cache, or all its keys masked) has lse_r = -inf and adds
nothing. The mask is positional: key position p is visible to query position t iff p <= t
(causal) and, with a window of W tokens, p > t - W (the window includes the token itself,
as everywhere in seqshard). So the cache needs no order at all: any key may sit on any rank.

The local part is plain torch in at least fp32, over runs of KEY_CHUNK keys merged the same
way (T is a handful of tokens, so a run's q k^T is [B, Hq, T, KEY_CHUNK] and no fp32 copy of
the whole cache is ever made); the merge is in fp32 too. Inference only.
"""

from __future__ import annotations

import torch

from seqshard.dist import Mesh, agree, all_gather, digest

from .checks import check_qkv
from .kernels import default_scale

# Keys per run of the local part (see local_decode). Provenance: introduced 2026-11-29 with
# decode_attention; 2-core CPU VM at load ~36, one torch thread (more threads measured the
# load, not the op), B=1, Hq=8, Hkv=2, D=64, T=1, S_local=256K: fp32 386 / 310 / 393 / 519 ms
# for one block / runs of 64K / 16K / 4K, bf16 1078 / 960 / 905 / 973 ms. 16K: within the
# noise of the fastest, and its fp32 copy of a bf16 run with 8 heads of 128 is 64 MiB.
KEY_CHUNK = 16384


def _check(q, k_cache, v_cache, key_positions, query_positions, window) -> None:
    """ValueError naming the bad argument (shapes, positions, window)."""
    check_qkv(q, k_cache, v_cache, same_len=False)
    for name, pos, n in (("key_positions", key_positions, k_cache.shape[2]),
                         ("query_positions", query_positions, q.shape[2])):
        if not isinstance(pos, torch.Tensor) or pos.dim() != 1 or pos.dtype != torch.int64:
            got = (f"{pos.dtype} {tuple(pos.shape)}" if isinstance(pos, torch.Tensor)
                   else type(pos).__name__)
            raise ValueError(f"{name} must be an int64 tensor [{n}], got {got}")
        if pos.shape[0] != n:
            raise ValueError(f"{name} has {pos.shape[0]} entries but there are {n} "
                             f"{'cached keys' if name == 'key_positions' else 'queries'}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"window={window!r} must be a positive integer (tokens seen, "
                         f"including the token itself) or None")


def visible(key_positions: torch.Tensor, query_positions: torch.Tensor,
            window: int | None) -> torch.Tensor:
    """bool [T, S]: query t may read key s (causal by position, within the window)."""
    kp, qp = key_positions[None, :], query_positions[:, None]
    mask = kp <= qp
    if window is not None:
        mask &= kp > qp - window
    return mask


def _decode_block(q, k, v, mask, scale: float):
    """(out [B, Hq, T, D], lse [B, Hq, T]) of q against one run of keys, in at least fp32.

    GQA without copying the keys per query head: the G = Hq / Hkv query heads that share a
    key head are folded into its rows, [B, Hkv, G * T, D] against [B, Hkv, S, D].
    """
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    cdt = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(cdt).reshape(b, hkv, (hq // hkv) * t, d)  # [B, Hkv, G*T, D]
    scores = scale * (qf @ k.to(cdt).transpose(-1, -2))  # [B, Hkv, G*T, S]
    scores = scores.view(b, hkv, hq // hkv, t, s).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, T]; -inf where nothing is visible
    p = torch.exp(scores - lse.masked_fill(lse.isinf(), 0.0).unsqueeze(-1))  # -inf rows: 0
    out = p.view(b, hkv, (hq // hkv) * t, s) @ v.to(cdt)  # [B, Hkv, G*T, D]
    return out.reshape(b, hq, t, d), lse.reshape(b, hq, t)


def local_decode(q, k_cache, v_cache, mask, scale: float, *, chunk: int = KEY_CHUNK):
    """This rank's partial result: (out [B, Hq, T, D], lse [B, Hq, T]) in at least fp32.

    Keys go in runs of `chunk`, merged by LSE, so the fp32 scores and the fp32 copy of a
    bf16/fp16 cache are one run's, not the whole shard's (a 256K-key bf16 shard with 8 heads
    of 128 would need a 1 GiB copy of K alone per layer per token).
    """
    s = k_cache.shape[2]
    if s <= chunk:
        return _decode_block(q, k_cache, v_cache, mask, scale)
    parts = [_decode_block(q, k_cache[:, :, i:i + chunk], v_cache[:, :, i:i + chunk],
                           mask[:, i:i + chunk], scale) for i in range(0, s, chunk)]
    return merge_partials(torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts]))


def merge_partials(outs: torch.Tensor, lses: torch.Tensor):
    """Exact LSE merge of P partial results: outs [P, B, H, T, D], lses [P, B, H, T] ->
    (out [B, H, T, D], lse [B, H, T]). Rows where every part is -inf come back lse -inf."""
    top = lses.max(dim=0).values  # [B, H, T]
    safe = top.masked_fill(top.isinf(), 0.0)
    weights = torch.exp(lses - safe)  # [P, B, H, T]; 0 for parts that saw nothing
    total = weights.sum(0)  # [B, H, T]
    out = (weights.unsqueeze(-1) * outs).sum(0) / total.clamp_min(1e-30).unsqueeze(-1)
    return out, safe + torch.log(total)


def decode_attention(q, k_cache, v_cache, key_positions, query_positions, mesh: Mesh | None,
                     *, scale: float | None = None, window: int | None = None,
                     check_agreement: bool = True) -> torch.Tensor:
    """Attention of T new tokens over a KV cache sharded across `mesh`'s sp ranks.

    q [B, Hq, T, D]: the new tokens' queries, the same on every rank. k_cache, v_cache
    [B, Hkv, S_local, D]: this rank's cache shard (S_local may differ per rank, 0 included;
    Hq % Hkv == 0). key_positions int64 [S_local]: global positions of the cached keys;
    query_positions int64 [T]: the new tokens' positions (the same on every rank). Key p is
    visible to query t iff p <= t and, with `window` W, p > t - W. scale: default D^-1/2.
    Returns out [B, Hq, T, D] in q's dtype, the same on every rank, equal to attention over
    all ranks' keys together. Any strides; float16/bfloat16/float32/float64.

    Communication: one all-gather of (out, lse) over mesh.group, [B, Hq, T, D + 1] floats per
    rank (plus, when check_agreement, one 1 KiB all-gather that checks every rank passed the
    same q shape, dtype, positions and options). mesh None or Mesh.single(): no communication.
    A query that sees no key on any rank raises ValueError on every rank (the model should
    have appended its own key first). Inference only: call under torch.no_grad().

    >>> q = torch.randn(1, 4, 1, 8)                            # one new token, 4 query heads
    >>> k = v = torch.randn(1, 2, 5, 8)                        # 5 cached keys, 2 kv heads
    >>> out = decode_attention(q, k, v, torch.arange(5), torch.tensor([4]), None)
    """
    if mesh is None:
        mesh = Mesh.single(q.device if isinstance(q, torch.Tensor) else "cpu")
    if mesh.size > 1 and check_agreement:
        try:
            _check(q, k_cache, v_cache, key_positions, query_positions, window)
            problem = None
            facts = {"q": tuple(q.shape), "dtype": q.dtype, "kv_heads": k_cache.shape[1],
                     "query_positions": digest(query_positions.tolist()), "scale": scale,
                     "window": window}
        except ValueError as err:
            problem, facts = str(err), {}
        agree(facts, mesh.group, what="decode_attention", problem=problem, timeout=mesh.timeout)
    else:
        _check(q, k_cache, v_cache, key_positions, query_positions, window)
    with torch.no_grad():
        mask = visible(key_positions.to(q.device), query_positions.to(q.device), window)
        out, lse = local_decode(q, k_cache, v_cache, mask, default_scale(q.shape[-1], scale))
        if mesh.size > 1:
            b, hq, t, d = q.shape
            # one message: out and lse side by side, fp32 (fp64 inputs keep fp64)
            packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1).unsqueeze(0)  # [1, B, Hq, T, D+1]
            parts = all_gather(packed, 0, mesh.group, timeout=mesh.timeout)  # [P, B, Hq, T, D+1]
            out, lse = merge_partials(parts[..., :d], parts[..., d])
        blind = lse.isneginf().any(dim=(0, 1))  # [T]: identical on every rank after the merge
        if bool(blind.any()):
            where = query_positions[blind.to(query_positions.device)].tolist()
            raise ValueError(f"decode_attention: the queries at positions {where} see no cached "
                             f"key on any rank (append the new tokens' keys before attending, "
                             f"and check key_positions / window={window})")
    return out.to(q.dtype)
