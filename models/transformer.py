"""TransformerLM: a pre-norm decoder whose attention runs sharded over the mesh.

Block: x + ShardedCausalAttention(RMSNorm(x)) (RoPE from the layout's global positions, causal
`sharded_attention` with a selectable strategy), then x + SwiGLU(RMSNorm(x)).
"""

from __future__ import annotations

import torch
from torch import nn

from seqshard.dist import Mesh

from .config import TransformerConfig
from .layers import RMSNorm, ShardedCausalAttention, ShardContext, SwiGLU
from .lm import CausalLM


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = ShardedCausalAttention(cfg.dim, cfg.num_heads, cfg.num_kv_heads,
                                           cfg.head_dim, cfg.rope_theta, cfg.strategy)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(CausalLM):
    """Causal Transformer LM on a sharded sequence (any layout).

    Example (one process; pass a Mesh and each rank's shard to run sharded):
        >>> model = TransformerLM(TransformerConfig(vocab_size=64, dim=96, num_heads=2))
        >>> model(torch.randint(0, 64, (1, 10))).shape
        torch.Size([1, 10, 64])
    """

    packs_documents = True

    def __init__(self, config: TransformerConfig, mesh: Mesh | None = None):
        super().__init__(config, mesh)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.finish(list(self.blocks))
