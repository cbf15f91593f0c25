"""FIT (Far-reaching Interleaved Transformers): local layers inside groups of tokens, global
layers over a few latents per group, read/write cross-attention between them. Groups stay on
their rank; only latents travel. The oracle lives in `seqshard.ops.fit.naive` (tests import it).

    from seqshard.ops.fit import FIT, FITBlock
    y = FIT(dim, num_heads, group_size, num_latents, causal=True)(x_shard, mesh)
"""

from .fit import FIT, FITBlock

__all__ = ["FIT", "FITBlock"]
