"""Typed configs: one dataclass per model kind, and the training config.

Every field has a docstring-style comment; `make_config(kind, dict)` turns a plain dict (from
TOML or the launcher) into the right dataclass and rejects unknown keys with ValueError;
`merged_model_config` adds the train config's sharding choices, as the Trainer runs it.

Two knobs cut work into sequence pieces, and they are different things:
`tokenwise_piece_tokens` (every model) cuts the token-wise MLP, LM head and loss, with
recomputation; `mixer_piece_tokens` (DeltaNet) cuts the delta-rule mixer, which carries its
state from piece to piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from seqshard.ops.attention import STRATEGIES

from .fill import fill

DTYPES = ("fp32", "bf16")


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name}={value!r} must be a positive integer")


@dataclass
class LMConfig:
    """Fields every language model shares."""

    vocab_size: int = 256
    """Number of token ids; the head produces this many logits per token."""
    dim: int = 128
    """Model width (residual stream size)."""
    num_layers: int = 2
    """Number of blocks."""
    num_heads: int = 4
    """Attention / mixer heads."""
    mlp_ratio: int = 4
    """Hidden size of the feed-forward block is mlp_ratio * dim (SwiGLU uses 2/3 of it)."""
    layout: str = "contiguous"
    """How the sequence is sharded over the sp group: contiguous | zigzag | striped."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of keeping its activations."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    tokenwise_piece_tokens: int = 8192
    """Tokens per piece when token-wise work (LM head + loss, MLPs; FIT's group-local work)
    runs piece by piece with recomputation (see models/tokenwise.py); bounds its transient
    memory, same math."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "piece_tokens": "tokenwise_piece_tokens for the MLP / head / loss pieces, or "
                        "mixer_piece_tokens for the DeltaNet mixer's state-carrying pieces",
    }

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "dim", "num_layers", "num_heads", "mlp_ratio",
                  "tokenwise_piece_tokens")


@dataclass
class TransformerConfig(LMConfig):
    """A pre-norm decoder: RMSNorm -> attention (RoPE) -> RMSNorm -> SwiGLU."""

    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (None = num_heads)."""
    head_dim: int | None = None
    """Per-head width (None = dim // num_heads)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    strategy: str = "auto"
    """Sharded attention algorithm: auto | ring | ulysses | hybrid | allgather."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
            self.head_dim = self.dim // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: expected one of {STRATEGIES}")


@dataclass
class DeltaNetConfig(LMConfig):
    """DeltaNet blocks (delta-rule mixer + SwiGLU); optionally some layers global or
    sliding-window attention. Any layout: on zigzag / striped the delta layers run on the
    stream moved to contiguous shards (models/deltanet.py), the global layers balanced."""

    head_dim: int | None = None
    """Per-head key/value width of the delta rule (None = dim // num_heads)."""
    use_short_conv: bool = True
    """Short causal convolution on q, k, v (the common DeltaNet layer)."""
    conv_size: int = 4
    """Kernel size of the short convolution."""
    allow_neg_eigval: bool = False
    """beta in (0, 2) instead of (0, 1)."""
    use_gate: bool = False
    """Gated DeltaNet: a learned per-head decay of the state."""
    chunk_size: int | None = None
    """Chunk length of the WY/UT chunkwise kernel; None: per device (32 on CPU, 64 on GPUs)."""
    schedule: str = "scan"
    """How the state crosses ranks: 'scan' (log2 P prefix scan) or 'pass' (sequential)."""
    mixer_piece_tokens: int = 16384
    """A delta-rule layer whose shard is longer runs over it in pieces of this many tokens,
    carrying the state from piece to piece (`DeltaNet(mixer_piece_tokens=)`): memory O(piece).
    16384 by measurement: within 0.89x-1.08x the whole shard's CPU from 16K to 128K tokens per
    rank, at 0.8x its peak at 128K (benchmarks/RESULTS.md). 0: never (the whole shard at once)."""
    attn_layers: tuple[int, ...] = ()
    """Indices of layers that use (global, causal) sharded attention instead of the delta rule:
    the hybrid of the DeltaNet paper."""
    window_layers: tuple[int, ...] = ()
    """Indices of layers that use causal sliding-window attention (`window` tokens) instead of
    the delta rule: the paper's other hybrid. Disjoint from attn_layers."""
    window: int = 512
    """Tokens a sliding-window layer sees, the token itself included (t reads t-W+1 .. t)."""
    rope_theta: float = 10000.0
    """RoPE base for the attention layers of the hybrid."""
    strategy: str = "auto"
    """Sharded attention algorithm for the attention layers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "window")
        if not isinstance(self.mixer_piece_tokens, int) or self.mixer_piece_tokens < 0:
            raise ValueError(f"DeltaNetConfig.mixer_piece_tokens={self.mixer_piece_tokens!r} "
                             f"must be a positive integer, or 0 for the whole shard")
        self.attn_layers = tuple(int(i) for i in self.attn_layers)
        self.window_layers = tuple(int(i) for i in self.window_layers)
        for name in ("attn_layers", "window_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"{name} {bad} outside 0..{self.num_layers - 1}")
        both = sorted(set(self.attn_layers) & set(self.window_layers))
        if both:
            raise ValueError(f"layers {both} are in both attn_layers={self.attn_layers} and "
                             f"window_layers={self.window_layers}: a layer has one mixer")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: expected one of {STRATEGIES}")


@dataclass
class FITConfig(LMConfig):
    """FIT blocks (local layers in groups, global layers over latents), causal variant."""

    group_size: int = 16
    """Tokens per group (local attention span). A rank's shard must hold whole groups."""
    num_latents: int = 4
    """Latent tokens per group."""
    local_layers: int = 1
    """Local transformer layers per FIT block."""
    global_layers: int = 1
    """Global (latent) transformer layers per FIT block."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "group_size", "num_latents", "local_layers", "global_layers")


@dataclass
class TrainConfig:
    """How to train: optimisation, precision, sharding choices and the synthetic task."""

    steps: int = 100
    """Optimizer steps to run."""
    batch_size: int = 1
    """Sequences per step per data-parallel replica."""
    seq_len: int = 1024
    """Global sequence length (sharded over the sp group)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 10
    """Linear warm-up steps; then cosine decay to min_lr_ratio * lr at `steps`."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    optimizer: str = "adamw"
    """'adamw', or 'sgd' (plain, no momentum: its update is proportional to the gradient,
    which is what the engine-equality test needs to catch a wrong gradient scale)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay on matrices."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off); DeepSpeed's gradient_clipping."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (partitions over all ranks: dp x sp)."""
    seed: int = 0
    """Seeds the model initialisation and the data (data depends only on (seed, step))."""
    layout: str = "contiguous"
    """Sequence layout over the sp group: contiguous | zigzag | striped."""
    strategy: str = "auto"
    """Sharded attention algorithm: auto | ring | ulysses | hybrid | allgather."""
    activation_checkpointing: bool = False
    """Recompute every block in the backward pass (long contexts)."""
    dtype: str = "fp32"
    """fp32, or bf16 autocast (weights and optimizer stay fp32)."""
    task: str = "recall"
    """'recall' (synthetic multi-query associative recall), 'random' (uniform tokens) or 'data'
    (real tokens from the job's [data] section, models.DataConfig)."""
    recall_pairs: int = 8
    """Key-value pairs written at the start of each recall sequence."""
    recall_queries: int = 8
    """Queries (key -> value look-ups) placed at the end of each recall sequence."""
    vocab_size: int = 64
    """Token ids the task uses (the model's vocab_size must be at least this)."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "recall_pairs", "recall_queries",
                  "vocab_size")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage!r}: expected 0, 1, 2 or 3")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {DTYPES}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r}: expected 'adamw' or 'sgd'")
        if self.task not in ("recall", "random", "data"):
            raise ValueError(f"task={self.task!r}: expected 'recall', 'random' or 'data'")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}, lr={self.lr}: need >= 0 and > 0")
        self.betas = tuple(float(b) for b in self.betas)


CONFIGS: dict[str, type[LMConfig]] = {
    "transformer": TransformerConfig,
    "deltanet": DeltaNetConfig,
    "fit": FITConfig,
}


def make_config(kind: str, values: dict | LMConfig, section: str | None = None) -> LMConfig:
    """The config dataclass of a model `kind` ('transformer' | 'deltanet' | 'fit').
    section: where `values` came from (e.g. 'model'), for the key names in errors."""
    if kind not in CONFIGS:
        raise ValueError(f"model kind={kind!r}: expected one of {sorted(CONFIGS)}")
    return fill(CONFIGS[kind], values, section)


def make_train_config(values: dict | TrainConfig, section: str | None = None) -> TrainConfig:
    return fill(TrainConfig, values, section)


def merged_model_config(kind: str, values: dict | LMConfig, train: TrainConfig,
                        section: str | None = None) -> LMConfig:
    """The model config with the sharding / memory choices of the train config filled in
    (layout, activation checkpointing, the attention strategy; vocab_size when unset): what
    the Trainer builds, so the launcher checks the same thing before any worker starts.

    A choice set in both configs must agree, unless the train config left it at its default
    (then the model's stands); a conflict is a ValueError naming both values.
    """
    values = dict(vars(values)) if isinstance(values, LMConfig) else dict(values)
    shared = {"layout": train.layout, "activation_checkpointing": train.activation_checkpointing}
    if kind != "fit":
        shared["strategy"] = train.strategy
    defaults = TrainConfig()
    for key, value in shared.items():
        if key in values and values[key] != value:
            if value == getattr(defaults, key):
                continue  # the train config left it at its default: the model's choice stands
            raise ValueError(f"model config {key}={values[key]!r} conflicts with the train "
                             f"config's {key}={value!r}; set it in one place")
        values[key] = value
    values.setdefault("vocab_size", train.vocab_size)
    config = make_config(kind, values, section)
    if config.vocab_size < train.vocab_size:
        raise ValueError(f"model vocab_size={config.vocab_size} < the task's vocab_size="
                         f"{train.vocab_size}")
    return config


__all__ = [
    "CONFIGS", "DeltaNetConfig", "FITConfig", "LMConfig", "TrainConfig", "TransformerConfig",
    "make_config", "make_train_config", "merged_model_config",
]
