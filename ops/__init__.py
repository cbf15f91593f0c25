"""seqshard.ops: the math, exact across ranks.

- `seqshard.ops.attention`: distributed multi-head attention (ring, Ulysses, 2-D hybrid,
  all-gather-KV) and a drop-in for `scaled_dot_product_attention`.
- `seqshard.ops.delta_rule`: the parallel delta rule (DeltaNet), chunkwise WY form and sharded by
  state passing or a prefix scan over ranks.
- `seqshard.ops.fit`: FIT layers (local layers in token groups, global layers over latents).

Each folder keeps a readable `naive.py` (the test oracle) beside its fast and sharded forms.
Imports point down: ops uses seqshard.dist, never seqshard.models or seqshard.launch.
"""
