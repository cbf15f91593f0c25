"""FITLM: a causal FIT stack (`seqshard.ops.fit.FIT`) between an embedding and an LM head.

FIT groups tokens locally and lets only a few latents per group travel between ranks; the
causal variant keeps every token's prediction independent of later tokens, so it trains as a
language model. Contiguous layout only; each rank's shard must hold whole groups.
"""

from __future__ import annotations

import torch

from seqshard.dist import Mesh
from seqshard.ops.fit import FIT

from .config import FITConfig
from .layers import ShardContext
from .lm import CausalLM


class FITLM(CausalLM):
    """Causal FIT language model.

    Example:
        >>> model = FITLM(FITConfig(vocab_size=64, dim=96, num_heads=2, group_size=5))
        >>> model(torch.randint(0, 64, (1, 20))).shape
        torch.Size([1, 20, 64])
    """

    supported_layouts = ("contiguous",)

    def __init__(self, config: FITConfig, mesh: Mesh | None = None):
        super().__init__(config, mesh)
        self.fit = FIT(config.dim, config.num_heads, config.group_size, config.num_latents,
                       depth=config.num_layers, local_layers=config.local_layers,
                       global_layers=config.global_layers, causal=True,
                       mlp_ratio=config.mlp_ratio,
                       # group-local work in pieces of about tokenwise_piece_tokens tokens
                       piece_groups=max(1, config.tokenwise_piece_tokens // config.group_size))
        self.finish([])

    def checkpoint_units(self):
        return self.fit.blocks

    def mix(self, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        if x.shape[1] % self.config.group_size:
            raise ValueError(f"FITLM: the local shard length {x.shape[1]} is not a multiple of "
                             f"group_size={self.config.group_size}")
        return self.fit(x, ctx.mesh)
