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

from seqshard.dist import Mesh

from .layers import CrossLayer, SelfLayer, check_heads
from .sharded import check_tokens, gather_latents, group_index, own_groups


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_count(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative integer")


def latent_mask(num_groups: int, num_latents: int, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """Additive mask of the causal global layers: [T*m, T*m], 0 = may attend, -inf = not.

    Latent (g, i) sees latent (h, j) iff h <= g: full inside a group, causal across groups.
    Additive in the activations' dtype because SDPA would otherwise convert a bool mask to
    one per call and keep each copy for backward (4 bytes x (T*m)^2 per global layer: 1 GiB
    each at 1M tokens, n=256, m=4); FIT builds it once and all blocks share it.
    """
    group = torch.arange(num_groups, device=device).repeat_interleave(num_latents)  # [T*m]
    mask = torch.zeros(len(group), len(group), device=device, dtype=dtype)
    return mask.masked_fill_(group[:, None] < group[None, :], float("-inf"))


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


class FITBlock(nn.Module):
    """One FIT block: local layers, read, global layers, write.

    forward(x, latents, mesh=None, global_mask=None) -> (x, latents)
      x       [B, N_local, dim]   this rank's contiguous token shard, N_local % group_size == 0
      latents [B, N_local // group_size, num_latents, dim]   this rank's groups' latents
      global_mask  causal only: `latent_mask(T, m, ...)` for all T groups, to share one
                   between blocks; built here when None. Ignored when not causal.
    Returns the new tokens (same shape) and the new latents of this rank's groups (unshifted).

    Example:
        >>> blk = FITBlock(dim=96, num_heads=2, group_size=5, num_latents=3, causal=True)
        >>> x, lat = torch.randn(2, 20, 96), torch.randn(2, 4, 3, 96)
        >>> y, lat2 = blk(x, lat)            # y [2, 20, 96], lat2 [2, 4, 3, 96]
    """

    def __init__(self, dim: int, num_heads: int, group_size: int, num_latents: int,
                 local_layers: int = 1, global_layers: int = 1, causal: bool = False,
                 mlp_ratio: float = 4):
        super().__init__()
        _check_positive(dim=dim, group_size=group_size, num_latents=num_latents)
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
                global_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = check_tokens(x, self.dim, self.group_size, mesh)
        b, n, m = x.shape[0], self.group_size, self.num_latents
        if tuple(latents.shape) != (b, t, m, self.dim):
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}, expected (batch, groups, "
                f"num_latents, dim) = {(b, t, m, self.dim)} for x of shape {tuple(x.shape)}")
        x = x.reshape(b, t, n, self.dim)  # [B, t, n, D]
        for layer in self.local_layers:
            x = layer(x, causal=self.causal)
        # a group's latents may read all of its own group's tokens: in the causal variant
        # they only reach tokens of later groups (after the shift below).
        latents = self.read(latents, x)  # [B, t, m, D]
        full = self._global(gather_latents(latents, mesh), global_mask)  # [B, T, m, D]
        latents = own_groups(full, t, mesh)  # [B, t, m, D]
        source = own_groups(full, t, mesh, shift=1) if self.causal else latents
        x = self.write(x, source)  # [B, t, n, D]
        return x.reshape(b, t * n, self.dim), latents

    def _global(self, full: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The global layers over all latents: [B, T, m, D] -> [B, T, m, D]."""
        num_groups = full.shape[1]
        size = num_groups * self.num_latents
        if not self.global_layers:
            return full
        if not self.causal:
            mask = None
        elif mask is None:
            mask = latent_mask(num_groups, self.num_latents, full.device, full.dtype)
        elif tuple(mask.shape) != (size, size):
            raise ValueError(f"global_mask has shape {tuple(mask.shape)}, expected {(size, size)} "
                             f"for {num_groups} groups x {self.num_latents} latents")
        flat = full.flatten(1, 2)  # [B, T*m, D]
        for layer in self.global_layers:
            flat = layer(flat, mask=mask)
        return flat.unflatten(1, (num_groups, self.num_latents))


class FIT(nn.Module):
    """A stack of `depth` FIT blocks with FIT's embeddings, on a contiguous sequence shard.

    x [B, N_local, dim] -> [B, N_local, dim], N_local % group_size == 0. Tokens get a learned
    position-within-group embedding (shared by all groups; table size max_group_size,
    default group_size); latent slot i of group g starts as a learned slot embedding
    [num_latents, dim] plus a fixed sinusoid of the global group index g. With a Mesh, the
    sequence is the concatenation of every rank's shard in rank order (contiguous layout);
    sum parameter gradients over the mesh's sp group (see sharded.py). No final norm.

    Example:
        >>> fit = FIT(dim=96, num_heads=2, group_size=5, num_latents=3, causal=True)
        >>> y = fit(torch.randn(2, 20, 96))   # [2, 20, 96]; fit(x_shard, mesh) across ranks
    """

    def __init__(self, dim: int, num_heads: int, group_size: int, num_latents: int,
                 depth: int = 2, local_layers: int = 1, global_layers: int = 1,
                 causal: bool = False, mlp_ratio: float = 4, max_group_size: int | None = None):
        super().__init__()
        max_group_size = group_size if max_group_size is None else max_group_size
        _check_positive(dim=dim, group_size=group_size, num_latents=num_latents, depth=depth,
                        max_group_size=max_group_size)
        self.dim, self.num_latents, self.causal = dim, num_latents, causal
        self.token_pos = nn.Parameter(torch.randn(max_group_size, dim) * 0.02)
        self.latent_slots = nn.Parameter(torch.randn(num_latents, dim))
        self.blocks = nn.ModuleList(
            FITBlock(dim, num_heads, group_size, num_latents, local_layers, global_layers,
                     causal, mlp_ratio) for _ in range(depth))
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

    def forward(self, x: torch.Tensor, mesh: Mesh | None = None) -> torch.Tensor:
        t = check_tokens(x, self.dim, self.group_size, mesh)
        b, n, m = x.shape[0], self.group_size, self.num_latents
        x = (x.reshape(b, t, n, self.dim) + self.token_pos[:n]).reshape(b, t * n, self.dim)
        slots = group_embedding(group_index(t, mesh, x.device), self.dim).to(x.dtype)  # [t, D]
        latents = (self.latent_slots + slots[:, None]).expand(b, t, m, self.dim)  # [B, t, m, D]
        mask = None
        if self.causal and any(len(blk.global_layers) for blk in self.blocks):
            # one mask for every block; T = groups of the whole sequence
            world = 1 if mesh is None else mesh.size
            mask = latent_mask(world * t, m, x.device, x.dtype)
        for block in self.blocks:
            x, latents = block(x, latents, mesh, global_mask=mask)
        return x
