"""Moving a sliding window's keys on layouts other than contiguous (used by window.py).

Two mechanisms, chosen by how many runs of the sequence a rank holds (`Layout.runs`):

- A few runs (zigzag: 2). Every run needs the W-1 keys before it, wherever they sit.
  `halo_pieces` cuts that interval into pieces by owner (rank, local offset), from the
  layout's runs alone, so every rank knows what every other rank needs without talking.
  `gather_run_halos` then sends, for each distance d = (receiver - owner) mod P that occurs
  anywhere, ONE message per rank to rank r+d, carrying every piece it owes that rank
  (zero-padded to the longest such message, so that all ranks post equal shapes; receivers
  slice the padding away); the messages of all distances go out as one batch. Zigzag with W-1 <= N/(2P): distances 1 and
  P-1 (the first run's halo is on rank r-1, the second's on rank r+1), so two hops, one
  for P = 2; the last rank's second run is preceded by its own first run (no message).
- Many runs (striped: N/P runs of one token). The W-1 keys before a token sit on
  min(W-1, P-1) other ranks, so the union of a rank's halos is min(W-1, P-1) whole shards:
  for W >= P every rank would receive every other rank's K/V, the whole sequence. Instead
  `relayout` (seqshard.dist.relayout) moves each token once, straight to its owner in the
  contiguous layout (one batch of point-to-point messages), where the
  halo is W-1 tokens from the previous ranks; the output comes back the same way. That moves
  (2 Hq + 2 Hkv) n (P-1)/P head-rows per rank against 2 Hkv n min(W-1, P-1) for the halos
  (for MHA: no more once W > 2, less once P > 2 too), and never holds more than a shard
  plus the halo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqshard.dist import Layout, Mesh, exchange
from seqshard.dist.collectives import group_rank, group_size
from seqshard.dist.relayout import relayout  # noqa: F401  (window.py's striped path)

# A layout whose ranks hold at most this many runs exchanges halos; more runs re-layout.
# Zigzag holds 2, striped N/P; the plan costs O(P^2 runs^2) host work per call.
MAX_HALO_RUNS = 8


@dataclass(frozen=True)
class Piece:
    """Part of the halo of a receiver's run `run`: `length` keys from global `start` on,
    held by rank `src` at local offset `src_start`."""

    run: int
    src: int
    src_start: int
    length: int
    start: int


def halo_pieces(layout: Layout, seq_len: int, world: int, rank: int, window: int) -> list[Piece]:
    """The pieces of the W-1 keys before each of `rank`'s runs, by run then position."""
    owners = []  # (global start, length, rank, local offset) of every run of every rank
    for b in range(world):
        offset = 0
        for start, length in layout.runs(seq_len, b, world):
            owners.append((start, length, b, offset))
            offset += length
    pieces = []
    for i, (start, _) in enumerate(layout.runs(seq_len, rank, world)):
        lo = max(0, start - (window - 1))
        for o_start, o_len, b, offset in owners:
            a, e = max(lo, o_start), min(start, o_start + o_len)
            if a < e:
                pieces.append(Piece(i, b, offset + a - o_start, e - a, a))
    return sorted(pieces, key=lambda p: (p.run, p.start))


class _Shifts(torch.autograd.Function):
    """Ring shifts by several distances posted as ONE batch (forward, and backward in
    reverse): separate `ring_shift`s would have their backwards ordered by each rank's own
    autograd graph, which differs by rank here, and two ranks waiting on different shifts
    deadlock."""

    @staticmethod
    def forward(ctx, group, timeout, distances, *messages):
        ctx.args = (group, timeout, distances)
        world, me = group_size(group), group_rank(group)
        sends = [(x, (me + d) % world) for d, x in zip(distances, messages)]
        recvs = [(torch.empty_like(x, memory_format=torch.contiguous_format), (me - d) % world)
                 for d, x in zip(distances, messages)]
        return tuple(exchange(sends, recvs, group, timeout=timeout, op="window_halo").wait())

    @staticmethod
    def backward(ctx, *grads):
        group, timeout, distances = ctx.args
        world, me = group_size(group), group_rank(group)
        sends = [(g, (me - d) % world) for d, g in zip(distances, grads)]
        recvs = [(torch.empty_like(g, memory_format=torch.contiguous_format), (me + d) % world)
                 for d, g in zip(distances, grads)]
        back = exchange(sends, recvs, group, timeout=timeout, op="window_halo").wait()
        return (None, None, None, *back)


def gather_run_halos(k, v, mesh: Mesh, layout: Layout, window: int) -> list[torch.Tensor]:
    """Stacked K/V halos [2, B, Hkv, h_i, D], oldest first, one per run of this rank.

    k, v [B, Hkv, n, D]. One `ring_shift` per distance between an owner and a receiver of
    some piece (the same list on every rank, so all ranks run the same collectives forward
    and backward; the backward of a shift returns the halo's dK/dV to its owner).
    """
    world, me, n = mesh.size, mesh.rank, k.shape[2]
    seq_len = n * world
    plans = [halo_pieces(layout, seq_len, world, r, window) for r in range(world)]
    kv = torch.stack((k, v))  # [2, B, Hkv, n, D]

    def rows(p: Piece) -> torch.Tensor:
        return kv[:, :, :, p.src_start:p.src_start + p.length]

    got: dict[int, torch.Tensor] = {i: rows(p) for i, p in enumerate(plans[me]) if p.src == me}
    # an empty slice of every received message joins the first halo, so each shift stays in
    # the graph even where this rank uses none of it: its backward must run on every rank
    anchors = []
    distances = sorted({(r - p.src) % world for r in range(world) for p in plans[r]} - {0})
    messages = []
    for d in distances:
        # every rank sends what rank me+d needs from it, padded to the longest message
        width = max(sum(p.length for p in plans[r] if p.src == (r - d) % world)
                    for r in range(world))
        sends = [rows(p) for p in plans[(me + d) % world] if p.src == me]
        used = sum(x.shape[3] for x in sends)
        sends.append(kv.new_zeros(kv.shape[:3] + (width - used, kv.shape[4])))
        messages.append(torch.cat(sends, dim=3))  # [2, B, Hkv, width, D]
    received = _Shifts.apply(mesh.group, mesh.timeout, tuple(distances), *messages) if distances else ()
    for d, recv in zip(distances, received):
        anchors.append(recv[:, :, :, :0])
        offset = 0  # the pieces arrive in the sender's order, which is our plan's order
        for i, p in enumerate(plans[me]):
            if p.src == (me - d) % world:
                got[i] = recv[:, :, :, offset:offset + p.length]
                offset += p.length
    runs = len(layout.runs(seq_len, me, world))
    halos = []
    for run in range(runs):
        parts = [got[i] for i, p in enumerate(plans[me]) if p.run == run]
        if run == 0:
            parts = anchors + parts
        halos.append(torch.cat(parts, dim=3) if parts else kv[:, :, :, :0])
    return halos
