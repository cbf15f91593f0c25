"""`delta_rule`: the public entry point. Checks the arguments, then runs the chunked kernel on
one process or the sharded driver across the ranks of a Mesh."""

from __future__ import annotations

import torch

from seqshard.dist import Mesh, all_gather

from .chunk import LocalSchedule, run
from .sharded import SCHEDULES, sharded_delta_rule


def _shape_problems(q, k, v, beta, gate, initial_state, schedule, chunk_size) -> list[str]:
    """Everything wrong with the arguments that this rank can see without communicating."""
    problems = []
    for name, t, dims in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("beta", beta, 3),
                          ("gate", gate, 3), ("initial_state", initial_state, 4)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != dims:
            what = (f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor)
                    else type(t).__name__)
            problems.append(f"{name} must be a {dims}-D floating tensor, got {what}")
    if problems:
        return problems
    B, H, N, Dk = q.shape
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
    if N < 1:
        problems.append(f"the local sequence length is {N}; every rank needs >= 1 token")
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
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        if not bool(torch.isfinite(t.detach().sum(dtype=acc))):
            count = int((~torch.isfinite(t.detach())).sum())
            if count:
                bad.append(f"{name} has {count} NaN/inf values")
    return bad


def _agree(problems: list[str], sizes: list[int], mesh: Mesh) -> None:
    """Every rank raises together (a lone raising rank would leave the others in the scan)."""
    mine = torch.tensor([[len(problems)] + sizes], dtype=torch.int64)
    with torch.no_grad():
        everyone = all_gather(mine, 0, mesh.group, timeout=mesh.timeout)  # [P, 5]
    failing = [r for r in range(mesh.size) if everyone[r, 0] > 0]
    if problems:
        raise ValueError(f"delta_rule on rank {mesh.rank}: " + "; ".join(problems))
    if failing:
        raise ValueError(f"delta_rule: bad input on rank(s) {failing} (see their errors)")
    if not bool((everyone[:, 1:] == everyone[0, 1:]).all()):
        listed = [tuple(row[1:].tolist()) for row in everyone]
        raise ValueError(f"delta_rule: ranks disagree on (B, H, Dk, Dv): {listed}")


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
    check: also reject NaN/inf inputs (one pass over them) and, with a mesh, check that all
    ranks agree (one small all-gather) so that bad input raises on every rank, never hangs.

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
    problems = _shape_problems(q, k, v, beta, gate, initial_state, schedule, chunk_size)
    if check and not problems:
        problems = _nonfinite((("q", q), ("k", k), ("v", v), ("beta", beta), ("gate", gate),
                               ("initial_state", initial_state)))
    sharded = mesh is not None and mesh.size > 1
    if sharded and check:
        sizes = [-1] * 4 if problems else [q.shape[0], q.shape[1], q.shape[3], v.shape[3]]
        _agree(problems, sizes, mesh)
    elif problems:
        raise ValueError("delta_rule: " + "; ".join(problems))
    if sharded:
        o, state = sharded_delta_rule(
            q, k, v, beta, mesh, initial_state=initial_state, scale=scale, gate=gate,
            chunk_size=chunk_size, schedule=schedule, output_final_state=output_final_state)
    else:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        o, state = run(q, k, v, beta, gate, initial_state, LocalSchedule(), scale, chunk_size)
    return o, (state if output_final_state else None)
