"""DeltaNetLM's blocks run with a cache: the prefill keeps each delta layer's final state and
conv tail, each attention layer its K/V shard; a decode step moves one token through them.

Walks `DeltaNetLM.blocks` from outside (the block's forward returns no state): the same
block math, x + mixer(mixer_norm(x)) then the token-wise MLP. The prefill runs on the
contiguous layout (the delta rule's own; `generate` hands it contiguous shards), where every
mixer is exact. The delta state after the prompt is on every rank (`DeltaNet.forward(
final_state=True)`), so a decoded token steps it on every rank with no communication: the
other choice, the state on one rank and the token's mixer output broadcast from it, costs a
collective per delta layer per token to save a [B, H, Dk, Dv] update that every rank
repeats in microseconds.
"""

from __future__ import annotations

import torch

from .kv_cache import RecurrentState
from .layers import ShardContext
from .tokenwise import in_pieces

PREFILL_LAYOUT = "contiguous"


def deltanet_prefill(model, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """The prompt x [B, N_local, C] (contiguous shards) through every block, filling
    ctx.cache; returns [B, N_local, C]."""
    for block in model.blocks:
        h = block.mixer_norm(x)  # [B, N_local, C]
        if block.is_attention:
            y = block.mixer(h, ctx)  # stores its K/V in ctx.cache
        else:
            # generate agreed on the shards once: no per-layer agreement gather
            y, state, tail = block.mixer(h, ctx.mesh, check=False, final_state=True)
            ctx.cache.layers[block.mixer] = RecurrentState(state, tail)
        x = in_pieces(block._mlp, x + y, block.tokenwise_piece_tokens)
    return x


def deltanet_step(model, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """One new token x [B, 1, C] (the same on every rank) through every block; the delta
    layers step their state here, the attention layers read every rank's cache."""
    for block in model.blocks:
        h = block.mixer_norm(x)  # [B, 1, C]
        if block.is_attention:
            y = block.mixer(h, ctx)
        else:
            layer = ctx.cache.layers[block.mixer]
            y, layer.state = block.mixer._mix(h, context=layer.conv_tail, state=layer.state)
            # the conv reads the last `halo` inputs: slide the tail by one token
            layer.conv_tail = torch.cat([layer.conv_tail, h], dim=1)[:, 1:]
        x = block._mlp(x + y)
    return x
