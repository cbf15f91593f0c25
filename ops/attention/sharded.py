"""Sharded exact attention: strategies, input checks, the SDPA drop-in and the module.

Every strategy is "move data, then run the one ring loop with a plan":

- ring:      no data moved first; K/V travel around the whole sp group (R = P).
- ulysses:   all-to-all sequence -> heads over the sp group, then the loop with R = 1 over
             the concatenated sequence, then heads -> sequence.
- hybrid:    the all-to-all over mesh.ulysses_group (u ranks), the loop over mesh.ring_group
             (R = r); a ring step's keys are the u shards of another Ulysses group.
- allgather: all-gather K/V once (backward: reduce-scatter), the loop with R = 1.

`strategy="auto"` rule: one process -> plain local attention; a mesh with both ulysses > 1
and ring > 1 -> hybrid; else ulysses when the query heads divide by P (four all-to-alls and
one full-size kernel per rank beat P ring steps on every machine we measured), otherwise ring.
"""

from __future__ import annotations

import math

import torch

from seqshard.dist import Mesh, all_gather, get_layout

from seqshard.dist.agree import agree, digest

from .checks import check_qkv
from .kernels import default_scale, empty_attention, local_attention
from .naive import doc_ids
from .plan import cached_plan
from .ring import ring_attention
from .window import check_window, window_attention

STRATEGIES = ("auto", "ring", "ulysses", "hybrid", "allgather")


# --- checks ---------------------------------------------------------------------------------------
def _check_heads(hq: int, degree: int, strategy: str) -> None:
    if hq % degree != 0:
        raise ValueError(
            f"strategy={strategy!r}: query heads {hq} are not divisible by the Ulysses degree "
            f"{degree}; use strategy='ring' or a mesh with ulysses dividing {hq}"
        )


def resolve_strategy(strategy: str, mesh: Mesh, num_heads: int) -> str:
    """The strategy `auto` picks (see the module docstring); other names pass through."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    if strategy != "auto":
        return strategy
    if mesh.ulysses_size > 1 and mesh.ring_size > 1:
        return "hybrid"
    return "ulysses" if num_heads % mesh.size == 0 else "ring"


# --- strategies --------------------------------------------------------------------------------
def _replicate_kv(x: torch.Tensor, degree: int) -> torch.Tensor:
    """Repeat K/V heads so they split over `degree` ranks keeping each query group together.

    Hkv -> Hkv * rep with rep = degree / gcd(Hkv, degree); copy j of head h sits at h * rep + j,
    so query head i still reads (expanded) head i // (Hq / (Hkv * rep)). Autograd sums copies.
    """
    rep = degree // math.gcd(x.shape[1], degree)
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _ulysses_ring(q, k, v, mesh, layout, *, causal, scale, doc_lens, a2a_group, u, ring_group,
                  r, ring_index):
    """All-to-all over `a2a_group` (u ranks), then the ring over `ring_group` (r ranks).

    sp rank = ring_index * u + ulysses_index, so ring index i holds sp ranks i*u .. i*u+u-1.
    Pure ring is u = 1; pure Ulysses is r = 1; one process is u = r = 1.
    """
    n_global = q.shape[2] * mesh.size
    if u > 1:
        k, v = _replicate_kv(k, u), _replicate_kv(v, u)
    members = [tuple(range(i * u, (i + 1) * u)) for i in range(r)]
    plans = [cached_plan(layout, n_global, mesh.size, members[ring_index],
                         members[(ring_index - s) % r], causal=causal, doc_lens=doc_lens)
             for s in range(r)]
    # the loop does the all-to-all [B, H, N/P, D] <-> [B, H/u, u*N/P, D] itself, head group
    # by head group, so no rank ever holds every head's full-sequence tensors at once
    return ring_attention(q, k, v, plans, scale, ring_group, mesh.timeout,
                          a2a_group=a2a_group if u > 1 else None)


def _allgather(q, k, v, mesh, layout, *, causal, scale, doc_lens):
    n_global = q.shape[2] * mesh.size
    # [B, Hkv, N, D] in rank-major order; backward reduce-scatters dK/dV to their owners
    k_all = all_gather(k, 2, mesh.group, timeout=mesh.timeout)
    v_all = all_gather(v, 2, mesh.group, timeout=mesh.timeout)
    plan = cached_plan(layout, n_global, mesh.size, (mesh.rank,), tuple(range(mesh.size)),
                       causal=causal, doc_lens=doc_lens)
    return ring_attention(q, k_all, v_all, [plan], scale)


def _facts(q, k, *, causal, scale, layout, strategy, doc_lens, window) -> dict:
    """What every rank must pass alike (compared by `seqshard.dist.agree.agree`)."""
    b, hq, n, d = q.shape
    docs = None if doc_lens is None else digest(torch.as_tensor(doc_lens).flatten().tolist())
    return {"B": b, "Hq": hq, "Hkv": k.shape[1], "N_local": n, "D": d, "dtype": q.dtype,
            "causal": bool(causal), "strategy": strategy, "layout": repr(get_layout(layout)),
            "window": window, "scale": scale, "doc_lens": docs,
            "grad": torch.is_grad_enabled() and q.requires_grad}


def _validate(q, k, v, mesh, *, causal, layout, strategy, window) -> None:
    """Everything one rank can check about its own arguments (ValueError on a problem)."""
    check_qkv(q, k, v)
    if window is not None:
        check_window(window, causal=causal, layout=layout, strategy=strategy, world=mesh.size)
    get_layout(layout)
    resolve_strategy(strategy, mesh, q.shape[1])


def sharded_attention(q, k, v, mesh: Mesh | None = None, *, causal: bool = False,
                      scale: float | None = None, layout="contiguous", strategy: str = "auto",
                      doc_lens=None, window: int | None = None,
                      check_agreement: bool = True) -> torch.Tensor:
    """Exact attention over a sequence sharded across `mesh`'s sequence-parallel ranks.

    q [B, Hq, N_local, D]; k, v [B, Hkv, N_local, D] with Hq % Hkv == 0 (GQA/MQA); each rank
    passes its own shard (N = N_local * P tokens in all, placed by `layout`: 'contiguous',
    'zigzag', 'striped' or a seqshard.dist.Layout). Returns out [B, Hq, N_local, D], this
    rank's rows of softmax(scale q k^T + mask) v over the GLOBAL sequence. Any strides are
    fine (transposed, head-sliced, expanded views); dtype float16/bfloat16/float32/float64.

    causal: each token sees itself and earlier global positions. scale: default D^-1/2.
    strategy: 'auto' | 'ring' | 'ulysses' | 'hybrid' | 'allgather' (auto: see module doc).
    doc_lens: lengths of packed documents over the global sequence (sum == N); tokens never
    attend across a document boundary. mesh None or Mesh.single(): plain local attention.
    window: causal sliding window of W tokens including the token itself (token t reads
    t-W+1 .. t); needs causal=True and strategy='auto'; any layout (each run of a rank's
    shard gets the W-1 keys before it, see ops/attention/window.py). W >= N is plain
    causal attention.
    check_agreement: with P > 1, first check with one small all-gather that every rank
    passed the same shapes, dtype and options, so a mismatch (or bad input on one rank)
    raises the same ValueError on every rank instead of hanging; pass False in hot loops
    whose arguments are known to agree.

    Empty inputs (B, N_local or D = 0) return an empty output with empty gradients, as
    torch's scaled_dot_product_attention does (no communication).

    Example (one process; with P ranks every rank passes its shard and the same mesh):

    >>> q, k, v = (torch.randn(2, 8, 64, 48, requires_grad=True) for _ in range(3))
    >>> out = sharded_attention(q, k, v, None, causal=True, strategy="ring")
    >>> out.sum().backward()
    """
    if mesh is None:
        check_qkv(q, k, v)  # before q.device is read
        mesh = Mesh.single(q.device)
    opts = dict(causal=causal, layout=layout, strategy=strategy, window=window)
    if mesh.size > 1 and check_agreement:
        try:
            _validate(q, k, v, mesh, **opts)
            problem, facts = None, _facts(q, k, scale=scale, doc_lens=doc_lens, **opts)
        except ValueError as err:
            problem, facts = str(err), {}
        agree(facts, mesh.group, what="sharded_attention", problem=problem,
              timeout=mesh.timeout)
    else:
        _validate(q, k, v, mesh, **opts)
    if q.numel() == 0:
        return empty_attention(q, k, v)
    if window is not None and window >= q.shape[2] * mesh.size:
        window = None  # the window covers the whole sequence: plain causal attention
    if window is not None:
        return window_attention(q, k, v, mesh, window=window, scale=scale, doc_lens=doc_lens,
                                layout=layout)
    layout = get_layout(layout)
    strategy = resolve_strategy(strategy, mesh, q.shape[1])
    if mesh.size > 1:
        layout.check(q.shape[2] * mesh.size, mesh.size)
    else:  # one process holds the whole sequence in order, whatever the layout
        layout = get_layout("contiguous")
    scale = default_scale(q.shape[-1], scale)
    if mesh.size == 1 and doc_lens is None:
        return local_attention(q, k, v, causal=causal, scale=scale)[0]
    opts = dict(causal=causal, scale=scale, doc_lens=doc_lens)
    if doc_lens is not None:
        doc_ids(doc_lens, q.shape[2] * mesh.size)  # ValueError unless they tile the sequence
    if strategy == "allgather":
        return _allgather(q, k, v, mesh, layout, **opts)
    if strategy == "ring":
        return _ulysses_ring(q, k, v, mesh, layout, a2a_group=None, u=1, ring_group=mesh.group,
                             r=mesh.size, ring_index=mesh.rank, **opts)
    if strategy == "ulysses":
        _check_heads(q.shape[1], mesh.size, strategy)
        return _ulysses_ring(q, k, v, mesh, layout, a2a_group=mesh.group, u=mesh.size,
                             ring_group=None, r=1, ring_index=0, **opts)
    _check_heads(q.shape[1], mesh.ulysses_size, strategy)  # hybrid
    return _ulysses_ring(q, k, v, mesh, layout, a2a_group=mesh.ulysses_group,
                         u=mesh.ulysses_size, ring_group=mesh.ring_group, r=mesh.ring_size,
                         ring_index=mesh.ring_rank, **opts)


# --- drop-ins ----------------------------------------------------------------------------------
def make_sdpa(mesh: Mesh | None = None, layout="contiguous", strategy: str = "auto",
              window: int | None = None, check_agreement: bool = True):
    """A function with `torch.nn.functional.scaled_dot_product_attention`'s signature that
    computes sharded attention over `mesh` (query/key/value are this rank's shards).
    `window` makes it a causal sliding window of that many tokens (then is_causal=True).
    check_agreement: see `sharded_attention`.

    attn_mask must be None (use causal or doc_lens in `sharded_attention`), dropout_p must be 0.

    >>> sdpa = make_sdpa(None)
    >>> q = torch.randn(1, 4, 10, 32)
    >>> out = sdpa(q, q, q, is_causal=True)
    """

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        if attn_mask is not None:
            raise ValueError(
                f"sharded sdpa takes no attn_mask (got a {type(attn_mask).__name__} of shape "
                f"{tuple(getattr(attn_mask, 'shape', ()))}); use is_causal=True or "
                f"sharded_attention(..., doc_lens=...)"
            )
        if dropout_p != 0.0:
            raise ValueError(f"sharded sdpa is exact: dropout_p={dropout_p} must be 0.0")
        if query.dim() == 4 and key.dim() == 4 and query.shape[1] != key.shape[1] and not enable_gqa:
            raise ValueError(
                f"query heads {query.shape[1]} != key heads {key.shape[1]}: pass enable_gqa=True"
            )
        return sharded_attention(query, key, value, mesh, causal=is_causal, scale=scale,
                                 layout=layout, strategy=strategy, window=window,
                                 check_agreement=check_agreement)

    return sdpa


class ShardedAttention(torch.nn.Module):
    """`sharded_attention` as a module (no parameters): forward(q, k, v, doc_lens=None).
    check_agreement: see `sharded_attention`.

    >>> attn = ShardedAttention(None, causal=True)
    >>> out = attn(*(torch.randn(1, 4, 12, 32) for _ in range(3)))
    """

    def __init__(self, mesh: Mesh | None = None, *, causal: bool = False,
                 scale: float | None = None, layout="contiguous", strategy: str = "auto",
                 window: int | None = None, check_agreement: bool = True):
        super().__init__()
        self.mesh, self.causal, self.scale, self.window = mesh, causal, scale, window
        self.check_agreement = check_agreement
        self.layout, self.strategy = get_layout(layout), strategy
        resolve_strategy(strategy, mesh or Mesh.single(), 1)  # reject unknown names early
        if window is not None:
            check_window(window, causal=causal, layout=layout, strategy=strategy,
                         world=1 if mesh is None else mesh.size)

    def forward(self, q, k, v, doc_lens=None):
        return sharded_attention(q, k, v, self.mesh, causal=self.causal, scale=self.scale,
                                 layout=self.layout, strategy=self.strategy, doc_lens=doc_lens,
                                 window=self.window, check_agreement=self.check_agreement)

    def extra_repr(self) -> str:
        size = 1 if self.mesh is None else self.mesh.size
        window = "" if self.window is None else f", window={self.window}"
        return (f"P={size}, causal={self.causal}, layout={self.layout.name}, "
                f"strategy={self.strategy}{window}")
