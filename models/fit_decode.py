"""FITLM with a cache: the prefill keeps FIT's latents, a decode step runs the open group.

A causal FIT token at position p (group g = p // n, slot p % n) depends on the tokens of its
own group up to itself (the causal local layers) and, in each block, on the latents of group
g - 1 after that block's global layers (the write; zeros for group 0). So decoding keeps:
- `sources[b]`: block b's output latents of the last closed group [B, m, D] (every rank);
- the open group's input tokens [B, s, D] (at most n - 1 of them), recomputed through the
  local layers and the write at every step: O(n) work, no communication;
- per global layer, an `AttentionCache` of its keys / values over every closed group's
  latents, sharded: each rank keeps its own prompt groups' (where the prefill computed
  them), a decoded group goes to rank g % P.
When a token closes its group, the group's latents are computed once per block (read over
the group's tokens, then the global layers as one `decode_attention` query of m latents at
position g against every rank's latent cache), and they become the next group's sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from seqshard.dist import all_reduce
from seqshard.ops.attention import decode_attention
from seqshard.ops.fit.fit import group_embedding

from .kv_cache import AttentionCache, tensor_bytes
from .layers import ShardContext


@dataclass
class FITState:
    """What FIT decoding carries between tokens (see the module docstring)."""

    sources: list  # per block: [B, m, D], the last closed group's output latents
    open_tokens: torch.Tensor  # [B, s, D]: the open group's embedded input tokens
    latent_kv: dict = field(default_factory=dict)  # global SelfLayer -> AttentionCache

    def nbytes(self) -> int:
        return (tensor_bytes(*self.sources, self.open_tokens)
                + sum(cache.nbytes() for cache in self.latent_kv.values()))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H * d] -> [B, H, L, d]"""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _latent_kv(layer, latents: torch.Tensor):
    """A global layer's keys and values [B, H, L, d] of its input latents [B, L, D]."""
    k, v = layer.attn.kv(layer.norm1(latents)).chunk(2, dim=-1)
    return _heads(k, layer.attn.num_heads), _heads(v, layer.attn.num_heads)


def fit_prefill(model, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """The prompt x [B, N_local, C] through the FIT stack, keeping the decode state in
    ctx.cache; returns [B, N_local, C]."""
    fit, mesh, cache = model.fit, ctx.mesh, ctx.cache
    n, m = fit.group_size, fit.num_latents
    if x.shape[1] % n:
        raise ValueError(f"FITLM: the local shard length {x.shape[1]} is not a multiple of "
                         f"group_size={n}")
    record: list[dict] = []
    y = fit(x, mesh, record=record)  # [B, N_local, C]
    t, prompt_groups = x.shape[1] // n, x.shape[1] * mesh.size // n
    # room per rank: its prompt groups, then its share of the groups decoding closes
    new_groups = math.ceil(max(0, cache.max_len - prompt_groups * n) / n)
    capacity = (t + math.ceil(new_groups / mesh.size)) * m
    group_of = torch.arange(mesh.rank * t, (mesh.rank + 1) * t, device=x.device)
    positions = group_of.repeat_interleave(m)  # [t*m]: a latent's "position" is its group
    state = FITState([], x.new_zeros(x.shape[0], 0, x.shape[2]))
    for block, kept in zip(fit.blocks, record):
        for layer, inputs in zip(block.global_layers, kept["global_inputs"]):
            k, v = _latent_kv(layer, inputs)  # [B, H, t*m, d]
            state.latent_kv[layer] = AttentionCache(mesh, capacity)
            state.latent_kv[layer].fill(k, v, positions, prompt_groups)
        state.sources.append(kept["latents"][:, -1])  # [B, m, D]: this rank's last group
    # the next group writes from the prompt's last group, which the last rank holds
    sources = torch.stack(state.sources)  # [depth, B, m, D]
    if mesh.size > 1:
        last = mesh.rank == mesh.size - 1
        sources = all_reduce(sources if last else torch.zeros_like(sources), mesh.group,
                             timeout=mesh.timeout)
    state.sources = list(sources)
    cache.layers[fit] = state
    return y


def _global_step(layer, latents: torch.Tensor, cache: AttentionCache, group: int,
                 ctx: ShardContext) -> torch.Tensor:
    """One global SelfLayer on a newly closed group's latents [B, m, D] (every rank): they
    join the latent cache (on rank group % P) and attend over every closed group's."""
    attn = layer.attn
    q = _heads(attn.q(layer.norm1(latents)), attn.num_heads)  # [B, H, m, d]
    k, v = _latent_kv(layer, latents)
    for j in range(latents.shape[1]):
        cache.append(k[:, :, j:j + 1], v[:, :, j:j + 1], group)
    k_cache, v_cache, key_groups = cache.view()
    query_groups = torch.full((latents.shape[1],), group, dtype=torch.int64,
                              device=latents.device)
    # generate agreed once on the shapes and options: no per-call agreement gather
    o = decode_attention(q, k_cache, v_cache, key_groups, query_groups, ctx.mesh,
                         check_agreement=False)  # [B, H, m, d]
    latents = latents + attn.out(o.transpose(1, 2).flatten(-2))
    return latents + layer.mlp(layer.norm2(latents))


def fit_step(model, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """One new token x [B, 1, C] (the same on every rank) at ctx.positions[0]."""
    fit = model.fit
    state: FITState = ctx.cache.layers[fit]
    n = fit.group_size
    group, slot = divmod(int(ctx.positions[0]), n)
    state.open_tokens = torch.cat([state.open_tokens, x], dim=1)  # [B, slot + 1, C]
    h = state.open_tokens + fit.token_pos[:slot + 1]
    after_local = []
    for block, source in zip(fit.blocks, state.sources):
        for layer in block.local_layers:
            h = layer(h, causal=True)  # [B, slot + 1, C]
        after_local.append(h)
        h = block.write(h, source)  # from the previous group's latents
    if slot == n - 1:  # the group is complete: its latents are the next group's sources
        latents = fit.latent_slots + group_embedding(
            torch.tensor([group], device=x.device), fit.dim).to(x.dtype)  # [m, C]
        latents = latents.expand(x.shape[0], -1, -1)  # [B, m, C]
        for b, block in enumerate(fit.blocks):
            latents = block.read(latents, after_local[b])
            for layer in block.global_layers:
                latents = _global_step(layer, latents, state.latent_kv[layer], group, ctx)
            state.sources[b] = latents
        state.open_tokens = state.open_tokens[:, :0]
    return h[:, -1:]
