"""seqshard.ops.attention: exact multi-head attention on one device and across ranks.

- `sharded_attention(q, k, v, mesh, *, causal, scale, layout, strategy, doc_lens)`: ring,
  Ulysses, 2-D hybrid and all-gather-KV strategies, forward and backward.
- `ShardedAttention`: the same as an nn.Module; `make_sdpa(mesh, ...)`: a drop-in with
  torch's `scaled_dot_product_attention` signature.
- `local_attention(q, k, v, causal, scale) -> (out, lse)`: the fused single-device kernel.
- `window_attention(q, k, v, mesh, window=W)`: causal sliding window (also reached through
  `sharded_attention(..., causal=True, window=W)`).
- `decode_attention(q, k_cache, v_cache, key_positions, query_positions, mesh, window=W)`:
  new tokens' queries (replicated) against a KV cache sharded over ranks, merged by LSE.

The readable reference lives in `seqshard.ops.attention.naive` (tests import it).
"""

from .decode import decode_attention
from .kernels import local_attention
from .sharded import STRATEGIES, ShardedAttention, make_sdpa, resolve_strategy, sharded_attention
from .window import window_attention

__all__ = [
    "STRATEGIES", "ShardedAttention", "decode_attention", "local_attention", "make_sdpa",
    "resolve_strategy", "sharded_attention", "window_attention",
]
