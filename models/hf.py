"""Hugging Face adapter: run a transformers causal LM on a sharded sequence, and generate from it.

    from seqshard.models.hf import register_sharded_attention, shard_for_hf
    name = register_sharded_attention(mesh, layout="zigzag", strategy="ring")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    ids_local, position_ids = shard_for_hf(input_ids, mesh, layout="zigzag")
    logits_local = model(input_ids=ids_local, position_ids=position_ids, use_cache=False).logits

Registration goes through transformers' public `AttentionInterface.register(name, fn)`, so every
model whose attention layers dispatch through that registry (Llama, Qwen2/3, Mistral, ...)
computes exact attention over the whole sequence while each rank holds only its shard
(sliding-window layers and `layer_types` mixes too, on every layout). The
rotary embeddings stay right because `position_ids` carry the layout's global positions. The
name is deliberately NOT registered with the attention-mask registry, so transformers builds no
(local, hence wrong) mask and passes attention_mask=None; causality comes from the layer.
Train with `seqshard.models.sharded_lm_loss` on the local logits and sum parameter gradients
over the sp group.

Generation (`seqshard.models.hf_cache.ShardedCache`, transformers 5): every rank passes its
prompt shard and its own ShardedCache built with the same arguments; the prompt's K/V stay on
the rank that computed them, each new token attends over all ranks' shards
(`seqshard.ops.attention.decode_attention`) and is cached round-robin, and every rank returns
the same new tokens, equal to the unsharded model's. The cache sets the global position_ids
itself (pass none), supports greedy search and sampling (with the same seed on every rank),
not beams, padding or inputs_embeds. As printed it runs on one process; on P ranks the same
lines run on every rank with the mesh from `Mesh.from_env()`:

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from seqshard.dist import Mesh
    from seqshard.models.hf import register_sharded_attention, shard_for_hf
    from seqshard.models.hf_cache import ShardedCache

    mesh = Mesh.single()
    name = register_sharded_attention(mesh, layout="zigzag")
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name).eval()
    prompt = torch.randint(0, 64, (1, 16))                   # [B, N], N a multiple of 2P
    ids_local, _ = shard_for_hf(prompt, mesh, layout="zigzag")
    cache = ShardedCache(model, mesh, layout="zigzag", max_tokens=32)   # prompt + new tokens
    out = model.generate(ids_local, cache=cache, max_new_tokens=8, do_sample=False)
    new_tokens = out[:, ids_local.shape[1]:]                 # [B, 8], the same on every rank
"""

from __future__ import annotations

import torch

from seqshard.dist import Layout, Mesh, get_layout
from seqshard.ops.attention import decode_attention, sharded_attention

CACHE_KWARG = "seqshard_cache"  # the keyword ShardedCache's hook passes down to attention


def _unsupported(kwargs: dict) -> None:
    for key in ("softcap",):
        if kwargs.get(key) is not None:
            raise ValueError(f"seqshard sharded attention does not support {key}="
                             f"{kwargs[key]!r}; use a config without it")


def _check_cache(cache, mesh: Mesh | None, layout: Layout, name: str) -> None:
    """The ShardedCache must shard over the registered attention's ranks and layout."""
    size, rank = (1, 0) if mesh is None else (mesh.size, mesh.rank)
    if (cache.mesh.size, cache.mesh.rank, cache.layout.name) != (size, rank, layout.name):
        raise ValueError(
            f"{name}: the ShardedCache shards over {cache.mesh.size} ranks with layout "
            f"{cache.layout.name!r} but the attention was registered for {size} ranks with "
            f"layout {layout.name!r}; build both from the same mesh and layout")


def register_sharded_attention(mesh: Mesh | None, *, layout: str | Layout = "contiguous",
                               strategy: str = "auto", name: str = "seqshard") -> str:
    """Register sharded attention over `mesh` under `name`; returns the name to pass as
    `attn_implementation`. Register one name per (mesh, layout, strategy) you use.
    """
    from transformers import AttentionInterface

    layout = get_layout(layout)

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                  scaling: float | None = None, is_causal: bool | None = None, **kwargs):
        # query [B, Hq, N_local, D], key/value [B, Hkv, N_local, D] (GQA handled by the op)
        if attention_mask is not None:
            raise ValueError(
                f"{name}: got an attention_mask of shape {tuple(attention_mask.shape)}; sharded "
                f"attention is causal over the global sequence and takes no mask (pass "
                f"position_ids from shard_for_hf and no attention_mask)")
        if dropout:
            raise ValueError(f"{name}: attention dropout={dropout} is not supported (exact op)")
        _unsupported(kwargs)
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        # sliding-window layers (Mistral, Qwen's layer_types): transformers passes the window
        # per call; key t-W+1 .. t, its convention, is the op's; any layout
        window = kwargs.get("sliding_window")
        cache = kwargs.get(CACHE_KWARG)  # set by ShardedCache's hook during generation
        if cache is not None:
            _check_cache(cache, mesh, layout, name)
        if cache is not None and not cache.prefilling:
            # decode: the new tokens (same on every rank) against every rank's cache shard;
            # the call was agreed once per forward by the cache's hook
            out = decode_attention(query, key, value, cache.layers[module.layer_idx].positions,
                                   cache.step_positions, mesh, scale=scaling, window=window,
                                   check_agreement=False)  # [B, Hq, T, D]
        else:
            out = sharded_attention(query, key, value, mesh, causal=causal, scale=scaling,
                                    layout=layout, strategy="auto" if window else strategy,
                                    window=window)  # [B, Hq, N_local, D]
        if cache is not None and window:
            cache.window_done(module.layer_idx, window)
        return out.transpose(1, 2).contiguous(), None  # transformers wants [B, N_local, H, D]

    AttentionInterface.register(name, attention)
    return name


def shard_for_hf(input_ids: torch.Tensor, mesh: Mesh | None, *,
                 layout: str | Layout = "contiguous") -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (input_ids [B, N_local], position_ids [B, N_local]) from a full batch
    [B, N]: the shard the layout assigns and its global positions (for rotary embeddings)."""
    mesh = mesh or Mesh.single()
    layout = get_layout(layout)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, N], got {tuple(input_ids.shape)}")
    ids = layout.shard(input_ids, 1, mesh.rank, mesh.size)
    positions = layout.positions(input_ids.shape[1], mesh.rank, mesh.size).to(input_ids.device)
    return ids, positions.unsqueeze(0).expand(ids.shape[0], -1)
