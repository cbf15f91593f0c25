"""Greedy generation for seqshard's LMs: a sharded prefill, then exact decode one token at a
time, batched over sequences.

    prefill(model, prompt_ids_local, max_len)  -> (cache, logits [B, V])   the prompt, sharded
    decode_step(model, token_ids, cache)       -> logits [B, V]            one new token
    generate(model, prompt_ids_local, mesh, max_new_tokens, ...) -> new ids [B, K]

The prompt runs through the model's usual sharded forward (its layout and strategies), and
each layer leaves what decoding needs on the rank that computed it (`models.kv_cache`):
attention layers their K/V shard, DeltaNet layers the final state and conv tail, FIT its
latents. A decoded token is the same on every rank; its K/V go to one rank (round-robin),
attention meets every rank's shard through `decode_attention` (one all-gather of
(out, lse) per layer per token), recurrent layers step their state with no communication.
Every rank gets the same logits and so picks the same token.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from seqshard.dist import Mesh, all_reduce, get_layout
from seqshard.dist.agree import agree, digest

from .kv_cache import ModelCache
from .layers import ShardContext
from .lm import CausalLM


def _mixer(model: CausalLM):
    """(prefill, step, layout) that run `model`'s blocks with a cache: prefill and step map
    (model, x [B, n, C], ctx) -> [B, n, C]; layout is the one the prefill runs on (None: the
    model's). Attention-only models run their own blocks; recurrent ones need their layers'
    final states, which their plain forward does not return."""
    from .deltanet import DeltaNetLM
    from .fit import FITLM

    if isinstance(model, DeltaNetLM):
        from .deltanet_decode import PREFILL_LAYOUT, deltanet_prefill, deltanet_step
        return deltanet_prefill, deltanet_step, PREFILL_LAYOUT
    if isinstance(model, FITLM):
        from .fit_decode import fit_prefill, fit_step
        return fit_prefill, fit_step, None
    return (lambda m, x, ctx: m.mix(x, ctx)), (lambda m, x, ctx: m.mix(x, ctx)), None


def _relaid_ids(ids_local: torch.Tensor, mesh: Mesh, layout: str, to: str) -> torch.Tensor:
    """This rank's shard of the prompt ids under layout `to`, from its shard under `layout`:
    one all-gather of the token ids (N integers, not the hidden stream)."""
    if layout == to or mesh.size == 1:
        return ids_local
    full = get_layout(layout).gather(ids_local, 1, mesh)  # [B, N]
    return get_layout(to).shard(full, 1, mesh.rank, mesh.size)


def _last_token_logits(model: CausalLM, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """Logits [B, V] of the prompt's last token (global position N - 1), on every rank: its
    owner contributes its hidden state, the others zeros, summed exactly by one all-reduce."""
    mine = (ctx.positions == ctx.seq_len - 1).nonzero().flatten()  # [0] or [1]
    hidden = x[:, int(mine[0])] if len(mine) else x.new_zeros(x.shape[0], x.shape[2])  # [B, C]
    if ctx.mesh.size > 1:
        hidden = all_reduce(hidden, ctx.mesh.group, timeout=ctx.mesh.timeout)
    return model.head(model.norm(hidden))  # [B, V]


@torch.no_grad()
def prefill(model: CausalLM, prompt_ids_local: torch.Tensor,
            max_len: int) -> tuple[ModelCache, torch.Tensor]:
    """Run the sharded prompt [B, N_local] through `model` and keep each layer's cache.

    max_len: the most tokens (prompt + generated) the cache makes room for. Returns the cache
    and the logits [B, V] after the prompt's last token, the same on every rank. Arguments are
    not checked across ranks here (`generate` does).
    """
    mesh = model.mesh
    n = prompt_ids_local.shape[1] * mesh.size
    capacity = prompt_ids_local.shape[1] + math.ceil(max(0, max_len - n) / mesh.size)
    cache = ModelCache(mesh, capacity, max_len=max_len, next_position=n)
    run, _, layout = _mixer(model)
    layout = layout or model.config.layout
    prompt_ids_local = _relaid_ids(prompt_ids_local, mesh, model.config.layout, layout)
    ctx = ShardContext.make(prompt_ids_local.shape[1], mesh, layout, prompt_ids_local.device,
                            cache=cache)
    x = run(model, model.embed(prompt_ids_local), ctx)  # [B, N_local, C]
    cache.decoding = True
    return cache, _last_token_logits(model, x, ctx)


@torch.no_grad()
def decode_step(model: CausalLM, token_ids: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """Feed one new token per sequence, token_ids [B] (the same on every rank), at the next
    position; returns logits [B, V] for the token after it, the same on every rank. A cache
    with no room left raises ValueError on every rank."""
    position = cache.next_position
    if position >= cache.max_len:
        raise ValueError(f"the cache is full: it was sized for max_len={cache.max_len} tokens "
                         f"and position {position} is past it")
    ctx = ShardContext.for_token(position, model.mesh, cache, token_ids.device)
    _, step, _ = _mixer(model)
    x = step(model, model.embed(token_ids[:, None]), ctx)  # [B, 1, C]
    cache.next_position += 1
    return model.head(model.norm(x[:, 0]))  # [B, V]


def _problem(model, prompt_ids_local, mesh, max_new_tokens, max_len) -> str | None:
    """What is wrong with this rank's arguments, or None."""
    if not isinstance(model, CausalLM):
        return f"generate needs a seqshard CausalLM, got {type(model).__name__}"
    if mesh is not model.mesh and (mesh.size, mesh.rank) != (model.mesh.size, model.mesh.rank):
        return (f"mesh (size {mesh.size}, rank {mesh.rank}) is not the model's mesh "
                f"(size {model.mesh.size}, rank {model.mesh.rank})")
    if prompt_ids_local.dim() != 2 or prompt_ids_local.dtype not in (torch.int32, torch.int64):
        return (f"prompt_ids_local must be integer token ids [B, N_local], got "
                f"{tuple(prompt_ids_local.shape)} {prompt_ids_local.dtype}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        return f"max_new_tokens={max_new_tokens!r} must be a positive integer"
    n = prompt_ids_local.shape[1] * mesh.size
    if n < 1:
        return "the prompt is empty"
    try:
        get_layout(model.config.layout).check(n, mesh.size)
    except ValueError as err:
        return f"prompt: {err}"
    group = getattr(model.config, "group_size", None)  # FITLM: shards of whole groups
    if group is not None and prompt_ids_local.shape[1] % group:
        return (f"the prompt shard has {prompt_ids_local.shape[1]} tokens per rank, not a "
                f"multiple of FITLM's group_size={group}")
    if n > max_len:
        return (f"the prompt has {n} tokens ({prompt_ids_local.shape[1]} per rank x "
                f"{mesh.size}), longer than max_len={max_len}")
    if n + max_new_tokens > max_len:
        return (f"the cache runs out of room: a prompt of {n} tokens + max_new_tokens="
                f"{max_new_tokens} is more than max_len={max_len}")
    return None


def generate(model: CausalLM, prompt_ids_local: torch.Tensor, mesh: Mesh | None = None,
             max_new_tokens: int = 16, *, max_len: int | None = None,
             on_token: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Greedy generation from a sharded prompt; every rank of the model's mesh calls it.

    model: a TransformerLM, DeltaNetLM (attention / window hybrids included) or FITLM built on
      `mesh` (None: the model's own mesh).
    prompt_ids_local: int64 [B, N_local], this rank's shard of the prompts [B, N] under the
      model's layout (`layout.shard(ids, 1, rank, P)`), the same N_local on every rank;
      N = N_local * P (FITLM: N_local a multiple of group_size).
    max_new_tokens: K, tokens to generate per sequence.
    max_len: the most tokens (prompt + generated) the KV caches are sized for; default
      N + K. A longer prompt, or N + K > max_len, raises ValueError on every rank.
    on_token: called as on_token(i, ids [B]) on every rank as each new token is chosen
      (streaming; i = 0 .. K - 1).
    Returns the new token ids int64 [B, K], the same on every rank: token-identical to
    greedy decoding of the unsharded model (its full forward recomputed per token). Ranks
    called with different shapes or options raise the same ValueError on every rank.
    """
    mesh = mesh or getattr(model, "mesh", None) or Mesh.single()
    prompt_len = prompt_ids_local.shape[-1] * mesh.size if prompt_ids_local.dim() else 0
    max_len = prompt_len + max_new_tokens if max_len is None else max_len
    problem = _problem(model, prompt_ids_local, mesh, max_new_tokens, max_len)
    facts = {"prompt": tuple(prompt_ids_local.shape), "max_new_tokens": max_new_tokens,
             "max_len": max_len, "model": type(model).__name__,
             "config": digest(sorted(vars(getattr(model, "config", None) or object()).items()))}
    agree(facts, mesh.group, what="generate", problem=problem, timeout=mesh.timeout)
    cache, logits = prefill(model, prompt_ids_local, max_len)
    new = []
    for i in range(max_new_tokens):
        token = logits.argmax(-1)  # [B]
        new.append(token)
        if on_token is not None:
            on_token(i, token)
        if i + 1 < max_new_tokens:
            logits = decode_step(model, token, cache)
    return torch.stack(new, dim=1)  # [B, K]
