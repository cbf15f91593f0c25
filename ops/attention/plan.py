"""Plans: which local query pieces meet which key pieces, under which block kind.

Every strategy ends in the same situation: this rank holds the queries of some sequence
shards ("members", sp ranks whose shards are concatenated in rank order) and, at each ring
step, the keys of some other members. A plan lists the blocks to compute. It is derived from
`layout.causal_blocks` of the member pairs (so contiguous, zigzag and striped layouts are
data, not code), refined by packed-document boundaries, and then coalesced so that, e.g.,
contiguous Ulysses runs as one causal kernel call instead of u^2 small ones.

Documents never become masks: a block is cut at document boundaries into same-document
sub-blocks, and a sub-block whose diagonal is misaligned (striped shards) into at most three
'full'/'causal' pieces (`_band_pieces`). So every piece runs on a fused kernel and a plan
costs O(pieces) memory, never an [nq, nk] mask.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from seqshard.dist import Layout

from .naive import doc_ids


@dataclass(frozen=True)
class Piece:
    """q[..., q_start:q_start+q_len, :] meets k/v[..., k_start:k_start+k_len, :].

    kind: 'full' | 'causal' | 'strict' (see dist.Block); pieces of one plan may share query
    rows (their results merge by log-sum-exp).
    """

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    kind: str

    @property
    def q_slice(self) -> slice:
        return slice(self.q_start, self.q_start + self.q_len)

    @property
    def k_slice(self) -> slice:
        return slice(self.k_start, self.k_start + self.k_len)


def _member_blocks(layout, seq_len, world, q_members, k_members, causal) -> list[Piece]:
    n = seq_len // world
    if not causal:
        return [Piece(0, n * len(q_members), 0, n * len(k_members), "full")]
    pieces = []
    for qi, a in enumerate(q_members):
        for ki, b in enumerate(k_members):
            for blk in layout.causal_blocks(seq_len, a, b, world):
                pieces.append(Piece(qi * n + blk.q_start, blk.q_len, ki * n + blk.k_start,
                                    blk.k_len, blk.kind))
    return pieces


def _positions(layout, seq_len, world, members) -> torch.Tensor:
    return torch.cat([layout.positions(seq_len, m, world) for m in members])


def _is_run(pos: torch.Tensor) -> bool:
    """True when positions are one ascending run of consecutive tokens."""
    return bool((pos == torch.arange(int(pos[0]), int(pos[0]) + pos.numel())).all())


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Merge 'full' blocks that tile a larger rectangle (adjacent along k, then along q)."""
    changed = True
    while changed:
        changed = False
        pieces = sorted(pieces, key=lambda p: (p.kind != "full", p.q_start, p.k_start))
        out: list[Piece] = []
        for p in pieces:
            last = out[-1] if out else None
            if last is not None and last.kind == p.kind == "full":
                if last.q_slice == p.q_slice and last.k_start + last.k_len == p.k_start:
                    out[-1] = Piece(last.q_start, last.q_len, last.k_start, last.k_len + p.k_len, "full")
                    changed = True
                    continue
                if last.k_slice == p.k_slice and last.q_start + last.q_len == p.q_start:
                    out[-1] = Piece(last.q_start, last.q_len + p.q_len, last.k_start, last.k_len, "full")
                    changed = True
                    continue
            out.append(p)
        pieces = out
    return pieces


def _doc_runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of equal document id: (local start, length, doc id)."""
    cut = torch.nonzero(ids[1:] != ids[:-1]).flatten().add(1).tolist()
    starts = [0] + cut
    ends = cut + [ids.numel()]
    return [(a, b - a, int(ids[a])) for a, b in zip(starts, ends)]


def _band_pieces(q0: int, qn: int, k0: int, kn: int, off: int) -> list[Piece]:
    """Pieces for rows [q0, q0+qn) x keys [k0, k0+kn) where local key j is visible from local
    query i iff j - i <= off (a diagonal anywhere): rows i < -off see nothing; rows that reach
    the last key see every key ('full'); the rows between see keys [0, i + off] -- a 'full'
    rectangle of the keys they all see and a square 'causal' diagonal."""
    r0 = max(0, -off)
    r1 = min(max(kn - off, r0), qn)  # rows [r1, qn) see every key
    pieces = [Piece(q0 + r1, qn - r1, k0, kn, "full")] if r1 < qn else []
    m, seen = r1 - r0, r0 + off  # rows [r0, r1) all see keys [0, seen), then a diagonal
    if m > 0:
        if seen > 0:
            pieces.append(Piece(q0 + r0, m, k0, seen, "full"))
        pieces.append(Piece(q0 + r0, m, k0 + seen, m, "causal"))
    return pieces


def _doc_pieces(p: Piece, qa: int, qn: int, ka: int, kn: int) -> list[Piece]:
    """The part of block p between rows [qa, qa+qn) and columns [ka, ka+kn) (block
    coordinates, one document on both sides), as fused-kernel pieces."""
    q0, k0 = p.q_start + qa, p.k_start + ka
    if p.kind == "full":
        return [Piece(q0, qn, k0, kn, "full")]
    reach = 0 if p.kind == "causal" else -1  # key j visible from query i iff j - i <= reach
    if qa == ka and qn == kn:
        return [Piece(q0, qn, k0, kn, p.kind)]  # the diagonal of one document
    return _band_pieces(q0, qn, k0, kn, qa + reach - ka)


def _split_docs(pieces, q_docs, k_docs) -> list[Piece]:
    """Cut every block at document boundaries into same-document sub-blocks; keep those that
    have a visible pair."""
    out = []
    for p in pieces:
        k_runs = _doc_runs(k_docs[p.k_slice])
        for qa, qn, doc in _doc_runs(q_docs[p.q_slice]):
            for ka, kn, k_doc in k_runs:
                if k_doc == doc:
                    out.extend(_doc_pieces(p, qa, qn, ka, kn))
    return out


def build_plan(layout: Layout, seq_len: int, world: int, q_members, k_members, *,
               causal: bool, doc_lens=None) -> list[Piece]:
    """Blocks for local queries of `q_members` against local keys of `k_members`."""
    q_members, k_members = tuple(q_members), tuple(k_members)
    q_pos = _positions(layout, seq_len, world, q_members)
    k_pos = _positions(layout, seq_len, world, k_members)
    if causal and q_members == k_members and _is_run(q_pos):
        # the concatenation is already in global order: one causal block
        pieces = [Piece(0, q_pos.numel(), 0, k_pos.numel(), "causal")]
    else:
        pieces = _coalesce(_member_blocks(layout, seq_len, world, q_members, k_members, causal))
    if doc_lens is not None:
        ids = doc_ids(doc_lens, seq_len)
        pieces = _split_docs(pieces, ids[q_pos], ids[k_pos])
    return pieces


_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 512


def cached_plan(layout: Layout, seq_len: int, world: int, q_members, k_members, *,
                causal: bool, doc_lens=None) -> list[Piece]:
    """`build_plan`, memoised: a training step asks for the same plans every layer."""
    docs = None if doc_lens is None else tuple(torch.as_tensor(doc_lens).flatten().tolist())
    key = (type(layout), repr(layout), seq_len, world, tuple(q_members), tuple(k_members),
           causal, docs)
    plan = _CACHE.get(key)
    if plan is None:
        plan = build_plan(layout, seq_len, world, q_members, k_members, causal=causal,
                          doc_lens=docs)
        _CACHE[key] = plan
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return plan
