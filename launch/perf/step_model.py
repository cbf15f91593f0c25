"""The model-level plan's step time: a linear model of what one Trainer step costs a rank.

A step's seconds on a rank are a sum of terms, each a count the plan derives from the model
(`step_features`) times a rate of the machine (`StepRates`):

    dense_flops / dense_flops_s     projections, MLP, head: 6 flops per weight per token
                                    (2 forward, 4 backward), + 2 per forward rerun
                                    (checkpointing, token-wise pieces, mixer pieces)
    elem_bytes  / elem_bytes_s      norms, activations, residuals, the gradients of what each
                                    block would keep whole: (4 + reruns) passes over it
    op_s[f]     x op_scale[f]       each mixer's fwd+bwd as planner.py prices it (attention,
                                    delta_rule, fit) under the op-level Hardware, scaled to
                                    this machine's measured kernels
    comm_s                          the gradient all-reduce (not fitted: planner bandwidths)
    opt_params  x opt_s_per_param   the optimizer's pass over its (ZeRO-partitioned) state
    1           x fixed_s           what every step pays whatever the model: DeepSpeed's
                                    engine, the loss's bookkeeping, python

Being linear, the rates fit by non-negative least squares from measured steps
(`fit_rates`), and `StepRates.from_hardware` gives the uncalibrated rates of a datasheet
profile (fixed cost 0: predicted, not measured). A calibrated profile is a JSON file: the
op-level Hardware's fields under "hardware" and these rates under "step" (`save_profile`,
`load_profile`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace

import numpy as np

from . import planner
from .model_memory import (_act_bytes, _attn_shape, _delta_shape, _fit_shape, _hidden,
                           kept_per_token)
from .planner import Hardware

OPS = ("attention", "delta_rule", "fit")


@dataclass(frozen=True)
class StepRates:
    """Rates of one machine for the model-level step time (see the module doc)."""

    dense_flops_s: float         # FLOP/s of the dense matmuls (one rank, its thread count)
    elem_bytes_s: float          # bytes/s of the elementwise passes
    op_scale: dict = field(default_factory=lambda: dict.fromkeys(OPS, 1.0))
    fixed_s: float = 0.0         # seconds every step pays
    opt_s_per_param: float = 0.0  # seconds of optimizer step per parameter a rank updates
    source: str = "uncalibrated"

    @classmethod
    def from_hardware(cls, hw: Hardware) -> "StepRates":
        """The datasheet's rates: dense matmuls at the profile's 'dense' efficiency (else
        the attention kernel's), elementwise work and the optimizer's 16 bytes per
        parameter at its memory bandwidth, no fixed cost."""
        dense = hw.flops * hw.efficiency.get("dense", hw.efficiency["attention"])
        return cls(dense, hw.mem_bw, dict.fromkeys(OPS, 1.0), 0.0, 16 / hw.mem_bw,
                   f"uncalibrated ({hw.name})")


# --- features -----------------------------------------------------------------------------------
def _share(hw: Hardware, world: int) -> float:
    """A rank's share of a core on a shared CPU host (planner.features' rule), else 1."""
    if not hw.shared_cores:
        return 1.0
    return min(1.0, hw.cores_by_world.get(world, hw.shared_cores) / world)


def delta_pieces_time(shape: dict, n: int, p: int, hw: Hardware) -> tuple[float, float]:
    """(serial s, parallel s) of one DeltaNet layer's fwd+bwd when its shards run in pieces
    (ops/delta_rule/pieces.py after issue 19): every rank's projections, conv, chunk kernel
    and readout run side by side (the parallel rest, plus one recomputed forward: x 4/3);
    only the state chains cross ranks one after the other, so the serial part is P times one
    shard's chain, run at a whole core (the others wait). The old schedule, where ranks took
    turns over whole layers, would be P x (serial / P + parallel)."""
    t = planner.terms("delta_rule", "pass", shape, n, 1, p, hw)
    rate = hw.flops * planner.efficiency(hw, "delta_rule", "pass", p)
    serial = t.flops_seq / rate + t.steps_seq * hw.step_overhead
    f = planner.features(replace(t, flops_seq=0.0, steps_seq=0.0), p, hw)
    parallel = (4 / 3) * (f["flops"] / rate + f["steps"] * hw.step_overhead
                          + f["call"] * hw.call_overhead)
    return serial, parallel


def _mixer_time(spec, mixer, ch, n, hw) -> tuple[str, float, float]:
    """(planner family, seconds, of which serial across ranks) of one block's mixer."""
    b = spec.train.batch_size
    if mixer in ("attention", "window"):
        impl = ch.strategy if ch.sp > 1 else "ulysses"
        t = planner.predict("attention", impl, _attn_shape(spec, b), n, ch.ulysses, ch.ring,
                            hw).time_s
        if mixer == "window":  # keys per query: the window instead of half the sequence
            t *= min(1.0, 2 * spec.config.window / n)
        return "attention", t * (1 + 1 / 3.5 * ch.checkpointing), 0.0  # forward: 1 / 3.5
    if mixer == "delta":
        shape = _delta_shape(spec, b, hw)
        pieces = ch.mixer_piece_tokens and n // ch.sp > ch.mixer_piece_tokens
        rerun = 1 + ch.checkpointing / 3  # the checkpoint's forward, pieces and all
        if pieces and ch.sp == 2:
            serial, par = delta_pieces_time(shape, n, ch.sp, hw)
            return "delta_rule", (serial + par) * rerun, serial * rerun
        # whole shards; or pieces on one rank, or on P >= 3 ranks where pieces.py runs the
        # scan schedule (middle ranks compose their maps side by side): the backward
        # recomputes each piece's forward (once more inside a checkpoint's recomputation)
        t = planner.predict("delta_rule", "scan" if pieces else spec.config.schedule, shape,
                            n, 1, ch.sp, hw).time_s
        return "delta_rule", t * rerun * (1 + bool(pieces) / 3), 0.0
    t = planner.predict("fit", "fit", _fit_shape(spec, b), n, 1, ch.sp, hw).time_s
    return "fit", t * (1 + ch.checkpointing / 3), 0.0


def step_features(spec, n: int, ch, world: int, hw: Hardware) -> dict:
    """The counts one step's time is linear in (module doc), for a rank of `world` running
    Choice `ch` at N tokens; op seconds priced by the op-level profile `hw`. Also 'serial'
    (per family: of its op seconds, the part that runs rank after rank) and 'blocks' (per
    block: its own counts, for the per-layer table)."""
    c, b = spec.config, spec.train.batch_size
    n_local = n // ch.sp
    share = _share(hw, world)
    f = {"dense_flops": 0.0, "elem_bytes": 0.0, **{f"op_s.{o}": 0.0 for o in OPS}}
    serial, blocks = dict.fromkeys(OPS, 0.0), []
    for mixer, dense in zip(spec.mixers, spec.block_dense):
        family, op_s, op_serial = _mixer_time(spec, mixer, ch, n, hw)
        # Each part of a block runs its forward once more per rerun: under checkpointing all
        # of it; DeltaNet's token-wise MLP when the shard exceeds its pieces; DeltaNet's
        # whole mixer (projections, conv, norms, kernel: pieces.py recomputes the layer)
        # when the mixer runs in pieces.
        pieces = mixer == "delta" and ch.mixer_piece_tokens and n_local > ch.mixer_piece_tokens
        mixer_reruns = ch.checkpointing + bool(pieces)
        mlp_reruns = ch.checkpointing + (mixer == "delta" and n_local > ch.tokenwise_piece_tokens)
        mlp_w = 3 * c.dim * _hidden(spec) if mixer != "fit" else 0  # SwiGLU's three weights
        # dense matmuls: 2 flops per weight per token forward, 4 backward, 2 per rerun
        flops = (6 * b * n_local * ((dense - mlp_w) * (1 + mixer_reruns / 3)
                                    + mlp_w * (1 + mlp_reruns / 3)) / share)
        # the elementwise work around them (norms, activations, residuals, the gradients of
        # what the block would keep whole): each kept byte written in forward, read in
        # backward, its gradient written and read; once more per rerun
        whole = replace(ch, checkpointing=False, mixer_piece_tokens=0,
                        tokenwise_piece_tokens=n_local)
        kept = kept_per_token(spec, mixer, whole, n_local, hw) * b * n_local
        mlp_kept = (_act_bytes(spec) * (3 * c.dim + 4 * _hidden(spec)) * b * n_local
                    if mixer != "fit" else 0.0)
        elem = ((4 + mixer_reruns) * (kept - mlp_kept) + (4 + mlp_reruns) * mlp_kept) / share
        f["dense_flops"] += flops
        f["elem_bytes"] += elem
        f[f"op_s.{family}"] += op_s
        serial[family] += op_serial
        blocks.append({"dense_flops": flops, "elem_bytes": elem, f"op_s.{family}": op_s})
    # the head: the loss pieces recompute its forward
    f["dense_flops"] += 6 * c.dim * c.vocab_size * b * n_local * (4 / 3) / share
    # the gradient reduction over all W ranks (ring all-reduce: 2 (W-1)/W of the bytes)
    f["comm_s"] = 0.0
    if world > 1:
        bw = hw.intra_bw if world <= hw.devices_per_node else hw.inter_bw
        f["comm_s"] = 2 * 4 * spec.params * (world - 1) / world / bw
    f["opt_params"] = spec.params / (world if spec.train.zero_stage else 1)
    f["fixed"] = 1.0
    return {**f, "serial": serial, "blocks": blocks}


def _seconds(f: dict, r: StepRates) -> float:
    return (f.get("dense_flops", 0.0) / r.dense_flops_s
            + f.get("elem_bytes", 0.0) / r.elem_bytes_s
            + sum(f.get(f"op_s.{o}", 0.0) * r.op_scale.get(o, 1.0) for o in OPS)
            + f.get("comm_s", 0.0) + f.get("opt_params", 0.0) * r.opt_s_per_param
            + f.get("fixed", 0.0) * r.fixed_s)


def step_seconds(f: dict, r: StepRates) -> tuple[float, float, list]:
    """(step seconds, of which serial across ranks, per-block seconds) of `step_features`."""
    serial = sum(s * r.op_scale.get(o, 1.0) for o, s in f["serial"].items())
    return _seconds(f, r), serial, [_seconds(b, r) for b in f["blocks"]]


def cpu_seconds(f: dict, r: StepRates, sp: int) -> float:
    """What one rank computes itself (its CPU seconds): the step less the waiting for the
    other ranks' shares of the serial chains."""
    step, serial, _ = step_seconds(f, r)
    return step - serial * (1 - 1 / sp)


# --- fitting ------------------------------------------------------------------------------------
FITTED = ("dense_flops", "elem_bytes", *(f"op_s.{o}" for o in OPS), "opt_params", "fixed")


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    from .calibrate import _nnls as nnls

    return nnls(a, y)


def fit_rates(samples: list[tuple[dict, float]], base: StepRates, keep=()) -> StepRates:
    """Rates that reproduce measured CPU seconds: samples are (step_features, seconds).

    Non-negative least squares in relative error (each row divided by its measurement, so a
    0.3 s point counts as much as a 3 s one). A coefficient whose column is all zero (no
    sample exercises it), named in `keep`, or fitted to 0 (the samples cannot resolve it),
    keeps `base`'s value; its time is taken off the measurement first. The serial chains'
    waiting is not work, so each sample's features are its CPU share (`cpu_seconds`' rule):
    samples carry 'sp' for that."""
    if not samples:
        raise ValueError("fit_rates: no samples")
    base_coef = {"dense_flops": 1 / base.dense_flops_s, "elem_bytes": 1 / base.elem_bytes_s,
                 **{f"op_s.{o}": base.op_scale.get(o, 1.0) for o in OPS},
                 "opt_params": base.opt_s_per_param, "fixed": base.fixed_s}
    rows = []
    for f, _ in samples:
        sp = f.get("sp", 1)
        row = {k: f.get(k, 0.0) for k in FITTED}
        for o, s in f.get("serial", {}).items():  # the chains other ranks run: not CPU here
            row[f"op_s.{o}"] -= s * (1 - 1 / sp)
        rows.append(row)
    y = np.array([t for _, t in samples], dtype=float)
    if (y <= 0).any():
        raise ValueError(f"fit_rates: measured seconds must be > 0, got {y.min()}")
    free = [k for k in FITTED if k not in keep and any(r[k] for r in rows)]
    while True:
        held = np.array([sum(r[k] * base_coef[k] for k in FITTED if k not in free)
                         + f.get("comm_s", 0.0) for r, (f, _) in zip(rows, samples)])
        a = np.array([[r[k] for k in free] for r in rows])
        coef = dict(base_coef)
        if free:
            coef.update(zip(free, _nnls(a / y[:, None], (y - held) / y)))
        # a coefficient the samples cannot tell from 0 (collinear with others, as on few
        # points of one shape) is not evidence of a free resource: hold it at the base's
        # and fit the rest again
        zero = [k for k in free if coef[k] <= 0 and base_coef[k] > 0]
        if not zero:
            break
        free = [k for k in free if k not in zero]
    return StepRates(1 / coef["dense_flops"], 1 / coef["elem_bytes"],
                     {o: float(coef[f"op_s.{o}"]) for o in OPS}, float(coef["fixed"]),
                     float(coef["opt_params"]),
                     f"fitted to {len(samples)} measured steps"
                     + (f" ({', '.join(k for k in FITTED if k not in free)} held)"
                        if len(free) < len(FITTED) else ""))


# --- the profile file ---------------------------------------------------------------------------
def save_profile(path: str, hw: Hardware, rates: StepRates, measured: dict | None = None) -> None:
    """A calibrated profile as JSON: {"hardware": Hardware's fields, "step": StepRates',
    "measured": what the calibration saw (provenance, free-form)}."""
    data = {"hardware": dataclasses.asdict(hw), "step": dataclasses.asdict(rates),
            "measured": measured or {}}
    data["hardware"]["cores_by_world"] = {str(k): v for k, v in hw.cores_by_world.items()}
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def _number(path: str, key: str, value, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{path}: {key}={value!r}: expected a number")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{path}: {key}={value!r}: expected a number "
                         f"{'> 0' if positive else '>= 0'}")
    return float(value)


def load_profile(path: str) -> tuple[Hardware, StepRates]:
    """(op-level Hardware, StepRates) of a profile file; ValueError naming the bad key."""
    from seqshard.models.fill import fill

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON profile ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'hardware' and 'step'")
    for key in ("hardware", "step"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path}: missing '{key}' (an object)")
    unknown = set(data) - {"hardware", "step", "measured"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    h = dict(data["hardware"])
    h["cores_by_world"] = {int(k): v for k, v in (h.get("cores_by_world") or {}).items()}
    for f in dataclasses.fields(Hardware):  # the required rates have no default to check by
        if f.type in ("float", "int") and f.name in h:
            _number(path, f"hardware.{f.name}", h[f.name], positive=False)
    try:
        hw = fill(Hardware, h)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: hardware: {err}") from None
    s = data["step"]
    unknown = set(s) - {f.name for f in dataclasses.fields(StepRates)}
    if unknown:
        raise ValueError(f"{path}: unknown step keys {sorted(unknown)}")
    for key in ("dense_flops_s", "elem_bytes_s"):
        if key not in s:
            raise ValueError(f"{path}: step.{key} is missing")
    scale = s.get("op_scale", {})
    if not isinstance(scale, dict) or set(scale) - set(OPS):
        raise ValueError(f"{path}: step.op_scale={scale!r}: expected an object with keys "
                         f"among {list(OPS)}")
    rates = StepRates(
        _number(path, "step.dense_flops_s", s["dense_flops_s"]),
        _number(path, "step.elem_bytes_s", s["elem_bytes_s"]),
        {o: _number(path, f"step.op_scale.{o}", scale.get(o, 1.0), positive=False)
         for o in OPS},
        _number(path, "step.fixed_s", s.get("fixed_s", 0.0), positive=False),
        _number(path, "step.opt_s_per_param", s.get("opt_s_per_param", 0.0), positive=False),
        str(s.get("source", path)))
    return hw, rates
