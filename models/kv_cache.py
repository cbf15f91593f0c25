"""The caches sharded inference keeps between tokens: one per mixer layer, on every rank.

- `AttentionCache`: one attention layer's keys and values on this rank, with their global
  positions. Prefill stores the rank's own prompt shard where it was computed (nothing is
  gathered); decode appends each new token's K/V to rank `position % P` (round-robin), so
  every rank's cache grows by the same amount. A sliding-window layer keeps only the keys a
  future query can still see (positions > query - W).
- `RecurrentState`: a DeltaNet layer's recurrent state [B, H, Dk, Dv] and its conv tail (the
  last `halo` mixer inputs [B, halo, dim]), the same on every rank.
- `ModelCache`: the caches of one model, found by layer (the module object), plus whether it
  is still filling (prefill) or decoding, and the room it was sized for. (FITLM's state,
  `models.fit_decode.FITState`, lives in it too.) Every cache has `nbytes()`.

Bookkeeping that decides where a token goes (how many keys each rank holds) is replicated,
so a cache that runs out of room raises the same ValueError on every rank, before any
collective could hang.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from seqshard.dist import Mesh


class AttentionCache:
    """Keys and values of one attention layer on this rank, preallocated to `capacity` keys.

    k, v: [B, Hkv, capacity, D] (allocated at `fill`); positions: int64 [capacity]; the first
    `length` slots are live. window: keep only keys a later query can see (None: all).
    `counts[r]`: the keys rank r holds (global layers), the same list on every rank.
    """

    def __init__(self, mesh: Mesh, capacity: int, window: int | None = None):
        self.rank, self.world = mesh.rank, mesh.size
        # a window layer never holds more than W live keys on one rank
        self.capacity = capacity if window is None else min(capacity, window)
        self.window = window
        self.k = self.v = self.positions = None
        self.length = 0
        self.counts = [0] * self.world

    def nbytes(self) -> int:
        """Bytes of this rank's preallocated K, V and positions."""
        return tensor_bytes(self.k, self.v, self.positions)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live keys [B, Hkv, S_local, D], values and their global positions [S_local]."""
        n = self.length
        return self.k[:, :, :n], self.v[:, :, :n], self.positions[:n]

    def fill(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
             seq_len: int) -> None:
        """Store this rank's prompt shard: k, v [B, Hkv, N_local, D] at global `positions`
        [N_local] of a prompt of `seq_len` tokens. Every rank holds N_local keys after it."""
        n_local = k.shape[2]
        if self.window is not None:
            # the first decoded query sits at seq_len and sees keys > seq_len - W
            keep = positions > seq_len - self.window
            k, v, positions = k[:, :, keep], v[:, :, keep], positions[keep]
        if k.shape[2] > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} keys per rank, but this rank's "
                             f"prompt shard has {k.shape[2]}")
        batch, heads, _, dim = k.shape
        self.k = k.new_empty(batch, heads, self.capacity, dim)
        self.v = v.new_empty(batch, heads, self.capacity, dim)
        self.positions = torch.empty(self.capacity, dtype=torch.int64, device=k.device)
        self.length = k.shape[2]
        self.k[:, :, :self.length] = k
        self.v[:, :, :self.length] = v
        self.positions[:self.length] = positions
        self.counts = [n_local] * self.world  # every layout gives each rank N / P tokens

    def append(self, k: torch.Tensor, v: torch.Tensor, position: int) -> None:
        """Add one token's k, v [B, Hkv, 1, D] at global `position` on rank position % P.

        Call on every rank with the same token (the decode inputs are replicated): the owner
        stores it, every rank counts it, and a full owner raises on every rank."""
        owner = position % self.world
        if self.window is not None:
            self._evict(position)
        elif self.counts[owner] >= self.capacity:
            raise ValueError(f"the KV cache is full: rank {owner} already holds "
                             f"{self.counts[owner]} keys (capacity {self.capacity} per rank), "
                             f"so token position {position} does not fit; size the cache "
                             f"for more tokens (generate's max_len)")
        self.counts[owner] += 1
        if owner != self.rank:
            return
        if self.length >= self.capacity:  # a window layer past its bound: a bug, not input
            raise RuntimeError(f"window cache overflow at position {position}")
        self.k[:, :, self.length] = k[:, :, 0]
        self.v[:, :, self.length] = v[:, :, 0]
        self.positions[self.length] = position
        self.length += 1

    def _evict(self, query: int) -> None:
        """Drop the keys the query at `query` (and every later one) can no longer see."""
        k, v, positions = self.view()
        live = positions > query - self.window
        n = int(live.sum())
        if n == self.length:
            return
        self.k[:, :, :n] = k[:, :, live].clone()
        self.v[:, :, :n] = v[:, :, live].clone()
        self.positions[:n] = positions[live].clone()
        self.length = n


@dataclass
class RecurrentState:
    """A DeltaNet layer after the tokens so far: state [B, H, Dk, Dv] and the conv tail, the
    last `halo` mixer inputs [B, halo, dim] (the short convolution's context)."""

    state: torch.Tensor
    conv_tail: torch.Tensor

    def nbytes(self) -> int:
        return tensor_bytes(self.state, self.conv_tail)


@dataclass
class ModelCache:
    """Every layer's cache of one model on this rank.

    capacity: keys per rank an attention layer may hold (prompt shard + this rank's share of
    the decoded tokens). max_len: the tokens (prompt + generated) it was sized for.
    next_position: the global position of the next token to decode. decoding: False while
    the prompt fills it, True afterwards.
    """

    mesh: Mesh
    capacity: int
    max_len: int
    next_position: int
    decoding: bool = False
    layers: dict = field(default_factory=dict)  # nn.Module -> its cache

    def attention(self, layer: nn.Module, window: int | None = None) -> AttentionCache:
        """The AttentionCache of attention module `layer` (made on first use)."""
        if layer not in self.layers:
            if self.decoding:
                raise RuntimeError("decoding through a layer the prefill did not fill")
            self.layers[layer] = AttentionCache(self.mesh, self.capacity, window)
        return self.layers[layer]

    def memory_bytes(self) -> int:
        """Bytes this rank's cache tensors take (preallocated room included)."""
        return sum(cache.nbytes() for cache in self.layers.values())


def tensor_bytes(*tensors) -> int:
    """Bytes of the given tensors (None skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
