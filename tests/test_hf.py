"""Hugging Face models (tiny random Llama- and Qwen-style configs, no downloads) with seqshard's
sharded attention registered through transformers' AttentionInterface: logits, loss and every
parameter gradient equal the unsharded model's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import mesh, run_ranks

pytest.importorskip("transformers")

TOL = 5e-5


def _tiny_config(style: str):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=61, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=48,
                  max_position_embeddings=256, tie_word_embeddings=False)
    if style == "llama":
        return LlamaConfig(**common)
    if style == "mistral":  # every layer a sliding window of 7 keys
        return MistralConfig(**common, sliding_window=7)
    if style == "gemma3":  # Gemma 3's mix: window layers, then a global one (5 : 1 there)
        return Gemma3TextConfig(**dict(common, num_hidden_layers=3), sliding_window=5,
                                query_pre_attn_scalar=48,
                                layer_types=["sliding_attention"] * 2 + ["full_attention"])
    if style == "qwen2":  # Qwen 2: biased q/k/v projections
        return Qwen2Config(**common, use_sliding_window=False)
    if style == "qwen_mix":  # Qwen's layer_types: a window layer and a global one
        return Qwen3Config(**common, use_sliding_window=True, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])
    return Qwen3Config(**common, use_sliding_window=False)


def _err(ref, out) -> float:
    return (ref.float() - out.float()).abs().max().item()


def _hf_case(rank, world, style: str, layout: str, strategy: str, seq_len: int, degrees: dict):
    from transformers import AutoModelForCausalLM

    from seqshard.models import sharded_lm_loss
    from seqshard.models.hf import register_sharded_attention, shard_for_hf

    m = mesh(**degrees)
    name = register_sharded_attention(m, layout=layout, strategy=strategy,
                                      name=f"seqshard_{layout}_{strategy}_{m.size}")
    config = _tiny_config(style)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    # a config of its own: from_config writes attn_implementation into the config it is given
    reference = AutoModelForCausalLM.from_config(_tiny_config(style), attn_implementation="eager")
    assert model.config._attn_implementation == name
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, seq_len),
                        generator=torch.Generator().manual_seed(seq_len))
    ids_local, position_ids = shard_for_hf(ids, m, layout=layout)

    logits = model(input_ids=ids_local, position_ids=position_ids, use_cache=False).logits
    loss = sharded_lm_loss(logits, ids_local, m, layout=layout)
    loss.backward()
    full_logits = reference(input_ids=ids, use_cache=False).logits
    full_loss = sharded_lm_loss(full_logits, ids)
    full_loss.backward()

    from seqshard.dist import get_layout

    lay = get_layout(layout)
    errors = {"loss": _err(full_loss, loss.detach()),
              "logits": _err(lay.shard(full_logits.detach(), 1, m.rank, m.size), logits.detach())}
    ref_params = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        grad = p.grad.clone()
        if m.size > 1:
            dist.all_reduce(grad, group=m.group)
        errors[pname] = _err(ref_params[pname].grad, grad)
    return errors


@pytest.mark.parametrize("style,layout,strategy,world,degrees", [
    ("llama", "zigzag", "ring", 2, {}),
    ("qwen", "contiguous", "ulysses", 2, {"ulysses": 2}),
    ("llama", "striped", "allgather", 1, {}),
    ("mistral", "contiguous", "auto", 2, {}),
])
def test_hf_sharded_equals_unsharded(style, layout, strategy, world, degrees):
    results = run_ranks(_hf_case, world, style, layout, strategy, 20, degrees)
    for rank, errors in enumerate(results):
        assert len(errors) > 10, errors  # loss, logits and every parameter
        bad = {k: v for k, v in errors.items() if v > TOL}
        assert not bad, f"{style} rank {rank}: {bad}"


def _hf_cases(rank, world, cases, seq_len):
    return [_hf_case(rank, world, style, layout, strategy, seq_len, {})
            for style, layout, strategy in cases]


# windows on balanced layouts (they raised "needs layout='contiguous'" before): 24 tokens,
# so zigzag runs of 3 at P = 4, shorter than every window; global layers on the ring
WINDOW_CASES = [("mistral", "zigzag", "auto"), ("gemma3", "zigzag", "ring"),
                ("qwen_mix", "striped", "ring")]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_hf_windows_on_balanced_layouts_equal_unsharded(world):
    results = run_ranks(_hf_cases, world, WINDOW_CASES, 24)
    for rank, per_case in enumerate(results):
        for (style, layout, _), errors in zip(WINDOW_CASES, per_case):
            assert len(errors) > 10, errors  # loss, logits and every parameter
            bad = {k: v for k, v in errors.items() if v > TOL}
            assert not bad, f"{style} on {layout}, P={world} rank {rank}: {bad}"


def _mask_rejected(rank, world):
    from seqshard.models.hf import register_sharded_attention

    fn_name = register_sharded_attention(mesh(), name="seqshard_mask_check")
    from transformers import AttentionInterface

    fn = AttentionInterface()[fn_name]
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_mask of shape"):
        fn(torch.nn.Module(), q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="softcap"):
        fn(torch.nn.Module(), q, q, q, None, softcap=30.0)
    return True


def test_hf_rejects_masks():
    assert run_ranks(_mask_rejected, 1) == [True]
