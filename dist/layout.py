"""Sequence layouts: how one global sequence maps onto the ranks of a sequence-parallel group.

- contiguous: rank i holds tokens [i N/P, (i+1) N/P).
- zigzag: the sequence is cut into 2P chunks; rank i holds chunks i and 2P-1-i, so every rank
  does the same amount of causal-attention work.
- striped: rank i holds tokens i, i+P, i+2P, ... (token-level round robin).

A layout answers three questions and nobody re-derives them: which global positions a rank
holds (`positions`), which pieces of the sequence those are (`runs`), and, for causal ops,
which (query piece, key piece) pairs of two ranks meet under which block kind (`causal_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collectives import all_gather


@dataclass(frozen=True)
class Block:
    """A (query piece, key piece) pair that meets in causal attention.

    Offsets index the *local* shards (query rank's and key rank's). kind is
    'full' (every query sees every key), 'causal' (query i sees keys <= i, same length), or
    'strict' (query i sees keys < i, same length).
    """

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    kind: str


class Layout:
    """Base class. Subclasses define `divisor` and `runs`."""

    name = "layout"

    def divisor(self, world: int) -> int:
        """The global sequence length must be a multiple of this."""
        raise NotImplementedError

    def runs(self, seq_len: int, rank: int, world: int) -> list[tuple[int, int]]:
        """The (global_start, length) pieces a rank holds, in local order."""
        raise NotImplementedError

    # --- checks ------------------------------------------------------------------------------
    def check(self, seq_len: int, world: int) -> None:
        d = self.divisor(world)
        if seq_len % d != 0:
            raise ValueError(
                f"sequence length {seq_len} does not divide across {world} ranks with the "
                f"{self.name} layout (needs a multiple of {d}); pad it with "
                f"seqshard.dist.pad_to_multiple(x, dim, {d})"
            )

    def local_len(self, seq_len: int, world: int) -> int:
        self.check(seq_len, world)
        return seq_len // world

    # --- positions ---------------------------------------------------------------------------
    def positions(self, seq_len: int, rank: int, world: int) -> torch.Tensor:
        """Global token positions held by `rank`, in local order. int64 [seq_len // world]."""
        self.check(seq_len, world)
        return torch.cat([torch.arange(s, s + n) for s, n in self.runs(seq_len, rank, world)])

    def permutation(self, seq_len: int, world: int) -> torch.Tensor:
        """Global positions of the rank-major concatenation of all shards. int64 [seq_len]."""
        return torch.cat([self.positions(seq_len, r, world) for r in range(world)])

    # --- moving data -------------------------------------------------------------------------
    def shard(self, x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
        """The part of a full sequence `x` (sequence along `dim`) that `rank` holds."""
        seq_len = x.shape[dim]
        self.check(seq_len, world)
        pieces = [x.narrow(dim, s, n) for s, n in self.runs(seq_len, rank, world)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def gather(self, x: torch.Tensor, dim: int, mesh) -> torch.Tensor:
        """Reassemble the full sequence from every rank's shard (autograd-aware).

        The backward hands each rank the gradient of its own shard (summed over ranks).
        """
        world = mesh.size
        if world == 1:
            return x
        gathered = all_gather(x, dim, mesh.group, timeout=mesh.timeout)
        seq_len = gathered.shape[dim]
        inverse = torch.argsort(self.permutation(seq_len, world)).to(x.device)
        return gathered.index_select(dim, inverse)

    # --- causal structure --------------------------------------------------------------------
    def causal_blocks(self, seq_len: int, q_rank: int, k_rank: int, world: int) -> list[Block]:
        """The pieces of q_rank's queries and k_rank's keys that meet in causal attention.

        Pairs in which every key lies after every query are left out, so a caller computes
        exactly the blocks listed. Default: from `runs`, comparing whole pieces.
        """
        blocks = []
        q_off = 0
        for q_start, q_len in self.runs(seq_len, q_rank, world):
            k_off = 0
            for k_start, k_len in self.runs(seq_len, k_rank, world):
                if k_start + k_len <= q_start:
                    blocks.append(Block(q_off, q_len, k_off, k_len, "full"))
                elif k_start == q_start and k_len == q_len:
                    blocks.append(Block(q_off, q_len, k_off, k_len, "causal"))
                elif k_start < q_start + q_len:
                    raise AssertionError(f"{self.name}: overlapping pieces are not aligned")
                k_off += k_len
            q_off += q_len
        return blocks

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Contiguous(Layout):
    name = "contiguous"

    def divisor(self, world: int) -> int:
        return world

    def runs(self, seq_len: int, rank: int, world: int) -> list[tuple[int, int]]:
        n = seq_len // world
        return [(rank * n, n)]


class Zigzag(Layout):
    name = "zigzag"

    def divisor(self, world: int) -> int:
        return 2 * world

    def runs(self, seq_len: int, rank: int, world: int) -> list[tuple[int, int]]:
        c = seq_len // (2 * world)
        return [(rank * c, c), ((2 * world - 1 - rank) * c, c)]


class Striped(Layout):
    name = "striped"

    def divisor(self, world: int) -> int:
        return world

    def runs(self, seq_len: int, rank: int, world: int) -> list[tuple[int, int]]:
        return [(i, 1) for i in range(rank, seq_len, world)]

    def positions(self, seq_len: int, rank: int, world: int) -> torch.Tensor:
        self.check(seq_len, world)
        return torch.arange(rank, seq_len, world)

    def shard(self, x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
        seq_len = x.shape[dim]
        self.check(seq_len, world)
        dim = dim % x.dim()
        return x.unflatten(dim, (seq_len // world, world)).select(dim + 1, rank)

    def causal_blocks(self, seq_len: int, q_rank: int, k_rank: int, world: int) -> list[Block]:
        # local token j of rank a is global j*P + a: query (a, j) sees key (b, i) iff
        # i < j, or i == j and b <= a.
        n = self.local_len(seq_len, world)
        return [Block(0, n, 0, n, "causal" if k_rank <= q_rank else "strict")]


LAYOUTS: dict[str, type[Layout]] = {
    "contiguous": Contiguous,
    "zigzag": Zigzag,
    "striped": Striped,
}


def get_layout(layout: str | Layout) -> Layout:
    """A layout instance from its name ('contiguous', 'zigzag', 'striped') or itself."""
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]()
    except KeyError:
        raise ValueError(f"layout={layout!r}: expected one of {sorted(LAYOUTS)}") from None


def pad_to_multiple(
    x: torch.Tensor, dim: int, multiple: int, value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad `x` along `dim` up to a multiple of `multiple`.

    Returns (padded, mask) where mask is a bool tensor [padded_len] that is True at real
    tokens. Typical use: `x, mask = pad_to_multiple(x, 1, layout.divisor(world))`, then shard
    both and leave the padded positions out of the loss (for causal models, padding at the
    end never influences real tokens).
    """
    if multiple < 1:
        raise ValueError(f"multiple={multiple} must be >= 1")
    seq_len = x.shape[dim]
    padded_len = -(-seq_len // multiple) * multiple
    mask = torch.zeros(padded_len, dtype=torch.bool, device=x.device)
    mask[:seq_len] = True
    if padded_len == seq_len:
        return x, mask
    pad_shape = list(x.shape)
    pad_shape[dim] = padded_len - seq_len
    pad = torch.full(pad_shape, value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim), mask
