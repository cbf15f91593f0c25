"""The model-level plan's memory per rank: parameters, gradients and optimizer state under
ZeRO, what every block keeps for backward and its backward transient, communication buffers.
The counts and the reasons behind each are in model_plan.py's docstring and the comments
below; `memory(spec, n, choice, world, hw)` is the entry point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import planner
from .planner import Hardware


GRAD_BUCKET = 5e8  # elements: DeepSpeed's default reduce / allreduce bucket
# What the whole-shard DeltaNet mixer keeps per token, in units of the width C (with
# H x chunk more for the chunk-local attention): the q, k, v projections, their conv outputs
# and activations, normalised q, k, the chunk kernel's W and U, the output and its norm.
# Counted with saved-tensor hooks on a DeltaNetBlock (C = 64, H = 2, chunk 64: 12.9 C + H x
# chunk); "~16 KB per token at width 256" in benchmarks/RESULTS.md (fp32) is 14.3 KB by it.
DELTA_KEPT_C = 13
# FIT per block and token, in units of C: the local layer's norms, q, k, v, out, MLP hidden
# (the transformer block's count) where the group-local work is whole; in pieces it keeps the
# pieces' inputs and the read / write paths (measured with saved-tensor hooks: 3.2 C).
FIT_KEPT_C, FIT_PIECES_KEPT_C = 21, 3.2


@dataclass(frozen=True)
class ModelSpec:
    """What the plan needs of a model: its merged config and its parameter counts."""

    kind: str
    config: object          # the merged LMConfig (models/config.py)
    train: object           # TrainConfig
    params: int             # all parameters
    block_dense: tuple      # per block: matmul weights every token passes through
    mixers: tuple           # per block: 'attention' | 'window' | 'delta' | 'fit'


def spec_of(kind: str, model: dict, train: dict) -> ModelSpec:
    """The ModelSpec of a model config and a train config (dicts as in a job file)."""
    import torch

    from seqshard.models import build_model
    from seqshard.models.config import make_train_config, merged_model_config

    tc = make_train_config(train)
    mc = merged_model_config(kind, dict(model), tc)
    with torch.device("meta"):  # shapes only: a 70B model costs nothing to count
        m = build_model(kind, mc, None)
    params = sum(p.numel() for p in m.parameters())
    linear = lambda mod: sum(s.weight.numel() for s in mod.modules()  # noqa: E731
                             if isinstance(s, torch.nn.Linear))
    if kind == "fit":
        return ModelSpec(kind, mc, tc, params, (0,), ("fit",))
    mixers = tuple(m.mixer_kind(i) if kind == "deltanet" else "attention"
                   for i in range(mc.num_layers))
    mixers = tuple({"global": "attention"}.get(x, x) for x in mixers)
    return ModelSpec(kind, mc, tc, params, tuple(linear(b) for b in m.blocks), mixers)


def spec_from_job(job) -> ModelSpec:
    """From a launch.config JobConfig (`load(path)`)."""
    model = {k: v for k, v in job.model.items() if k != "kind"}
    return spec_of(job.model["kind"], model, job.train)


@dataclass(frozen=True)
class Choice:
    dp: int
    ulysses: int
    ring: int
    strategy: str               # the attention layers' (or the delta rule's schedule, 'fit')
    checkpointing: bool
    tokenwise_piece_tokens: int
    mixer_piece_tokens: int     # 0: the DeltaNet mixer over the whole shard
    layout: str = "contiguous"  # zigzag balances a TransformerLM's causal ring / all-gather

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring


# --- shapes of the mixers, as planner.py takes them ---------------------------------------------
def _attn_shape(spec: ModelSpec, batch: int) -> dict:
    c = spec.config
    kv = getattr(c, "num_kv_heads", None) or c.num_heads
    return {"batch": batch, "heads": c.num_heads, "kv_heads": kv,
            "head_dim": c.head_dim or c.dim // c.num_heads, "causal": True}


def _delta_shape(spec: ModelSpec, batch: int, hw: Hardware) -> dict:
    c = spec.config
    d = c.head_dim or c.dim // c.num_heads
    chunk = c.chunk_size or (32 if hw.shared_cores else 64)  # models/config.py's default
    return {"batch": batch, "heads": c.num_heads, "dk": d, "dv": d, "chunk": chunk}


def _fit_shape(spec: ModelSpec, batch: int) -> dict:
    c = spec.config
    return {"batch": batch, "dim": c.dim, "heads": c.num_heads, "group_size": c.group_size,
            "latents": c.num_latents, "depth": c.num_layers, "causal": True,
            "mlp_ratio": c.mlp_ratio, "global_layers": c.global_layers}


def mixer_family(spec: ModelSpec, mixer: str, hw: Hardware) -> tuple[str, dict]:
    """(planner family, its shape) of a block's mixer, for the per-layer tables."""
    b = spec.train.batch_size
    if mixer in ("attention", "window"):
        return "attention", _attn_shape(spec, b)
    if mixer == "delta":
        return "delta_rule", _delta_shape(spec, b, hw)
    return "fit", _fit_shape(spec, b)


def _act_bytes(spec: ModelSpec) -> int:
    return 2 if spec.train.dtype == "bf16" else 4


def _hidden(spec: ModelSpec) -> int:
    c = spec.config
    return -(-(2 * c.mlp_ratio * c.dim // 3) // 8) * 8  # SwiGLU's width (models/layers.py)


# --- memory -------------------------------------------------------------------------------------
def kept_per_token(spec: ModelSpec, mixer: str, ch: Choice, n_local: int, hw: Hardware) -> float:
    """Bytes one block keeps for backward per local token (not checkpointed)."""
    c, e, h = spec.config, _act_bytes(spec), _hidden(spec)
    tokenwise_whole = n_local <= ch.tokenwise_piece_tokens
    # the MLP half: its RMSNorm keeps input, normalised and scaled rows (3 C); SwiGLU keeps
    # w1 x, silu(w1 x), w3 x and their product (4 h). DeltaNet runs it in token-wise pieces,
    # which keep only the pieces' inputs (views of x: C).
    mlp = 3 * c.dim + 4 * h if (mixer != "delta" or tokenwise_whole) else c.dim
    if mixer in ("attention", "window"):
        a = _attn_shape(spec, 1)
        qd, kvd = a["heads"] * a["head_dim"], a["kv_heads"] * a["head_dim"]
        # RMSNorm: input, normalised, scaled (3 C); RoPE keeps only its cos / sin tables
        # (2 head_dim: the tables need no gradient, so the products keep no q, k); the op
        # keeps rotated q, k, v and its output (2 qd + 2 kvd) and the fp32 LSE per head
        # (saved-tensor hooks on a TransformerBlock count the same)
        return (e * (3 * c.dim + 2 * qd + 2 * kvd + 2 * a["head_dim"] + mlp)
                + 4 * a["heads"])
    if mixer == "delta":
        d = _delta_shape(spec, 1, hw)
        if ch.mixer_piece_tokens and n_local > ch.mixer_piece_tokens:
            mixer_b = e * c.dim  # its input; one state per piece is counted in `_transient`
        else:
            mixer_b = _delta_mixer_kept(spec, 1, hw)
        return e * 3 * c.dim + mixer_b + e * mlp
    if mixer == "fit":  # the whole stack, per token
        per_block = FIT_KEPT_C if tokenwise_whole else FIT_PIECES_KEPT_C
        return e * c.dim * per_block * c.num_layers
    raise ValueError(f"mixer={mixer!r}: expected attention, window, delta or fit")


def _delta_mixer_kept(spec, n_tokens: int, hw: Hardware) -> float:
    """Bytes the whole-shard DeltaNet mixer keeps over n_tokens (per batch row)."""
    d = _delta_shape(spec, 1, hw)
    return _act_bytes(spec) * (DELTA_KEPT_C * spec.config.dim + d["heads"] * d["chunk"]) * n_tokens


def _transient(spec, mixer, ch, n_local, hw) -> float:
    """Bytes a block's backward adds at its peak: the gradients entering and leaving it
    (2 C per token); its graph again when checkpointed (rebuilt before its backward; FIT's
    unit is one of its blocks); and for the DeltaNet mixer, the gradients of the chunk
    kernel's intermediates (as large as what it keeps), over the whole shard or, in
    pieces, over one piece plus one state per piece."""
    c, b = spec.config, spec.train.batch_size
    out = _act_bytes(spec) * 2 * c.dim * b * n_local
    if ch.checkpointing:  # less the block's input, which the checkpoint already keeps
        graph = (kept_per_token(spec, mixer, ch, n_local, hw)
                 - _act_bytes(spec) * c.dim * (c.num_layers if mixer == "fit" else 1))
        out += graph * b * n_local / (c.num_layers if mixer == "fit" else 1)
    if mixer == "delta":
        pieces = ch.mixer_piece_tokens and n_local > ch.mixer_piece_tokens
        span = ch.mixer_piece_tokens if pieces else n_local
        out += _delta_mixer_kept(spec, span, hw) * b * (2 if pieces else 1)
        if pieces:
            d = _delta_shape(spec, b, hw)
            out += 4 * b * d["heads"] * d["dk"] * d["dv"] * math.ceil(n_local / span)
    return out


def _op_buffers(spec, mixer, ch, n, hw) -> float:
    """The strategy's own buffers beyond its inputs, outputs and their gradients: attention's
    ring blocks / all-to-all heads / gathered K, V; FIT's latents of every rank, gathered for
    each global layer and the causal write, and their gradients (4 per block)."""
    if mixer == "fit" and ch.sp > 1:
        c = spec.config
        lat_b = (spec.train.batch_size * (n // ch.sp // c.group_size) * c.num_latents * c.dim
                 * _act_bytes(spec))
        return 4 * lat_b * ch.sp * c.num_layers
    if mixer != "attention" or ch.sp == 1:
        return 0.0
    shape = _attn_shape(spec, spec.train.batch_size)
    t = planner.terms("attention", ch.strategy, shape, n, ch.ulysses, ch.ring, hw)
    q_b = shape["batch"] * shape["heads"] * (n // ch.sp) * shape["head_dim"] * hw.dtype_bytes
    kv_b = q_b * shape["kv_heads"] // shape["heads"]
    return max(0.0, t.mem_bytes - (2 * (q_b + 2 * kv_b) + q_b))


def memory(spec: ModelSpec, n: int, ch: Choice, world: int, hw: Hardware):
    """(split {name: bytes per rank}, per block [(mixer, kept, transient)])."""
    tc, c = spec.train, spec.config
    p, z, b, e = spec.params, tc.zero_stage, tc.batch_size, _act_bytes(spec)
    n_local = n // ch.sp
    split = {"parameters": 4 * p / (world if z >= 3 else 1),
             "gradients": 4 * p / (world if z >= 2 else 1),
             "optimizer": ((8 * p if tc.optimizer == "adamw" else 0) + (4 * p if z else 0))
             / (world if z else 1)}
    per_kind = {}  # the blocks of one mixer kind are alike: count each kind once
    for mixer in set(spec.mixers):
        ckpt = e * c.dim * (c.num_layers if mixer == "fit" else 1)  # the blocks' inputs
        kept = (ckpt if ch.checkpointing else
                kept_per_token(spec, mixer, ch, n_local, hw)) * b * n_local
        per_kind[mixer] = (mixer, kept, _transient(spec, mixer, ch, n_local, hw))
    blocks = [per_kind[m] for m in spec.mixers]
    if (spec.kind == "deltanet" and ch.checkpointing
            and (ch.sp == 1 or ch.layout == "contiguous")):
        # DeltaNetLM.embed_and_mix: the embedding reruns inside block 0's checkpoint, which
        # keeps the ids (8 bytes a token) instead of the embedded stream
        mixer, kept, transient = blocks[0]
        blocks[0] = (mixer, 8 * b * n_local, transient)
    piece = min(n_local, ch.tokenwise_piece_tokens) * b
    # the last block's output, which the loss pieces' checkpoints keep (the final norm runs
    # inside each piece: its output never exists for the whole shard)
    ends = e * c.dim * b * n_local
    loss = 3 * 4 * piece * c.vocab_size  # one loss piece's fp32 logits, softmax and gradient
    # backward runs the loss first, then one block at a time: the peak is what every block
    # keeps plus the largest of those transients
    split["activations"] = (sum(k for _, k, _ in blocks) + ends
                            + max(loss, *(t for _, _, t in blocks)))
    buckets = 4 * min(p, GRAD_BUCKET) if world > 1 else 0
    split["comm buffers"] = buckets + max(_op_buffers(spec, m, ch, n, hw) for m in per_kind)
    split["total"] = sum(split.values())
    return split, blocks
