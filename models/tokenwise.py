"""Token-wise work in sequence pieces, recomputed in backward, so its memory is O(piece).

Activation checkpointing per block keeps only each block's input, but while one block is
recomputed in backward every intermediate of that block exists for the whole shard at once:
the MLP's hidden activations, and at the top the logits [N_local, vocab] with their
log-softmax and gradients. Sublayers that act on each token alone (MLP, norms, the LM head and
cross-entropy) give the same numbers when run piece by piece, so here each piece runs under
its own (nested, non-reentrant) checkpoint: forward keeps only the pieces' inputs (views of
the input), backward recomputes one piece at a time. The math is unchanged; sums over pieces
only reorder floating-point additions.

The piece size is `LMConfig.tokenwise_piece_tokens`. These pieces hold no state between them;
the DeltaNet mixer's own pieces (ops/delta_rule/pieces.py, `mixer_piece_tokens`) carry the
delta-rule state from piece to piece and are a different mechanism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqshard.dist import Mesh

from .loss import IGNORE, _check_ids, global_value, loss_weights


def _check_piece(piece_tokens: int) -> None:
    if not isinstance(piece_tokens, int) or piece_tokens < 1:
        raise ValueError(f"piece_tokens={piece_tokens!r} must be a positive integer")


def in_pieces(fn, x: torch.Tensor, piece_tokens: int) -> torch.Tensor:
    """fn applied to x [B, N, C] in pieces of `piece_tokens` along N, each recomputed in
    backward; fn must act on every token alone (fn(x)[:, i] depends on x[:, i] only).

    >>> mlp = torch.nn.Linear(8, 8)
    >>> x = torch.randn(1, 10, 8)
    >>> torch.allclose(in_pieces(mlp, x, 3), mlp(x))
    True
    """
    _check_piece(piece_tokens)
    if x.shape[1] <= piece_tokens or not torch.is_grad_enabled():
        return fn(x)  # nothing to bound: one piece, or no activations are kept anyway
    outs = [checkpoint(fn, part, use_reentrant=False)
            for part in torch.split(x, piece_tokens, dim=1)]
    return torch.cat(outs, dim=1)


def _piece_loss(head: nn.Module, norm: nn.Module | None, hidden: torch.Tensor,
                targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted token cross-entropies, argmax ids) of one piece.
    hidden [B, n, C] (before `norm` when one is given), targets [B, n] (ignored positions hold
    any valid id), weights [B, n]."""
    if norm is not None:
        hidden = norm(hidden)  # [B, n, C]
    logits = head(hidden).float()  # [B, n, V], fp32 like sharded_lm_loss
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # [B * n]
    return (ce * weights.flatten()).sum(), logits.detach().argmax(-1)


def lm_loss_in_pieces(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                    mesh: Mesh | None = None, *, loss_mask: torch.Tensor | None = None,
                    piece_tokens: int = 8192, norm: nn.Module | None = None,
                    ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """`sharded_lm_loss(head(hidden), targets=targets, ...)` without ever holding the logits
    of the whole shard: the head and cross-entropy run on pieces of `piece_tokens` tokens and
    are recomputed piece by piece in backward.

    hidden [B, N_local, C] (the final-norm output), head: the module mapping C -> vocab,
    targets [B, N_local] from `next_token_targets`, loss_mask [B, N_local] optional.
    Returns (loss, predictions): loss as `sharded_lm_loss` (value = global mean over the sp
    group, gradient = this rank's share), predictions [B, N_local] the argmax ids (for
    `sharded_accuracy`).
    norm: a token-wise module applied to each piece before the head (the final RMSNorm): then
    hidden is its input, and the norm's output and its saved tensors exist for one piece at a
    time instead of the whole shard (the result is the same: the norm acts on each token alone).

    Example:
        >>> head = torch.nn.Linear(8, 10, bias=False)
        >>> h, t = torch.randn(1, 7, 8), torch.tensor([[1, 2, 3, 4, 5, 6, -100]])
        >>> loss, pred = lm_loss_in_pieces(h, head, t, piece_tokens=3)
        >>> from seqshard.models import sharded_lm_loss
        >>> torch.allclose(loss, sharded_lm_loss(head(h), targets=t))
        True
    """
    mesh = mesh or Mesh.single()
    _check_piece(piece_tokens)
    _check_ids(targets, "targets")
    if hidden.dim() != 3 or hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets "
                         f"{tuple(targets.shape)} as [B, N_local, C] vs [B, N_local]")
    valid, count = loss_weights(targets, loss_mask, mesh, ignore_index)
    weights = valid.to(torch.float32) / count.to(torch.float32)  # [B, N_local]
    safe = torch.where(valid, targets, torch.zeros_like(targets))  # weight 0 where ignored
    total, predictions = hidden.new_zeros((), dtype=torch.float32), []
    # split, not slicing: its backward concatenates the pieces' gradients once, where each
    # slice's backward would write a zero-padded gradient of the whole shard
    pieces = zip(torch.split(hidden, piece_tokens, dim=1), torch.split(safe, piece_tokens, dim=1),
                 torch.split(weights, piece_tokens, dim=1))
    for args in ((head, norm, *piece) for piece in pieces):
        if torch.is_grad_enabled() and hidden.requires_grad:
            piece, pred = checkpoint(_piece_loss, *args, use_reentrant=False)
        else:
            piece, pred = _piece_loss(*args)
        total = total + piece
        predictions.append(pred)
    return global_value(total, mesh), torch.cat(predictions, dim=1)
