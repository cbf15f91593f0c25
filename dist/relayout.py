"""Moving a sharded sequence from one layout to another (e.g. zigzag <-> contiguous).

Every token moves once, straight from its owner under the source layout to its owner under
the destination layout: one batch of point-to-point messages, each exactly the rows one rank
owes another (no padding), so a rank never holds more than its shard in and its shard out.
The plan (which local rows go where) follows from the two layouts alone, so every rank knows
what every other rank sends without talking. The move is autograd-aware: its backward is the
reverse move of the gradient.

Zigzag -> contiguous at P ranks: rank r's two chunks r and 2P-1-r go to ranks r // 2 and
(2P-1-r) // 2, so each rank sends and receives at most two pieces of n/2 rows. Striped ->
contiguous: each rank sends n/P rows to every other rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collectives import exchange
from .layout import Layout, get_layout
from .mesh import Mesh


@dataclass(frozen=True)
class RelayoutPlan:
    """This rank's part of a move between two layouts of a sequence of `seq_len` tokens.

    send_rows[c]: int64 local rows (source layout) this rank sends to rank c, in the order
    rank c stores them. recv_rows[a]: int64 local rows (destination layout) that the rows
    from rank a fill, in the order rank a sends them. Entry `rank` is the part that stays.
    """

    src: str
    dst: str
    seq_len: int
    world: int
    rank: int
    send_rows: tuple[torch.Tensor, ...]
    recv_rows: tuple[torch.Tensor, ...]

    @property
    def local_len(self) -> int:
        return self.seq_len // self.world

    def inverse(self) -> "RelayoutPlan":
        """The reverse move: what arrived goes back where it came from."""
        return RelayoutPlan(self.dst, self.src, self.seq_len, self.world, self.rank,
                            self.recv_rows, self.send_rows)


def relayout_plan(src: str | Layout, dst: str | Layout, seq_len: int, world: int,
                  rank: int) -> RelayoutPlan:
    """The plan of `rank` for moving a `seq_len`-token sequence from layout src to dst.

    O(seq_len) host work: build it once per forward where a model moves often.
    """
    src, dst = get_layout(src), get_layout(dst)
    src.check(seq_len, world)
    dst.check(seq_len, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} outside 0..{world - 1}")
    n = seq_len // world
    owner = torch.empty(seq_len, dtype=torch.int64)  # global position -> rank under dst
    slot = torch.empty(seq_len, dtype=torch.int64)  # global position -> local row under dst
    for r in range(world):
        pos = dst.positions(seq_len, r, world)
        owner[pos], slot[pos] = r, torch.arange(n)
    mine = src.positions(seq_len, rank, world)  # [n] my rows' global positions
    sends, recvs = [], []
    for c in range(world):
        rows = torch.nonzero(owner[mine] == c).flatten()
        sends.append(rows[torch.argsort(slot[mine[rows]])])  # in rank c's order
        theirs = src.positions(seq_len, c, world)
        # rank c sends in my order, so its rows fill my slots in increasing order
        recvs.append(torch.sort(slot[theirs[owner[theirs] == rank]]).values)
    return RelayoutPlan(src.name, dst.name, seq_len, world, rank, tuple(sends), tuple(recvs))


def _move(x: torch.Tensor, plan: RelayoutPlan, dim: int, group, timeout) -> torch.Tensor:
    me = plan.rank
    device = x.device
    shape = list(x.shape)
    sends, recvs = [], []
    for peer in range(plan.world):
        if peer == me:
            continue
        if len(plan.send_rows[peer]):
            sends.append((x.index_select(dim, plan.send_rows[peer].to(device)), peer))
        if len(plan.recv_rows[peer]):
            shape[dim] = len(plan.recv_rows[peer])
            recvs.append((x.new_empty(shape), peer))
    pending = exchange(sends, recvs, group, timeout=timeout, op="relayout")
    shape[dim] = plan.local_len
    out = x.new_empty(shape)
    out.index_copy_(dim, plan.recv_rows[me].to(device),
                    x.index_select(dim, plan.send_rows[me].to(device)))  # the rows that stay
    peers = [p for p in range(plan.world) if p != me and len(plan.recv_rows[p])]
    for peer, got in zip(peers, pending.wait()):
        out.index_copy_(dim, plan.recv_rows[peer].to(device), got)
    return out


class _Relayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, dim, group, timeout):
        ctx.args = (plan, dim, group, timeout)
        return _move(x, plan, dim, group, timeout)

    @staticmethod
    def backward(ctx, grad):
        plan, dim, group, timeout = ctx.args
        return _move(grad, plan.inverse(), dim, group, timeout), None, None, None, None


def relayout(x: torch.Tensor, mesh: Mesh, src: str | Layout, dst: str | Layout, *,
             dim: int = -2, plan: RelayoutPlan | None = None) -> torch.Tensor:
    """This rank's shard of the same sequence under layout `dst`, from its shard x under
    `src` (sequence along `dim`; -2 fits both [B, H, n, D] and [B, n, C]).

    Every rank must call it with the same layouts and shapes. `plan`: a prebuilt
    `relayout_plan` (saves its O(N) host work when the same move repeats).
    """
    src, dst = get_layout(src), get_layout(dst)
    dim = dim % x.dim()
    seq_len = x.shape[dim] * mesh.size
    if plan is None and (mesh.size == 1 or src.name == dst.name):
        return x  # one rank holds the whole sequence in order under every layout
    if plan is None:
        plan = relayout_plan(src, dst, seq_len, mesh.size, mesh.rank)
    elif (plan.src, plan.dst, plan.seq_len, plan.world, plan.rank) != (
            src.name, dst.name, seq_len, mesh.size, mesh.rank):
        raise ValueError(f"plan {plan.src}->{plan.dst} of N={plan.seq_len} on rank "
                         f"{plan.rank}/{plan.world} does not fit a move {src.name}->{dst.name} "
                         f"of x {tuple(x.shape)} (N={seq_len}) on rank {mesh.rank}/{mesh.size}")
    if mesh.size == 1 or src.name == dst.name:
        return x
    return _Relayout.apply(x, plan, dim, mesh.group, mesh.timeout)
