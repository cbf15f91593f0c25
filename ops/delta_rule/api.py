"""`delta_rule`: the public entry point. Checks the arguments, then runs the chunked kernel on
one process or the sharded driver across the ranks of a Mesh."""

from __future__ import annotations

import torch

from seqshard.dist import Mesh, agree

from ..dtypes import FLOAT_DTYPES, compute_dtype
from .chunk import LocalSchedule, default_chunk_size, run
from .sharded import SCHEDULES, sharded_delta_rule




def _shape_problems(q, k, v, beta, gate, initial_state, schedule, chunk_size,
                    sharded: bool = False) -> list[str]:
    """Everything wrong with the arguments that this rank can see without communicating."""
    problems = []
    for name, t, dims in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("beta", beta, 3),
                          ("gate", gate, 3), ("initial_state", initial_state, 4)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() != dims:
            what = (f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor)
                    else type(t).__name__)
            problems.append(f"{name} must be a {dims}-D floating tensor (float16, bfloat16, "
                            f"float32 or float64), got {what}")
    if problems:
        return problems
    B, H, N, Dk = q.shape
    for name, t in (("k", k), ("v", v), ("beta", beta), ("gate", gate)):
        # a mixed call is a caller's slip (one input left in another precision): say so
        # rather than silently computing with some inputs rounded
        if t is not None and t.dtype != q.dtype:
            problems.append(f"{name} is {t.dtype} but q is {q.dtype}: q, k, v, beta and gate "
                            f"must share one dtype")
    if k.shape != q.shape:
        problems.append(f"k {tuple(k.shape)} must match q {tuple(q.shape)} (head dims Dk)")
    if v.shape[:3] != q.shape[:3]:
        problems.append(f"v {tuple(v.shape)} must share [B, H, N] = {(B, H, N)} with q")
    for name, t in (("beta", beta), ("gate", gate)):
        if t is not None and t.shape != q.shape[:3]:
            problems.append(f"{name} {tuple(t.shape)} must be [B, H, N] = {(B, H, N)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[-1]):
        problems.append(f"initial_state {tuple(initial_state.shape)} must be [B, H, Dk, Dv] = "
                        f"{(B, H, Dk, v.shape[-1])}")
    if Dk < 1:
        problems.append(f"q and k have Dk={Dk} features; the delta rule needs Dk >= 1")
    if N < 1 and sharded:
        problems.append(f"N_local={N}: every rank of a sharded sequence needs >= 1 token")
    if schedule not in SCHEDULES:
        problems.append(f"schedule={schedule!r}: expected one of {sorted(SCHEDULES)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        problems.append(f"chunk_size={chunk_size!r} must be a positive integer")
    devices = {t.device for t in (q, k, v, beta, gate, initial_state) if t is not None}
    if len(devices) > 1:
        problems.append(f"inputs are on different devices: {sorted(map(str, devices))}")
    return problems


def _nonfinite(named) -> list[str]:
    bad = []
    for name, t in named:
        # Fast path: a NaN or inf anywhere makes the sum NaN or inf, so a finite sum proves
        # every value finite in one cheap reduction (isfinite costs several full passes: a
        # third of the chunked forward at 8K tokens). Only a non-finite sum (a bad value, or
        # an overflow of large finite ones) pays for the exact count. Half precision sums in
        # fp32, so its small range does not send ordinary inputs to the slow path.
        if t is None:
            continue
        acc = compute_dtype(t.dtype)
        if not bool(torch.isfinite(t.detach().sum(dtype=acc))):
            count = int((~torch.isfinite(t.detach())).sum())
            if count:
                bad.append(f"{name} has {count} NaN/inf values")
    return bad


def _positive_gate(gate: torch.Tensor | None) -> list[str]:
    """A log-decay above 0 grows the state exponentially (NaN within a chunk): one max."""
    if gate is None or gate.numel() == 0:
        return []
    top = float(gate.detach().amax())
    return [f"gate must be <= 0 (a log-decay), got max {top:g}"] if top > 0 else []


def agreement_facts(path: str, batch: int, heads: int, key_dim: int, value_dim: int, dtypes,
                    scale: float, chunk_size: int, schedule: str, want_final: bool) -> dict:
    """What every rank of a sharded call must agree on, for `dist.agree`. The whole-shard
    path and the layer's pieces path (pieces.py) send the same facts, so ranks that took
    different paths raise instead of mixing their collectives.
    dtypes: those of q, k, v, beta, gate (None: absent)."""
    names = ("q", "k", "v", "beta", "gate")
    return {"path": path, "B": batch, "H": heads, "Dk": key_dim, "Dv": value_dim,
            **{f"{name} dtype": dtype for name, dtype in zip(names, dtypes)},
            "gate given": dtypes[4] is not None, "scale": float(scale),
            "chunk_size": chunk_size, "schedule": schedule, "output_final_state": want_final}


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    mesh: Mesh | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    schedule: str = "scan",
    chunk_size: int | None = None,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (gated) delta rule, exact, on one process or with the sequence sharded over `mesh`.

    State S [B, H, Dk, Dv] (keys index rows; the paper's [Dv, Dk] transposed). Per token:
        S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T (scale q_t)

    q, k: [B, H, N_local, Dk] (the layer L2-normalises them; the op does not).
    v: [B, H, N_local, Dv].   beta: [B, H, N_local] (sigmoid outputs; up to 2 allows
    negative eigenvalues).    gate: log-decay g [B, H, N_local] (<= 0; a_t = exp(g_t)), or None.
    initial_state: [B, H, Dk, Dv]; with a mesh it is read on rank 0 only (others get a zero
    gradient for it). scale: multiplies q, default Dk ** -0.5.
    mesh: None or Mesh.single() = one process; otherwise the sequence is sharded contiguously
    (rank r holds the r-th piece) and every rank of mesh.group must call this.
    schedule: "scan" (log2 P prefix scan of the shards' affine maps) or "pass" (state passed
    rank to rank). chunk_size: chunk length C of the WY kernel (any N; padded inside);
    None picks it per device (`chunk.default_chunk_size`: 32 on CPU, 64 on accelerators).
    check: also reject NaN/inf inputs and a gate above 0 (one pass over each) and, with a
    mesh, check that all ranks agree (one small all-gather: shapes, every input's dtype,
    whether gate is given, scale, chunk_size, schedule, output_final_state), so that bad
    input on any rank raises a ValueError on every rank, naming the rank, never hangs.

    Inputs may be any views (transposed, permuted, expanded, sliced, a strided last dim).
    dtypes: q, k, v, beta and gate share one of float16 / bfloat16 / float32 / float64
    (anything else, or a mix, is a ValueError); initial_state may be any of those.
    Empty inputs: B = 0 gives empty results; N = 0 on one process gives an empty o and the
    initial state (a copy; zeros when None) as the final state, since no token changed it.
    With a mesh every rank needs N_local >= 1 (a ValueError on every rank otherwise).
    Dk = 0 is a ValueError.

    Returns (o [B, H, N_local, Dv] in v's dtype, final state [B, H, Dk, Dv] or None): the
    state after the last token of the whole sequence, on every rank, when output_final_state.
    Computed in fp32 (float64 stays float64); backward is exact for both schedules.

    >>> B, H, N, D = 1, 2, 100, 16
    >>> q = k = torch.nn.functional.normalize(torch.randn(B, H, N, D), dim=-1)
    >>> v, beta = torch.randn(B, H, N, D), torch.rand(B, H, N)
    >>> o, state = delta_rule(q, k, v, beta, output_final_state=True)
    >>> o.shape, state.shape
    (torch.Size([1, 2, 100, 16]), torch.Size([1, 2, 16, 16]))
    """
    sharded = mesh is not None and mesh.size > 1
    problems = _shape_problems(q, k, v, beta, gate, initial_state, schedule, chunk_size,
                               sharded)
    if check and not problems:
        problems = _nonfinite((("q", q), ("k", k), ("v", v), ("beta", beta), ("gate", gate),
                               ("initial_state", initial_state))) + _positive_gate(gate)
    if not problems:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        chunk_size = default_chunk_size(q.device) if chunk_size is None else chunk_size
    if sharded and check:
        # every rank raises together, each with every rank's complaint: a lone raising rank
        # would leave the others waiting in the scan
        facts = {} if problems else agreement_facts(
            "whole shard", q.shape[0], q.shape[1], q.shape[3], v.shape[3],
            [t.dtype if t is not None else None for t in (q, k, v, beta, gate)],
            scale, chunk_size, schedule, output_final_state)
        agree(facts, mesh.group, what="delta_rule", problem="; ".join(problems) or None,
              timeout=mesh.timeout)
    elif problems:
        raise ValueError("delta_rule: " + "; ".join(problems))
    if q.shape[0] == 0 or q.shape[2] == 0:
        # nothing to compute (every rank agreed above, so no rank waits on a collective)
        o, state = _empty(q, k, v, beta, gate, initial_state)
    elif sharded:
        o, state = sharded_delta_rule(
            q, k, v, beta, mesh, initial_state=initial_state, scale=scale, gate=gate,
            chunk_size=chunk_size, schedule=schedule, output_final_state=output_final_state)
    else:
        o, state = run(q, k, v, beta, gate, initial_state, LocalSchedule(), scale, chunk_size)
    return o, (state if output_final_state else None)


def _empty(q, k, v, beta, gate, initial_state):
    """The results of an empty batch or sequence: o [B, H, N, Dv] of zeros, built from every
    input so that backward reaches each of them (with empty or zero gradients), and the
    initial state (a copy; zeros when None) as the final state: no token changed it."""
    reach = q.sum(-1) + k.sum(-1) + beta + (gate if gate is not None else 0)  # [B, H, N]
    o = (v + reach[..., None].to(v.dtype)) * 0  # [B, H, N, Dv]
    if initial_state is None:
        return o, v.new_zeros(q.shape[:2] + (q.shape[3], v.shape[3]))
    return o, initial_state.to(v.dtype, copy=True)
