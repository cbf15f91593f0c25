"""FIT (Far-reaching Interleaved Transformers, Chen & Li 2023) on a sharded sequence.

A block, on tokens grouped as [B, t, n, dim] with m latents per group [B, t, m, dim]:
  1. local layers: self-attention + MLP inside each group (causal inside the group if causal);
  2. read: each group's latents cross-attend to that group's tokens (all n of them);
  3. global layers: self-attention + MLP over all T * m latents of the whole sequence
     (causal: latents of group g see every latent of groups <= g, full within a group);
  4. write: each group's tokens cross-attend to m latents -- its own group's (bidirectional)
     or the previous group's (causal; group 0 reads m zero vectors).
`FIT` adds the embeddings, stacks `depth` blocks and carries the latents from block to block.
Across ranks only the latents travel (see sharded.py); `mesh=None` is one process.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqshard.dist import Mesh

from .layers import CrossLayer, SelfLayer, check_heads
from .sharded import check_tokens, gather_latents, group_index, own_groups, world_and_rank


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_count(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative integer")


def _dtype(module: nn.Module) -> torch.dtype:
    """The parameters' dtype, which x must share (a mix fails deep inside torch)."""
    return next(module.parameters()).dtype


def latent_mask(num_groups: int, num_latents: int, rows: range | None = None, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """Additive mask of the causal global layers, 0 = may attend, -inf = not.

    Latent (g, i) sees latent (h, j) iff h <= g: full inside a group, causal across groups.
    `rows`: the query groups (default all T); returns [len(rows) * m, T * m] -- a rank needs
    only its own groups' rows. Additive in the activations' dtype because SDPA would
    otherwise convert a bool mask in every call and keep each copy for backward; FIT builds
    it once and every global layer of every block shares it.
    """
    rows = range(num_groups) if rows is None else rows
    key_group = torch.arange(num_groups, device=device).repeat_interleave(num_latents)
    query_group = torch.arange(rows.start, rows.stop, device=device).repeat_interleave(num_latents)
    mask = torch.zeros(len(query_group), len(key_group), device=device, dtype=dtype)
    return mask.masked_fill_(query_group[:, None] < key_group[None, :], float("-inf"))


def group_embedding(index: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sinusoidal embedding of global group indices: int [T] -> [T, dim].

    Fixed rather than learned so that any sequence length works, and computed from the
    *global* index so every rank gives its groups the same vectors the unsharded run would.
    """
    half = (dim + 1) // 2
    # float64, so the angles of far groups (index ~1e5) stay accurate before the cast
    freq = torch.exp(torch.arange(half, device=index.device, dtype=torch.float64)
                     * (-math.log(10000.0) / half))
    angle = index[:, None].double() * freq  # [T, half]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)[:, :dim]


def in_group_pieces(fn, tensors: tuple[torch.Tensor, ...], piece_groups: int | None):
    """fn(*tensors) where every tensor is [B, t, ...] and fn treats each group alone, run on
    pieces of `piece_groups` groups, each recomputed in backward (non-reentrant checkpoint).

    Same numbers as one call; only the pieces' inputs stay alive for backward, so the
    intermediates of the group-local sublayers (attention, MLP, norms) are O(piece), not O(N).
    None, or one piece in all, or no grad: one plain call. Returns what fn returns, pieces
    concatenated along dim 1 (a tensor or a tuple of tensors).
    """
    t = tensors[0].shape[1]
    if piece_groups is None or t <= piece_groups or not torch.is_grad_enabled():
        return fn(*tensors)
    outs = [checkpoint(fn, *parts, use_reentrant=False)
            for parts in zip(*(torch.split(x, piece_groups, dim=1) for x in tensors))]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(part, dim=1) for part in zip(*outs))
    return torch.cat(outs, dim=1)


class FITBlock(nn.Module):
    """One FIT block: local layers, read, global layers, write.

    forward(x, latents, mesh=None, global_mask=None) -> (x, latents)
      x       [B, N_local, dim]   this rank's contiguous token shard, N_local % group_size == 0
      latents [B, N_local // group_size, num_latents, dim]   this rank's groups' latents
      global_mask  causal only: `latent_mask(T, m, rows=this rank's groups)`, to share one
                   between blocks; built here when None. Ignored when not causal.
    Returns the new tokens (same shape) and the new latents of this rank's groups (unshifted).
    piece_groups: run the group-local parts (local layers + read, write) on this many groups
    at a time, recomputed in backward (`in_group_pieces`); None = all groups at once.
    record: a dict to receive what decoding needs (see `FIT.forward`), or None.

    Example:
        >>> blk = FITBlock(dim=96, num_heads=2, group_size=5, num_latents=3, causal=True)
        >>> x, lat = torch.randn(2, 20, 96), torch.randn(2, 4, 3, 96)
        >>> y, lat2 = blk(x, lat)            # y [2, 20, 96], lat2 [2, 4, 3, 96]
    """

    def __init__(self, dim: int, num_heads: int, group_size: int, num_latents: int,
                 local_layers: int = 1, global_layers: int = 1, causal: bool = False,
                 mlp_ratio: float = 4, piece_groups: int | None = None):
        super().__init__()
        _check_positive(dim=dim, group_size=group_size, num_latents=num_latents)
        if piece_groups is not None:
            _check_positive(piece_groups=piece_groups)
        self.piece_groups = piece_groups
        _check_count(local_layers=local_layers, global_layers=global_layers)
        check_heads(dim, num_heads)
        self.dim, self.group_size, self.num_latents = dim, group_size, num_latents
        self.causal = causal
        self.local_layers = nn.ModuleList(
            SelfLayer(dim, num_heads, mlp_ratio) for _ in range(local_layers))
        self.read = CrossLayer(dim, num_heads)
        self.global_layers = nn.ModuleList(
            SelfLayer(dim, num_heads, mlp_ratio) for _ in range(global_layers))
        self.write = CrossLayer(dim, num_heads)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, mesh: Mesh | None = None,
                global_mask: torch.Tensor | None = None,
                record: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = check_tokens(x, self.dim, self.group_size, mesh, _dtype(self))
        b, n, m = x.shape[0], self.group_size, self.num_latents
        if latents.dtype != x.dtype:
            raise ValueError(f"latents are {latents.dtype} but x is {x.dtype}")
        if tuple(latents.shape) != (b, t, m, self.dim):
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}, expected (batch, groups, "
                f"num_latents, dim) = {(b, t, m, self.dim)} for x of shape {tuple(x.shape)}")
        x = x.reshape(b, t, n, self.dim)  # [B, t, n, D]
        x, latents = in_group_pieces(self._local_and_read, (x, latents), self.piece_groups)
        latents = self._global(latents, mesh, global_mask, record)  # [B, t, m, D]
        if record is not None:
            record["latents"] = latents.detach()
        source = latents
        if self.causal:  # group g writes from group g - 1: one group comes from rank r - 1
            source = own_groups(gather_latents(latents, mesh), t, mesh, shift=1)
        x = in_group_pieces(self.write, (x, source), self.piece_groups)  # [B, t, n, D]
        return x.reshape(b, t * n, self.dim), latents

    def _local_and_read(self, x: torch.Tensor, latents: torch.Tensor):
        """The group-local first half: x [B, t, n, D], latents [B, t, m, D] -> both updated."""
        for layer in self.local_layers:
            x = layer(x, causal=self.causal)
        # a group's latents may read all of its own group's tokens: in the causal variant
        # they only reach tokens of later groups (after the shift in forward).
        return x, self.read(latents, x)

    def _global(self, latents: torch.Tensor, mesh: Mesh | None,
                mask: torch.Tensor | None, record: dict | None = None) -> torch.Tensor:
        """The global layers: this rank's latents query every rank's. [B, t, m, D] -> same.

        Each layer all-gathers its input latents (keys / values) and computes only this
        rank's rows (queries, residual, MLP), so the global work splits over the ranks.
        record: when a dict, record["global_inputs"] gets each layer's input [B, t*m, D].
        """
        if record is not None:
            record["global_inputs"] = []
        if not self.global_layers:
            return latents
        t, m = latents.shape[1], self.num_latents
        world, rank = world_and_rank(mesh)
        if not self.causal:
            mask = None
        elif mask is None:
            mask = latent_mask(world * t, m, range(rank * t, (rank + 1) * t),
                               latents.device, latents.dtype)
        elif tuple(mask.shape) != (t * m, world * t * m):
            raise ValueError(
                f"global_mask has shape {tuple(mask.shape)}, expected {(t * m, world * t * m)} "
                f"(this rank's {t} groups x all {world * t} groups, {m} latents each)")
        own = latents.flatten(1, 2)  # [B, t*m, D]
        for layer in self.global_layers:
            if record is not None:
                record["global_inputs"].append(own.detach())
            every = gather_latents(own, mesh)  # [B, T*m, D], backward: reduce-scatter
            own = layer(own, context=every, mask=mask)
        return own.unflatten(1, (t, m))


class FIT(nn.Module):
    """A stack of `depth` FIT blocks with FIT's embeddings, on a contiguous sequence shard.

    x [B, N_local, dim] -> [B, N_local, dim], N_local % group_size == 0. Tokens get a learned
    position-within-group embedding (shared by all groups; table size max_group_size,
    default group_size); latent slot i of group g starts as a learned slot embedding
    [num_latents, dim] plus a fixed sinusoid of the global group index g. With a Mesh, the
    sequence is the concatenation of every rank's shard in rank order (contiguous layout);
    sum parameter gradients over the mesh's sp group (see sharded.py). No final norm.
    piece_groups: see `FITBlock` (bounds the memory of the group-local parts; same math).

    Example:
        >>> fit = FIT(dim=96, num_heads=2, group_size=5, num_latents=3, causal=True)
        >>> y = fit(torch.randn(2, 20, 96))   # [2, 20, 96]; fit(x_shard, mesh) across ranks
    """

    def __init__(self, dim: int, num_heads: int, group_size: int, num_latents: int,
                 depth: int = 2, local_layers: int = 1, global_layers: int = 1,
                 causal: bool = False, mlp_ratio: float = 4, max_group_size: int | None = None,
                 piece_groups: int | None = None):
        super().__init__()
        max_group_size = group_size if max_group_size is None else max_group_size
        _check_positive(dim=dim, group_size=group_size, num_latents=num_latents, depth=depth,
                        max_group_size=max_group_size)
        self.dim, self.num_latents, self.causal = dim, num_latents, causal
        self.token_pos = nn.Parameter(torch.randn(max_group_size, dim) * 0.02)
        self.latent_slots = nn.Parameter(torch.randn(num_latents, dim))
        self.blocks = nn.ModuleList(
            FITBlock(dim, num_heads, group_size, num_latents, local_layers, global_layers,
                     causal, mlp_ratio, piece_groups) for _ in range(depth))
        self.set_group_size(group_size)

    def set_group_size(self, group_size: int) -> None:
        """Run with groups of `group_size` tokens from now on (<= max_group_size)."""
        max_group_size = self.token_pos.shape[0]
        if not isinstance(group_size, int) or not 1 <= group_size <= max_group_size:
            raise ValueError(
                f"group_size={group_size!r} must be an integer in [1, max_group_size="
                f"{max_group_size}]")
        self.group_size = group_size
        for block in self.blocks:
            block.group_size = group_size

    def forward(self, x: torch.Tensor, mesh: Mesh | None = None,
                record: list | None = None) -> torch.Tensor:
        """record: when a list (inference's prefill), each block appends a dict of what
        decoding after this sequence needs: "latents" [B, t, m, D] (the block's output
        latents of this rank's groups) and "global_inputs" (each global layer's input
        latents [B, t*m, D]), detached."""
        t = check_tokens(x, self.dim, self.group_size, mesh, _dtype(self))
        b, n, m = x.shape[0], self.group_size, self.num_latents
        x = (x.reshape(b, t, n, self.dim) + self.token_pos[:n]).reshape(b, t * n, self.dim)
        slots = group_embedding(group_index(t, mesh, x.device), self.dim).to(x.dtype)  # [t, D]
        latents = (self.latent_slots + slots[:, None]).expand(b, t, m, self.dim)  # [B, t, m, D]
        mask = None
        if self.causal and any(len(blk.global_layers) for blk in self.blocks):
            # one mask for every block: this rank's groups' rows over all groups' latents
            world, rank = world_and_rank(mesh)
            mask = latent_mask(world * t, m, range(rank * t, (rank + 1) * t), x.device, x.dtype)
        for block in self.blocks:
            kept = None if record is None else {}
            x, latents = block(x, latents, mesh, global_mask=mask, record=kept)
            if record is not None:
                record.append(kept)
        return x
