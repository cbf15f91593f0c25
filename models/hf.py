"""Hugging Face adapter: run a transformers causal LM on a sharded sequence.

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
"""

from __future__ import annotations

import torch

from seqshard.dist import Layout, Mesh, get_layout
from seqshard.ops.attention import sharded_attention


def _unsupported(kwargs: dict) -> None:
    for key in ("softcap",):
        if kwargs.get(key) is not None:
            raise ValueError(f"seqshard sharded attention does not support {key}="
                             f"{kwargs[key]!r}; use a config without it")


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
        out = sharded_attention(query, key, value, mesh, causal=causal, scale=scaling,
                                layout=layout, strategy="auto" if window else strategy,
                                window=window)  # [B, Hq, N_local, D]
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
