"""The worker side of `seqshard generate`: greedy tokens from a trained run's model on every
rank, streamed to the driver by rank 0.

A prompt of any length N runs exactly: its longest prefix that shards evenly (a multiple of
`shard_unit`: the layout's divisor, and P * group_size for FITLM) goes through the sharded
prefill, the few tokens after it (fewer than one such unit) are fed one at a time through
`decode_step` as if generated, and then greedy decoding starts. When the prefix is the whole
prompt this is `models.generate.generate` itself.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from seqshard.dist import get_layout


def shard_unit(layout: str, sp: int, group_size: int | None = None) -> int:
    """Prompt lengths that shard evenly over sp ranks are the multiples of this: of the
    layout's divisor and, for FITLM (group_size given), of sp * group_size."""
    unit = get_layout(layout).divisor(sp)
    return math.lcm(unit, sp * group_size) if group_size else unit


@torch.no_grad()
def stream_greedy(model, prompt: torch.Tensor, prefix: int, max_new_tokens: int, max_len: int,
                  on_token: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Greedy ids [B, K] after the whole prompt [B, N] (the same on every rank of the model's
    mesh): the first `prefix` tokens sharded through the prefill, the rest decoded one by one.
    on_token(i, ids [B]) is called as each new token is chosen."""
    from seqshard.models.generate import decode_step, generate, prefill

    mesh = model.mesh
    head = get_layout(model.config.layout).shard(prompt[:, :prefix], 1, mesh.rank, mesh.size)
    if prefix == prompt.shape[1]:
        return generate(model, head, mesh, max_new_tokens, max_len=max_len, on_token=on_token)
    cache, logits = prefill(model, head, max_len)
    n, end = prompt.shape[1], prompt.shape[1] + max_new_tokens
    new = []
    for j in range(prefix, end):  # position j's token: the prompt's tail, then greedy choices
        if j < n:
            token = prompt[:, j]  # [B]
        else:
            token = logits.argmax(-1)  # [B]
            new.append(token)
            if on_token is not None:
                on_token(j - n, token)
        if j + 1 < end:
            logits = decode_step(model, token, cache)
    return torch.stack(new, dim=1)  # [B, K]


def _full_weights(trainer):
    """A context in which the model holds its whole parameters (gathered under ZeRO-3)."""
    if trainer.tc.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(trainer.engine.module.parameters()))


def run_generation(task, spec: dict, emit: Callable[[dict], None] | None) -> list[int]:
    """Generate `spec` (from `generate_cmd.plan`: prompt ids, prefix, max_new_tokens,
    max_len) with `task`'s loaded model; rank 0 (emit given) sends each token to the driver
    as a {"type": "token", "index", "id"} record. Returns the new ids."""
    trainer = getattr(task, "trainer", None)
    if trainer is None:
        raise ValueError("seqshard generate needs job.task = 'train' (a model to run)")
    model = trainer.engine.module
    model.eval()
    prompt = torch.tensor(spec["prompt"], dtype=torch.long, device=trainer.mesh.device)[None]

    def on_token(i: int, ids: torch.Tensor) -> None:
        if emit is not None:
            emit({"type": "token", "index": i, "id": int(ids[0])})

    with _full_weights(trainer), trainer.autocast:
        new = stream_greedy(model, prompt, spec["prefix"], spec["max_new_tokens"],
                            spec["max_len"], on_token)
    return new[0].tolist()
