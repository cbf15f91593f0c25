"""The delta rule with the sequence sharded contiguously over the ranks of a Mesh.

Rank r holds tokens [r N/P, (r+1) N/P). Its chunks act on the incoming state as one affine
map S -> A_r S + B_r (A_r = the product of every token's a_t (I - b_t k_t k_t^T)). The
chunk kernel and its autograd.Function live in chunk.py; a *schedule* only decides where a
shard's first state comes from (forward) and where the gradient of its last state comes from
(backward), so each schedule is a small class:

- `PassSchedule` ("pass"): rank r waits for S from rank r-1, runs its chain, sends S on.
  Backward runs the other way: dS_out from rank r+1, dS_in back to rank r-1.
- `ScanSchedule` ("scan"): every rank composes its (A_r, B_r) while streaming over its chunks
  (only the running pair is live), then `dist.exclusive_scan` combines the pairs in
  ceil(log2 P) rounds; rank r's exclusive prefix applied to the initial state is its incoming
  state, so no rank waits for all earlier ranks' chains. Backward: the gradient map of a shard
  is dS_out -> A_r^T dS_out + L_r (L_r: the gradient its own outputs put on its incoming
  state), combined by the same scan with reverse=True.

Rank 0 folds the initial state into its pair (it contributes the constant map S -> S_out_0),
so the prefix's B part *is* the incoming state; the last rank's forward map and rank 0's
backward map are never needed (nobody later / earlier reads them) and travel as zeros.

The final state is known on the last rank; with output_final_state every rank gets it (an
all-reduce of the last rank's value) and backward sums every rank's gradient of it, as for
any loss that is the sum of the ranks' losses.
"""

from __future__ import annotations

import torch

from seqshard.dist import Mesh, all_reduce, exchange, exclusive_scan

from .chunk import Chunks, chain_grads, run, shard_map


def compose(earlier, later):
    """(A2, B2) after (A1, B1): S -> A2 (A1 S + B1) + B2 = (A2 A1, A2 B1 + B2)."""
    (a1, b1), (a2, b2) = earlier, later
    return a2 @ a1, a2 @ b1 + b2


class _ShardedSchedule:
    def __init__(self, mesh: Mesh, want_final: bool):
        self.group, self.timeout = mesh.group, mesh.timeout
        self.rank, self.size = mesh.rank, mesh.size
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.want_final = want_final

    def _final(self, s_out: torch.Tensor) -> torch.Tensor:
        if not self.want_final:
            return s_out  # the caller drops it
        return all_reduce(s_out if self.last else torch.zeros_like(s_out), self.group,
                          timeout=self.timeout)

    def _given(self, ds_final: torch.Tensor) -> torch.Tensor:
        """Gradient of this shard's last state from the final-state output."""
        if not self.want_final:
            return ds_final
        total = all_reduce(ds_final, self.group, timeout=self.timeout)
        return total if self.last else torch.zeros_like(total)

    def _recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        return exchange([], [(buf, src)], self.group, timeout=self.timeout,
                        op="delta_rule state pass").wait()[0]

    def _send(self, x: torch.Tensor, dst: int) -> None:
        exchange([(x, dst)], [], self.group, timeout=self.timeout,
                 op="delta_rule state pass").wait()


class PassSchedule(_ShardedSchedule):
    """State passing: rank r starts its chain when rank r-1 has finished its own."""

    def state_in(self, h0, ch: Chunks):
        return h0 if self.first else self._recv(h0, self.rank - 1)

    def state_out(self, s_out):
        if not self.last:
            self._send(s_out, self.rank + 1)
        return self._final(s_out)

    def grad_out(self, ds_final, ch: Chunks, ds_states):
        g = self._given(ds_final)
        return g if self.last else g + self._recv(g, self.rank + 1)

    def grad_in(self, ds_in):
        if self.first:
            return ds_in
        self._send(ds_in, self.rank - 1)
        return torch.zeros_like(ds_in)  # the initial state is read on rank 0 only


class ScanSchedule(_ShardedSchedule):
    """Log-depth prefix scan of the shards' affine maps."""

    def _scan(self, pair, reverse: bool):
        return exclusive_scan(pair, compose, self.group, reverse=reverse, timeout=self.timeout)

    def _zeros(self, state: torch.Tensor):
        dk = state.shape[-2]
        return state.new_zeros(state.shape[:-1] + (dk,)), torch.zeros_like(state)

    def state_in(self, h0, ch: Chunks):
        if self.first:
            return h0  # rank 0 joins the scan after its chain, in state_out
        if self.last:
            pair = self._zeros(h0)
        else:
            pair = shard_map(ch)
            self.a = pair[0]  # [B, H, Dk, Dk], kept for the backward map
        return self._scan(pair, reverse=False)[1]

    def state_out(self, s_out):
        if self.first:
            self._scan((self._zeros(s_out)[0], s_out), reverse=False)
        return self._final(s_out)

    def grad_out(self, ds_final, ch: Chunks, ds_states):
        g = self._given(ds_final)
        if self.last:
            return g  # the last rank joins the reverse scan in grad_in
        if self.first:
            pair = self._zeros(g)
        else:
            _, own = chain_grads(ch, ds_states, g, keep=False)  # L_r
            pair = (self.a.mT, own)
        return g + self._scan(pair, reverse=True)[1]

    def grad_in(self, ds_in):
        if self.last:
            self._scan((self._zeros(ds_in)[0], ds_in), reverse=True)
        return ds_in if self.first else torch.zeros_like(ds_in)


SCHEDULES = {"scan": ScanSchedule, "pass": PassSchedule}


def sharded_delta_rule(q, k, v, beta, mesh: Mesh, *, initial_state=None, scale=None, gate=None,
                       chunk_size: int | None = None, schedule: str = "scan",
                       output_final_state: bool = False):
    """Sequence-sharded delta rule without argument checks (see `delta_rule`).

    Shapes as in `delta_rule`, with N the local length. Returns (o [B, H, N_local, Dv],
    state [B, H, Dk, Dv]: the global final state when output_final_state, else this
    shard's last state). Call on every rank of mesh.group.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    plan = SCHEDULES[schedule](mesh, output_final_state)
    return run(q, k, v, beta, gate, initial_state, plan, scale, chunk_size)
