"""FIT across ranks: the only places where a FIT block talks to other ranks.

The sequence is sharded with the CONTIGUOUS layout and the shard length is a multiple of
the group size, so every group lives on exactly one rank: rank r holds groups
r * t_local ... (r + 1) * t_local - 1. Local layers, read and write need nothing from other
ranks. Each global layer sees every latent: `gather_latents` all-gathers the small latent
sequence as keys / values (backward: reduce-scatter, so each rank receives the summed
gradient of its own latents) while each rank computes only its own latent rows; for the
causal write, `own_groups(..., shift=1)` cuts out the groups one earlier from a final gather.

Gradient convention (what the models engineer relies on): each rank back-propagates only
its own loss through the rows it computed (its groups, its latent rows). A parameter's
gradient is a sum of per-row contributions, so the parameter gradients summed over ranks
equal the unsharded gradient. Sum (all-reduce) every FIT parameter gradient over the sp
group; never average it over sp.
"""

from __future__ import annotations

import torch

from seqshard.dist import Mesh, all_gather
from seqshard.dist.agree import agree

from ..dtypes import FLOAT_DTYPES


def world_and_rank(mesh: Mesh | None) -> tuple[int, int]:
    """(sp size, sp rank); None means one process."""
    return (1, 0) if mesh is None else (mesh.size, mesh.rank)


def _token_problem(x, dim: int, group_size: int, dtype: torch.dtype | None) -> str | None:
    """What is wrong with this rank's shard x on its own (None: nothing)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        return f"x must be [batch, seq_local, dim], got shape {what}"
    if x.dtype not in FLOAT_DTYPES:
        return f"x has dtype {x.dtype}: expected float16, bfloat16, float32 or float64"
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return (f"x is {x.dtype} but FIT's parameters are {dtype}: cast one to the other "
                f"(or run under autocast)")
    if x.shape[-1] != dim:
        return f"x has width {x.shape[-1]} (shape {tuple(x.shape)}), expected dim={dim}"
    n_local = x.shape[1]
    if n_local == 0:
        return (f"N_local=0: FIT needs at least one group of group_size={group_size} tokens "
                f"per rank (an empty sequence has no latents for the global layers)")
    if n_local % group_size != 0:
        return (f"shard length N_local={n_local} is not a positive multiple of group_size="
                f"{group_size}: groups must not straddle ranks (pad the global sequence to a "
                f"multiple of world x group_size, e.g. with seqshard.dist.pad_to_multiple)")
    return None


def check_tokens(x: torch.Tensor, dim: int, group_size: int, mesh: Mesh | None,
                 dtype: torch.dtype | None = None) -> int:
    """Validate a token shard [B, N_local, dim]; return the number of local groups.

    dtype: the parameters' (x must match it unless autocast is on). Raises ValueError (with
    the values) on a wrong rank, width or dtype, a shard that splits a group or is empty,
    and, on EVERY rank, when any rank's shard is bad or the ranks' shards differ in shape,
    dtype or group size (which would otherwise hang or garble the latent gathers).
    """
    problem = _token_problem(x, dim, group_size, dtype)
    world, _ = world_and_rank(mesh)
    if world > 1:
        facts = {"x shape": tuple(x.shape), "x dtype": x.dtype, "group_size": group_size}
        agree(facts if problem is None else {}, mesh.group, what="FIT", problem=problem,
              timeout=mesh.timeout)
    elif problem is not None:
        raise ValueError(problem)
    return x.shape[1] // group_size


def group_index(t_local: int, mesh: Mesh | None, device=None) -> torch.Tensor:
    """Global indices of this rank's groups (contiguous layout). int64 [t_local]."""
    _, rank = world_and_rank(mesh)
    return torch.arange(rank * t_local, (rank + 1) * t_local, device=device)


def gather_latents(latents: torch.Tensor, mesh: Mesh | None) -> torch.Tensor:
    """Every rank's latents in global order along dim 1: [B, t_local, ...] -> [B, T, ...]
    (works for [B, t, m, D] and for flattened [B, t*m, D]).

    Backward is a reduce-scatter: rank r gets the sum over ranks of the gradient of its groups.
    """
    world, _ = world_and_rank(mesh)
    if world == 1:
        return latents
    return all_gather(latents, 1, mesh.group, timeout=mesh.timeout)


def own_groups(full: torch.Tensor, t_local: int, mesh: Mesh | None, shift: int = 0) -> torch.Tensor:
    """This rank's groups of a global latent tensor, `shift` groups back.

    full [B, T, m, D] -> [B, t_local, m, D] holding global groups g - shift for this rank's
    groups g; groups before the start of the sequence are zeros (the causal write of group 0).
    """
    _, rank = world_and_rank(mesh)
    if shift:
        zeros = full.new_zeros(full.shape[0], shift, *full.shape[2:])
        full = torch.cat([zeros, full[:, : full.shape[1] - shift]], dim=1)  # [B, T, m, D]
    return full[:, rank * t_local : (rank + 1) * t_local]
