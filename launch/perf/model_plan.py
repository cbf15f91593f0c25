"""The model-level plan: how long a sequence a whole model of a job file trains at, and how.

For a model (TransformerLM, DeltaNetLM with its attention / window layers, FITLM), a world
size and a hardware profile, every choice of
    dp x ulysses x ring, the attention strategy, activation checkpointing on/off,
    tokenwise_piece_tokens and (DeltaNet) mixer_piece_tokens
gets a per-rank memory split and a step time; `max_context` finds the largest N that fits.

Memory per rank (bytes; W = dp x sp ranks, over which ZeRO partitions here):
    parameters   4 P        (/ W at ZeRO 3)      P = parameter count (the model built on the
    gradients    4 P        (/ W at ZeRO >= 2)       meta device: exact, costs nothing)
    optimizer    8 P AdamW + 4 P fp32 partition at ZeRO >= 1 (/ W at ZeRO >= 1)
    activations  per layer: what its autograd graph keeps for backward, per local token;
                 plus the worst layer's backward transient and the loss pieces' logits
    comm         the gradient buckets (DeepSpeed, W > 1) and the attention strategy's
                 buffers (ring blocks, all-to-all heads, gathered K/V: planner.py)
Per-token counts (`kept_per_token`) are the tensors each sub-layer saves (see its comments),
in the activation dtype (4 bytes, 2 under bf16 autocast). A checkpointed block keeps only its
input; its whole graph exists again while it is recomputed, one block at a time.

Time per step (launch/perf/step_model.py): each mixer's fwd+bwd from planner.py (the per-op
cost model) scaled by its measured rate, the dense matmuls (projections, MLP, head: 6 flops
per weight per token) at a dense rate, the elementwise passes at a bandwidth, x 4/3 where a
forward is run twice (checkpointing, token-wise pieces, the DeltaNet mixer in pieces), the
ZeRO/dp gradient reduction, the optimizer per parameter and a fixed cost per step. The rates
are a profile's datasheet numbers unless calibrated (`seqshard plan --calibrate-here`). A
DeltaNet layer whose shard runs in pieces (issue 19) is serial across ranks only in its
state chains: time = the parallel rest + P x one shard's chain (`delta_pieces_time`).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import planner
from .model_memory import (  # noqa: F401  (the plan's public names live here too)
    Choice, ModelSpec, _attn_shape, _delta_shape, _fit_shape, kept_per_token, memory,
    mixer_family, spec_from_job, spec_of)
from .planner import Hardware
from .step_model import (  # noqa: F401  (delta_pieces_time: the plan's public name)
    StepRates, delta_pieces_time, step_features, step_seconds)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

TOKENWISE_CHOICES = (8192, 2048)
MIXER_CHOICES = (0, 65536, 16384)


@dataclass
class ModelPlan:
    choice: Choice
    n: int
    world: int
    memory: dict                # name -> bytes per rank (see the module doc); 'total' included
    layers: list                # per block: (mixer, kept bytes, backward transient, seconds)
    step_s: float
    serial_s: float             # of step_s: chains that run rank after rank
    fits: bool
    budget: float               # bytes a rank may hold

    @property
    def tokens_per_s(self) -> float:
        return self.choice.dp * self.n / self.step_s


# --- time ---------------------------------------------------------------------------------------
def step_time(spec: ModelSpec, n: int, ch: Choice, world: int, hw: Hardware,
              rates: StepRates | None = None):
    """(step seconds, serial seconds, per-block seconds): step_model.py's linear model, at
    `rates` (default: the uncalibrated rates of the profile `hw`)."""
    f = step_features(spec, n, ch, world, hw)
    return step_seconds(f, rates or StepRates.from_hardware(hw))


# --- the search ---------------------------------------------------------------------------------
def budget(hw: Hardware, world: int) -> float:
    """Bytes a rank's model may hold: its device's memory (a shared host's, split over its
    ranks) less what the runtime itself takes (`process_bytes`)."""
    device = hw.memory_bytes / world if hw.shared_cores else hw.memory_bytes
    return device - hw.process_bytes


def choices(spec: ModelSpec, world: int) -> list[Choice]:
    """Every (dp x ulysses x ring, strategy, checkpointing, pieces) the model can run."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world={world!r}: expected a positive number of ranks")
    c = spec.config
    out = []
    tokenwise = sorted({c.tokenwise_piece_tokens, *TOKENWISE_CHOICES}, reverse=True)
    mixer = (sorted({c.mixer_piece_tokens, *MIXER_CHOICES}) if spec.kind == "deltanet"
             else [0])
    for dp in (d for d in range(1, world + 1) if world % d == 0):
        sp = world // dp
        if "attention" in spec.mixers and spec.kind == "transformer":
            meshes = planner.candidates("attention", _attn_shape(spec, 1), sp)
        elif "attention" in spec.mixers:  # DeltaNet's shards are contiguous: no heads split
            meshes = [("ring", 1, sp), ("allgather", 1, sp)]
        else:
            meshes = [(spec.config.schedule if spec.kind == "deltanet" else "fit", 1, sp)]
        for impl, u, r in meshes:
            for ckpt in (False, True):
                for tw in tokenwise:
                    for mx in mixer:
                        layout = ("zigzag" if spec.kind == "transformer" and sp > 1
                                  and impl != "ulysses" else "contiguous")
                        out.append(Choice(dp, u, r, impl, ckpt, tw, mx, layout))
    return out


def quantum(spec: ModelSpec, ch: Choice) -> int:
    """N must be a multiple of this: zigzag halves per rank, FIT's whole groups per rank."""
    q = ch.sp * (2 if ch.layout == "zigzag" else 1)
    if spec.kind == "fit":
        q *= spec.config.group_size
    return q


def evaluate(spec: ModelSpec, n: int, ch: Choice, world: int, hw: Hardware,
             rates: StepRates | None = None) -> ModelPlan:
    split, blocks = memory(spec, n, ch, world, hw)
    step, serial, times = step_time(spec, n, ch, world, hw, rates)
    layers = [(m, k, t, s) for (m, k, t), s in zip(blocks, times)]
    room = budget(hw, world)
    return ModelPlan(ch, n, world, split, layers, step, serial, split["total"] <= room, room)


def plan_at(spec: ModelSpec, n: int, world: int, hw: Hardware,
            rates: StepRates | None = None) -> list[ModelPlan]:
    """Every choice that can run N tokens on `world` ranks: fitting first, fastest first."""
    plans = [evaluate(spec, n, ch, world, hw, rates) for ch in choices(spec, world)
             if n % quantum(spec, ch) == 0]
    if not plans:
        raise ValueError(f"N={n} splits over no mesh of world={world} for {spec.kind}")
    return sorted(plans, key=lambda p: (not p.fits, p.step_s))


def _largest(spec, ch, world, hw, n_max: int) -> int:
    """The largest multiple of quantum(ch) <= n_max whose memory fits (0: none)."""
    q, room = quantum(spec, ch), budget(hw, world)
    fits = lambda k: memory(spec, k * q, ch, world, hw)[0]["total"] <= room  # noqa: E731
    lo, hi = 0, max(0, n_max // q)
    if hi == 0 or not fits(1):
        return 0
    while lo < hi:  # memory grows with N: bisect on the multiple
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * q


def max_context(spec: ModelSpec, world: int, hw: Hardware, n_max: int = 1 << 34,
                rates: StepRates | None = None) -> ModelPlan | None:
    """The plan with the largest N that fits (ties: the fastest step); None if none fits."""
    best = None
    for ch in choices(spec, world):
        n = _largest(spec, ch, world, hw, n_max)
        if n == 0:
            continue
        p = evaluate(spec, n, ch, world, hw, rates)
        if best is None or (p.n, -p.step_s) > (best.n, -best.step_s):
            best = p
    return best


# --- text ---------------------------------------------------------------------------------------
def fmt_bytes(x: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def describe(p: ModelPlan) -> str:
    ch = p.choice
    lines = [f"N = {p.n:,} tokens: dp {ch.dp} x ulysses {ch.ulysses} x ring {ch.ring}, "
             f"strategy {ch.strategy}, layout {ch.layout}, activation checkpointing "
             f"{'on' if ch.checkpointing else 'off'}, tokenwise_piece_tokens "
             f"{ch.tokenwise_piece_tokens}, mixer_piece_tokens {ch.mixer_piece_tokens}",
             f"step {fmt_time(p.step_s)} ({fmt_time(p.serial_s)} serial across ranks), "
             f"{p.tokens_per_s:,.0f} tokens/s; {'fits' if p.fits else 'does NOT fit'} in "
             f"{fmt_bytes(p.budget)} per rank", "",
             "| memory per rank | bytes |", "|---|---:|"]
    lines += [f"| {k} | {fmt_bytes(v)} |" for k, v in p.memory.items()]
    lines += ["", "| block | mixer | kept for backward | backward transient | fwd+bwd |",
              "|---:|---|---:|---:|---:|"]
    start = 0
    for i, row in enumerate(p.layers):  # runs of alike blocks share one row
        if i + 1 < len(p.layers) and p.layers[i + 1] == row:
            continue
        m, k, t, s = row
        blocks = f"{start}" if start == i else f"{start}-{i}"
        lines.append(f"| {blocks} | {m} | {fmt_bytes(k)} | {fmt_bytes(t)} | {fmt_time(s)} |")
        start = i + 1
    return "\n".join(lines) + "\n"
