"""DeltaNetLM: DeltaNet (delta-rule) blocks, optionally with some global-attention or
sliding-window-attention layers (the hybrids of the DeltaNet paper).

Block: x + Mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); the mixer is
`seqshard.ops.delta_rule.DeltaNet` (state passed across ranks), or for layers listed in
`attn_layers` the causal sharded attention with RoPE, or for `window_layers` causal
sliding-window attention of `window` tokens with RoPE (the halo comes from the previous
ranks).

Layouts: the delta rule passes its state rank to rank in sequence order, so it runs on
contiguous shards only; global attention is balanced only on zigzag or striped shards. On a
balanced layout the residual stream moves to the contiguous layout before a delta layer and
back before a global layer (`seqshard.dist.relayout`: each token once, O(shard) memory, the
reverse move in backward). Window layers and the token-wise halves run wherever the stream
is, so a move happens only where a delta layer and a global layer meet (sliding windows
between them attach to either side): (delta, window, delta, global) moves twice, not four
times. On striped, whose windows would move q, k and v to contiguous themselves, window
layers pull the stream to contiguous too. A stack without global layers on a balanced
layout moves in after the embedding and out before the head: the contiguous model plus two
moves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqshard.dist import Mesh, relayout, relayout_plan
from seqshard.ops.attention.window_layouts import MAX_HALO_RUNS
from seqshard.ops.delta_rule import DeltaNet

from .config import DeltaNetConfig
from .layers import RMSNorm, ShardedCausalAttention, ShardContext, SwiGLU
from .lm import CausalLM
from .tokenwise import in_pieces


class DeltaNetBlock(nn.Module):
    def __init__(self, cfg: DeltaNetConfig, mixer: str):
        """mixer: 'delta' | 'global' (causal attention) | 'window' (sliding window)."""
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.dim)
        self.is_attention = mixer in ("global", "window")
        if self.is_attention:
            head_dim = cfg.head_dim or cfg.dim // cfg.num_heads
            # the window has one algorithm (a halo exchange): cfg.strategy is for global layers
            window, strategy = (cfg.window, "auto") if mixer == "window" else (None, cfg.strategy)
            self.mixer = ShardedCausalAttention(cfg.dim, cfg.num_heads, cfg.num_heads, head_dim,
                                                cfg.rope_theta, strategy, window=window)
        else:
            self.mixer = DeltaNet(cfg.dim, cfg.num_heads, head_dim=cfg.head_dim,
                                  use_short_conv=cfg.use_short_conv, conv_size=cfg.conv_size,
                                  allow_neg_eigval=cfg.allow_neg_eigval, use_gate=cfg.use_gate,
                                  chunk_size=cfg.chunk_size, schedule=cfg.schedule,
                                  mixer_piece_tokens=cfg.mixer_piece_tokens or None)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_ratio)
        self.tokenwise_piece_tokens = cfg.tokenwise_piece_tokens

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        # token-wise, so in pieces recomputed in backward: the norm would otherwise save its
        # output [B, N_local, C] (for the weight's gradient) through the mixer's backward, and
        # its own backward would make several temporaries of the whole shard
        h = in_pieces(self.mixer_norm, x, self.tokenwise_piece_tokens)  # [B, N_local, C]
        # the delta layer skips its agreement gather: CausalLM.forward agreed on the token shards
        x = x + (self.mixer(h, ctx) if self.is_attention else self.mixer(h, ctx.mesh, check=False))
        del h  # the mixer has what it needs; do not hold [B, N_local, C] through the MLP
        # token-wise: in pieces, so its hidden activations are O(piece) (models/tokenwise.py)
        return in_pieces(self._mlp, x, self.tokenwise_piece_tokens)


class DeltaNetLM(CausalLM):
    """Causal DeltaNet LM (and its attention hybrids) on a sharded sequence, any layout.

    Example:
        >>> model = DeltaNetLM(DeltaNetConfig(vocab_size=64, dim=96, num_heads=2))
        >>> model(torch.randint(0, 64, (1, 10))).shape
        torch.Size([1, 10, 64])
    """

    def __init__(self, config: DeltaNetConfig, mesh: Mesh | None = None):
        super().__init__(config, mesh)
        self.blocks = nn.ModuleList(DeltaNetBlock(config, self.mixer_kind(i))
                                    for i in range(config.num_layers))
        # the delta-rule layers keep the op's own initialisation
        owned = [b.mlp for b in self.blocks] + [b.mixer for b in self.blocks if b.is_attention]
        self.finish(owned)

    def mixer_kind(self, layer: int) -> str:
        """'global', 'window' or 'delta': the mixer the config gives layer `layer`."""
        if layer in self.config.attn_layers:
            return "global"
        return "window" if layer in self.config.window_layers else "delta"

    def embed_and_mix(self, input_ids: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        """As CausalLM's, but under activation checkpointing on a plain stack of blocks (one
        rank or contiguous shards) the embedding runs inside block 0's checkpoint: what is
        kept for backward is the ids (8 bytes a token), not the embedding's output (4 * C
        bytes a token in fp32) through every block's backward. The recomputation stops once
        block 0's input is rebuilt (non-reentrant early stop), so only the embedding reruns."""
        plain = ctx.mesh.size == 1 or ctx.layout.name == "contiguous"
        if not (self.config.activation_checkpointing and torch.is_grad_enabled() and plain):
            return super().embed_and_mix(input_ids, ctx)
        x = checkpoint(self._embed_first_block, input_ids, ctx, use_reentrant=False)
        for block in self.blocks[1:]:
            x = block(x, ctx)
        return x  # [B, N_local, C]

    def _embed_first_block(self, input_ids: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        return self.blocks[0](self.embed(input_ids), ctx)  # [B, N_local, C]

    def mix(self, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        """x [B, N_local, C] in ctx's layout -> the blocks' output in the same layout, each
        block run on the layout its mixer needs (see the module docstring)."""
        if ctx.mesh.size == 1 or ctx.layout.name == "contiguous":
            return super().mix(x, ctx)
        # built once per forward: the plans are O(N) host work, the context a positions table
        to_contiguous = relayout_plan(ctx.layout, "contiguous", ctx.seq_len, ctx.mesh.size,
                                      ctx.mesh.rank)
        back = to_contiguous.inverse()
        contiguous = ShardContext.make(x.shape[1], ctx.mesh, "contiguous", x.device)
        # a window on a layout of many runs (striped) would move its q, k, v to contiguous
        # and its output back (window_layouts.py): moving the stream once is cheaper
        runs = len(ctx.layout.runs(ctx.seq_len, ctx.mesh.rank, ctx.mesh.size))
        on_contiguous = {"delta", "window"} if runs > MAX_HALO_RUNS else {"delta"}
        here = ctx  # the layout x is in now
        for i, block in enumerate(self.blocks):
            kind = self.mixer_kind(i)
            if kind in on_contiguous and here is ctx:
                x, here = relayout(x, ctx.mesh, ctx.layout, "contiguous", dim=1,
                                   plan=to_contiguous), contiguous  # [B, N_local, C]
            elif kind == "global" and here is contiguous:
                x, here = relayout(x, ctx.mesh, "contiguous", ctx.layout, dim=1,
                                   plan=back), ctx
            x = block(x, here)
        if here is contiguous:
            x = relayout(x, ctx.mesh, "contiguous", ctx.layout, dim=1, plan=back)
        return x
