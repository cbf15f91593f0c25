"""Autograd-aware collectives over a process group, each with an exact backward.

- `all_to_all(x, group, scatter_dim, gather_dim)`: split along one dim, send piece j to rank j,
  concatenate what arrives along another. `seq_to_heads` / `heads_to_seq` are the two Ulysses
  directions. Backward: the all-to-all with the dims swapped.
- `all_gather(x, dim, group)`: backward is reduce-scatter (each rank gets the sum of every
  rank's gradient for its own piece).
- `reduce_scatter(x, dim, group)`: the transpose of `all_gather`.
- `all_reduce(x, group)`: sum over ranks; backward is the same sum (exact for a total loss
  that is the sum of every rank's loss).
- `ring_shift(x, group, shift)`: rank r receives rank r-shift's tensor; backward shifts back.
- `RingComm`: the non-autograd ring exchange used inside hand-written backward passes: post
  the next send/receive, compute on the current block, then wait (overlap).
- `exclusive_scan(value, combine, group)`: exclusive prefix over ranks of an associative
  combine, in ceil(log2 P) rounds (forward values; ops define their own backward with
  `reverse=True`).

Every call waits at most `timeout` and raises `CollectiveError` naming the rank and the op
(on NCCL too: a timed `wait` raises a RuntimeError there, which becomes the same error).

Wire device: each backend communicates tensors of one kind -- gloo host tensors, NCCL CUDA
tensors. A tensor on the other kind of device is staged: copied to the wire device,
communicated, and the result copied back. So two ranks sharing one GPU over gloo (NCCL
refuses two ranks on one device) still run the sharded ops' compute on CUDA tensors, and
small host-side messages (`agree`) work on NCCL. Ring exchanges go through
`dist.batch_isend_irecv`, which NCCL needs to pair sends and receives without deadlock and
gloo also accepts.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.distributed as dist

Tensors = torch.Tensor | tuple[torch.Tensor, ...]


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank and the operation."""


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


@contextmanager
def _guard(op: str, group, *, posting: bool = False):
    """Turn a RuntimeError of `op` into a CollectiveError naming this rank and the op.

    posting=True wraps the call that *starts* the op: torch checks this rank's arguments
    there (a tensor's layout, device), before anything reaches a peer, so a failure is
    this rank's own error and is not blamed on a peer. Failures while waiting are what a
    dead, stalled or mismatched peer looks like -- or a check gloo makes only in its worker
    thread (an unsupported dtype), which the message also names.
    """
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as err:
        me = dist.get_rank() if dist.is_initialized() else 0
        cause = ("could not be started on this rank (its own arguments were rejected before "
                 "anything was sent)" if posting else
                 "failed (a peer may have died, stalled or sent a different shape, or the "
                 "backend rejected this rank's tensor: see the error)")
        raise CollectiveError(
            f"rank {me}: {op} over a group of {group_size(group)} ranks {cause}: {err}"
        ) from err


def _wait(work, timeout: datetime.timedelta | None) -> None:
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)


def _flat(new_name: str, old_name: str):
    # torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only
    # the old ones. Looked up per call so that instrumentation of torch.distributed sees it.
    return getattr(dist, new_name, None) or getattr(dist, old_name)


# Test-only: stage host tensors through a fresh host copy too, so the staging path (copy out,
# communicate, copy back) runs and is checked on a CPU-only machine. Read per call.
FORCE_STAGING_ENV = "SEQSHARD_FORCE_STAGING"


def wire_device(group, device: torch.device) -> torch.device | None:
    """The device `group`'s backend communicates on when handed a tensor on `device`, or None
    when the tensor goes on the wire where it is.

    gloo: the host (its CUDA support is partial and build-dependent, so CUDA tensors are
    staged through host memory). NCCL: the current CUDA device. A backend string that names
    a backend per device ('cpu:gloo,cuda:nccl') takes every tensor where it is.
    """
    backend = str(dist.get_backend(group))
    if ":" in backend:
        return None
    if backend == "gloo":
        if device.type != "cpu" or os.environ.get(FORCE_STAGING_ENV) == "1":
            return torch.device("cpu")
        return None
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _staged(t: torch.Tensor, wire: torch.device | None) -> torch.Tensor:
    """`t` as it goes on the wire: contiguous, on `wire` (a fresh copy whenever staged)."""
    if wire is None:
        return t if t.is_contiguous() else t.contiguous()
    return t.to(wire, memory_format=torch.contiguous_format, copy=True)


def _run(op, name: str, out: torch.Tensor, *inputs: torch.Tensor, group, timeout) -> None:
    """`op(out, *inputs)` with the timeout and error naming; `out` is written in place (it is
    every flat collective's first argument), through a staged copy where the backend needs it.
    """
    wire = wire_device(group, out.device)
    wire_out = out if wire is None else _staged(out, wire)
    wire_inputs = [x if wire is None else _staged(x, wire) for x in inputs]
    with _guard(name, group, posting=True):
        work = op(wire_out, *wire_inputs, group=group, async_op=True)
    with _guard(name, group):
        _wait(work, timeout)
    if wire_out is not out:
        out.copy_(wire_out)


# --- all-to-all ------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int, timeout) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[scatter_dim] % world != 0:
        raise ValueError(
            f"all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} is {x.shape[scatter_dim]}, "
            f"not divisible by the group size {world}"
        )
    pieces = x.chunk(world, dim=scatter_dim)
    if x.is_contiguous() and all(size == 1 for size in x.shape[:scatter_dim]):
        # x already lies in memory as [world, ...piece] (e.g. heads of a batch of one)
        send = x.view((world,) + pieces[0].shape)
    else:
        send = torch.stack(pieces)  # [world, ...piece] with piece j going to rank j
    recv = torch.empty_like(send)
    _run(dist.all_to_all_single, "all_to_all", recv, send, group=group, timeout=timeout)
    del send, pieces  # one buffer less alive while the received pieces are concatenated
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim, timeout):
        ctx.args = (group, scatter_dim, gather_dim, timeout)
        return _all_to_all(x, group, scatter_dim, gather_dim, timeout)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim, timeout = ctx.args
        return _all_to_all(grad, group, gather_dim, scatter_dim, timeout), None, None, None, None


def all_to_all(
    x: torch.Tensor, group, scatter_dim: int, gather_dim: int, *, timeout=None
) -> torch.Tensor:
    """Split `x` along scatter_dim into P pieces, send piece j to rank j, concatenate the
    received pieces (in rank order) along gather_dim."""
    scatter_dim %= x.dim()
    gather_dim %= x.dim()
    return _AllToAll.apply(x, group, scatter_dim, gather_dim, timeout)


def seq_to_heads(x: torch.Tensor, group, *, seq_dim=2, head_dim=1, timeout=None) -> torch.Tensor:
    """[B, H, N/P, D] sequence-sharded -> [B, H/P, N, D] head-sharded (Ulysses, first leg)."""
    return all_to_all(x, group, scatter_dim=head_dim, gather_dim=seq_dim, timeout=timeout)


def heads_to_seq(x: torch.Tensor, group, *, seq_dim=2, head_dim=1, timeout=None) -> torch.Tensor:
    """[B, H/P, N, D] head-sharded -> [B, H, N/P, D] sequence-sharded (Ulysses, second leg)."""
    return all_to_all(x, group, scatter_dim=seq_dim, gather_dim=head_dim, timeout=timeout)


# --- all-gather / reduce-scatter -------------------------------------------------------------
def _all_gather(x: torch.Tensor, dim: int, group, timeout) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    send = x.movedim(dim, 0).contiguous()
    recv = send.new_empty((world * send.shape[0],) + tuple(send.shape[1:]))
    _run(_flat("all_gather_single", "all_gather_into_tensor"), "all_gather", recv, send,
         group=group, timeout=timeout)
    return recv.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group, timeout) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world != 0:
        raise ValueError(
            f"reduce_scatter: dim {dim} of shape {tuple(x.shape)} is not divisible by {world}"
        )
    send = x.movedim(dim, 0).contiguous()
    recv = send.new_empty((send.shape[0] // world,) + tuple(send.shape[1:]))
    _run(_flat("reduce_scatter_single", "reduce_scatter_tensor"), "reduce_scatter", recv, send,
         group=group, timeout=timeout)
    return recv.movedim(0, dim)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, timeout):
        ctx.args = (dim, group, timeout)
        return _all_gather(x, dim, group, timeout)

    @staticmethod
    def backward(ctx, grad):
        dim, group, timeout = ctx.args
        return _reduce_scatter(grad, dim, group, timeout), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, timeout):
        ctx.args = (dim, group, timeout)
        return _reduce_scatter(x, dim, group, timeout)

    @staticmethod
    def backward(ctx, grad):
        dim, group, timeout = ctx.args
        return _all_gather(grad, dim, group, timeout), None, None, None


def all_gather(x: torch.Tensor, dim: int, group, *, timeout=None) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order. Backward: reduce-scatter."""
    return _AllGather.apply(x, dim % x.dim(), group, timeout)


def reduce_scatter(x: torch.Tensor, dim: int, group, *, timeout=None) -> torch.Tensor:
    """Sum `x` over ranks and keep this rank's piece along `dim`. Backward: all-gather."""
    return _ReduceScatter.apply(x, dim % x.dim(), group, timeout)


# --- all-reduce ------------------------------------------------------------------------------
def _all_reduce(x: torch.Tensor, group, timeout) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)  # gloo reduces contiguous tensors only
    _run(dist.all_reduce, "all_reduce", out, group=group, timeout=timeout)
    return out


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, timeout):
        ctx.args = (group, timeout)
        return _all_reduce(x, group, timeout)

    @staticmethod
    def backward(ctx, grad):
        group, timeout = ctx.args
        return _all_reduce(grad, group, timeout), None, None


def all_reduce(x: torch.Tensor, group, *, timeout=None) -> torch.Tensor:
    """Sum of `x` over ranks (a new tensor). Backward: the sum of the ranks' gradients."""
    return _AllReduce.apply(x, group, timeout)


# --- point to point --------------------------------------------------------------------------
def _peer(group, rank_in_group: int) -> int:
    return rank_in_group if group is None else dist.get_global_rank(group, rank_in_group)


class Pending:
    """Receives posted by `RingComm.post`; `wait()` returns the received tensors."""

    def __init__(self, works, received, timeout, op, group, staged=()):
        self._works, self._received = works, received
        self._timeout, self._op, self._group = timeout, op, group
        self._staged = staged  # (contiguous buffer received into, the caller's buffer)

    def wait(self):
        with _guard(self._op, self._group):
            for work in self._works:
                _wait(work, self._timeout)
        self._works = []
        for got, dst in self._staged:
            dst.copy_(got)
        self._staged = ()
        return self._received


def exchange(
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[tuple[torch.Tensor, int]],
    group,
    *,
    timeout=None,
    op="exchange",
) -> Pending:
    """Post sends (tensor, dst) and receives (buffer, src), ranks given inside `group`.

    Returns at once; `wait()` on the result blocks until all complete and returns the
    receive buffers in order. Tensors and buffers may be any views (a transposed K, a head
    slice of dK) on any device: they go through contiguous copies on the backend's wire
    device where they are not already so (see `wire_device`). All are posted as one
    `batch_isend_irecv`, so NCCL pairs them without deadlock.
    """
    ops = [dist.P2POp(dist.isend, _staged(t, wire_device(group, t.device)), _peer(group, d),
                      group) for t, d in sends]
    buffers = [b for b, _ in recvs]
    # a buffer that is not contiguous, or not on the wire device, receives into a fresh one,
    # copied over in wait()
    wires = []
    for b in buffers:
        wire = wire_device(group, b.device)
        if wire is None and b.is_contiguous():
            wires.append(b)
        else:
            wires.append(torch.empty(b.shape, dtype=b.dtype, device=wire or b.device))
    ops += [dist.P2POp(dist.irecv, wire, _peer(group, s), group)
            for wire, (_, s) in zip(wires, recvs)]
    staged = [(wire, b) for wire, b in zip(wires, buffers) if wire is not b]
    if not ops:
        return Pending([], buffers, timeout, op, group)
    with _guard(op, group, posting=True):
        works = dist.batch_isend_irecv(ops)
    return Pending(works, buffers, timeout, op, group, staged)


class RingComm:
    """Ring exchange within `group`: send to rank+1, receive from rank-1.

    Usage, overlapping communication with compute:

        comm = RingComm(group, timeout)
        for step in range(comm.size):
            if step + 1 < comm.size:
                pending = comm.post(k, v)          # next block starts travelling
            compute(k, v)                          # ... while this one is used
            if step + 1 < comm.size:
                k, v = pending.wait()
    """

    def __init__(self, group, timeout=None, shift: int = 1):
        self.group, self.timeout = group, timeout
        self.size, self.rank = group_size(group), group_rank(group)
        self.send_to = (self.rank + shift) % self.size
        self.recv_from = (self.rank - shift) % self.size

    def post(self, *tensors: torch.Tensor) -> Pending:
        if self.send_to == self.rank:  # one rank, or a shift by a multiple of the ring size
            return Pending([], list(tensors), self.timeout, "ring_exchange", self.group)
        sends = [(t, self.send_to) for t in tensors]
        recvs = [(torch.empty_like(t, memory_format=torch.contiguous_format), self.recv_from)
                 for t in tensors]
        return exchange(sends, recvs, self.group, timeout=self.timeout, op="ring_exchange")


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, shift, timeout):
        ctx.args = (group, shift, timeout)
        return RingComm(group, timeout, shift).post(x).wait()[0]

    @staticmethod
    def backward(ctx, grad):
        group, shift, timeout = ctx.args
        return RingComm(group, timeout, -shift).post(grad).wait()[0], None, None, None


def ring_shift(x: torch.Tensor, group, shift: int = 1, *, timeout=None) -> torch.Tensor:
    """Rank r gets rank (r - shift)'s `x` (cyclically). Backward sends gradients back."""
    return _RingShift.apply(x, group, shift, timeout)


# --- prefix scan -----------------------------------------------------------------------------
def _as_tuple(value: Tensors) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def exclusive_scan(
    value: Tensors,
    combine: Callable[[Tensors, Tensors], Tensors],
    group,
    *,
    identity: Tensors | None = None,
    reverse: bool = False,
    timeout=None,
) -> Tensors | None:
    """Exclusive prefix of `value` over the ranks of `group` under an associative `combine`.

    Rank r gets combine(v_0, ..., v_{r-1}) with the *earlier* operand on the left:
    combine(earlier, later). Rank 0 gets `identity` (None if not given). With reverse=True
    the order runs the other way: rank r gets the combination of v_{P-1}, ..., v_{r+1}, the
    rank farther away on the left.

    ceil(log2 P) rounds; in round d each rank sends its running inclusive value 2^d ranks
    on and receives from 2^d ranks back, so every rank keeps O(1) values live. Every rank
    must pass tensors of the same shapes and dtypes.
    """
    world, rank = group_size(group), group_rank(group)
    inclusive = _as_tuple(value)
    single = not isinstance(value, tuple)
    exclusive: tuple[torch.Tensor, ...] | None = None
    # position along the scan direction
    pos = (world - 1 - rank) if reverse else rank
    to_rank = (lambda p: world - 1 - p) if reverse else (lambda p: p)
    offset = 1
    while offset < world:
        sends = [(t, to_rank(pos + offset)) for t in inclusive] if pos + offset < world else []
        recvs = ([(torch.empty_like(t, memory_format=torch.contiguous_format), to_rank(pos - offset))
                  for t in inclusive] if pos - offset >= 0 else [])
        received = exchange(sends, recvs, group, timeout=timeout, op="exclusive_scan").wait()
        if received:
            earlier = tuple(received)
            earlier_v = earlier[0] if single else earlier
            incl_v = inclusive[0] if single else inclusive
            inclusive = _as_tuple(combine(earlier_v, incl_v))
            if exclusive is None:
                exclusive = earlier
            else:
                excl_v = exclusive[0] if single else exclusive
                exclusive = _as_tuple(combine(earlier_v, excl_v))
        offset *= 2
    if exclusive is None:
        return identity
    return exclusive[0] if single else exclusive
