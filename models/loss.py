"""The sharded language-model loss: cross-entropy on each rank's own tokens, never gathering
logits.

Next-token targets cross shard borders: the last token of every piece a rank holds (one piece
for contiguous, two for zigzag, every token for striped) predicts the first token of the piece
that follows it globally, which lives on another rank. Only those first tokens travel (one
all-gather of [B, pieces] ids over the sp group).

Reduction, so that gradients are exact: rank r's loss term is
    sum of its token losses / (number of counted tokens over the whole sp group),
so the SUM over the sp ranks of the terms is the global mean and the SUM over sp ranks of each
rank's parameter gradients is the gradient of the global mean. The returned value is the global
mean on every rank (for logging) while its gradient is the local term's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqshard.dist import Layout, Mesh, get_layout
from seqshard.dist.collectives import all_gather

IGNORE = -100


def _check_ids(input_ids: torch.Tensor, name: str) -> None:
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an int tensor [B, N_local], got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}")


def next_token_targets(input_ids: torch.Tensor, mesh: Mesh | None = None, *,
                       layout: str | Layout = "contiguous",
                       ignore_index: int = IGNORE) -> torch.Tensor:
    """Targets [B, N_local] for a local shard of ids [B, N_local]: the id of the token that
    follows each local token in the *global* sequence; `ignore_index` for the global last.

    Example (one process; sharded, every rank calls it with its shard and the mesh):
        >>> next_token_targets(torch.tensor([[5, 6, 7]]))
        tensor([[   6,    7, -100]])
    """
    _check_ids(input_ids, "input_ids")
    mesh = mesh or Mesh.single()
    layout = get_layout(layout)
    world, rank = mesh.size, mesh.rank
    b, n_local = input_ids.shape
    seq_len = n_local * world
    all_runs = [layout.runs(seq_len, r, world) for r in range(world)]
    width = max(len(runs) for runs in all_runs)

    # the first id of each of my pieces, padded to the widest rank, then every rank's
    firsts = input_ids.new_zeros(b, width)  # [B, width]
    offsets = torch.tensor([0] + [n for _, n in all_runs[rank]]).cumsum(0)[:-1]
    firsts[:, : len(all_runs[rank])] = input_ids[:, offsets]
    if world > 1:
        firsts = all_gather(firsts, 1, mesh.group, timeout=mesh.timeout)  # [B, world * width]
    starts = torch.full((world * width,), seq_len + 1, dtype=torch.int64)  # padding never matches
    for r, runs in enumerate(all_runs):
        starts[r * width: r * width + len(runs)] = torch.tensor([s for s, _ in runs])

    # within a piece the target is the next local id; at a piece's end, look up the id that
    # starts the following piece (or ignore at the global end)
    targets = torch.roll(input_ids, -1, dims=1).clone()
    ends_local = torch.tensor([o + n - 1 for o, (_, n) in zip(offsets.tolist(), all_runs[rank])])
    next_global = torch.tensor([s + n for s, n in all_runs[rank]])
    order = torch.argsort(starts)
    slot = torch.searchsorted(starts[order], next_global).clamp(max=len(starts) - 1)
    found = order[slot]
    ids_at_next = firsts[:, found.to(input_ids.device)]  # [B, pieces]
    at_end = (next_global >= seq_len).to(input_ids.device)
    targets[:, ends_local.to(input_ids.device)] = torch.where(
        at_end, torch.full_like(ids_at_next, ignore_index), ids_at_next)
    return targets


def _global_count(valid: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    count = valid.sum().to(torch.float64)
    if mesh.size > 1:
        dist.all_reduce(count, group=mesh.group)
    return count


def sharded_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor | None = None,
                    mesh: Mesh | None = None, *, layout: str | Layout = "contiguous",
                    targets: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                    ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean next-token cross-entropy of a sequence sharded over `mesh`'s sp group.

    logits [B, N_local, V] (any float dtype; computed in fp32), input_ids [B, N_local] this
    rank's shard (or pass `targets` [B, N_local] from `next_token_targets` directly).
    loss_mask [B, N_local] bool, optional: only positions where it is True count (e.g. the
    answer positions of a recall task). The value is the global mean over the sp group (the
    same on every rank); its gradient is this rank's share, so summing the ranks' parameter
    gradients over the sp group gives the exact gradient of the global mean.

    Example:
        >>> logits = torch.zeros(1, 4, 10, requires_grad=True)
        >>> round(float(sharded_lm_loss(logits, torch.tensor([[1, 2, 3, 4]]))), 4)
        2.3026
    """
    mesh = mesh or Mesh.single()
    if targets is None:
        if input_ids is None:
            raise ValueError("sharded_lm_loss needs input_ids or targets")
        targets = next_token_targets(input_ids, mesh, layout=layout, ignore_index=ignore_index)
    _check_ids(targets, "targets")
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets "
                         f"{tuple(targets.shape)} as [B, N_local, V] vs [B, N_local]")
    valid, count = loss_weights(targets, loss_mask, mesh, ignore_index)
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=ignore_index, reduction="none")  # [B * N_local]
    return global_value((flat * valid.flatten()).sum() / count.to(flat.dtype), mesh)


def loss_weights(targets: torch.Tensor, loss_mask: torch.Tensor | None, mesh: Mesh,
                 ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [B, N_local] bool: the positions that count, global count over the sp group)."""
    valid = targets != ignore_index
    if loss_mask is not None:
        if loss_mask.shape != targets.shape:
            raise ValueError(f"loss_mask {tuple(loss_mask.shape)} != targets {tuple(targets.shape)}")
        valid = valid & loss_mask.bool()
    count = _global_count(valid, mesh)
    if count.item() == 0:
        raise ValueError("sharded_lm_loss: no position counts (all ignored or masked out)")
    return valid, count


def global_value(term: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This rank's loss term with the value of the sum over the sp group (the global mean) and
    the gradient of the term alone."""
    total = term.detach().clone()
    if mesh.size > 1:
        dist.all_reduce(total, group=mesh.group)
    return term + (total - term.detach())


@torch.no_grad()
def sharded_accuracy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                     mesh: Mesh | None = None) -> float:
    """Fraction of masked positions whose argmax equals the target, over the sp group.

    logits [B, N_local, V], or the predicted ids [B, N_local] (e.g. from `model.loss`)."""
    mesh = mesh or Mesh.single()
    mask = mask.bool() & (targets != IGNORE)
    predictions = logits.argmax(-1) if logits.dim() == 3 else logits
    hits = ((predictions == targets) & mask).sum().to(torch.float64)
    stats = torch.stack([hits, mask.sum().to(torch.float64)])
    if mesh.size > 1:
        dist.all_reduce(stats, group=mesh.group)
    return float(stats[0] / stats[1].clamp(min=1))
