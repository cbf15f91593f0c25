"""The DeltaNet layer over its local shard in sequence pieces: same math, memory O(piece).

Run over the whole shard at once, the layer keeps for backward every whole-shard intermediate
(projections, conv inputs and outputs, normalised q / k, the chunk kernel's tensors: ~16 KB per
token at width 256). Here one autograd.Function holds the whole layer for one shard and keeps
only its input, the (conv_size - 1)-token halo before it and one delta-rule state per piece.

The delta rule is a recurrence, so a shard cut into pieces p = 0, 1, ... of `piece_tokens`
tokens is the layer run piece after piece with the state S_p carried over (and the conv reading
the tokens before each piece). Across ranks the shard's incoming state comes from the same
log-depth scan of affine maps S -> A S + B as sharded.py's "scan" schedule:

forward (no autograd)
  1. ranks other than the first and the last: per piece, the projections + conv and the
     piece's map (`prepare_blocked` + `shard_map`), composed into the shard's (A, B);
  2. `exclusive_scan` of (A, B) -> this shard's incoming state S_0 (rank 0 starts from zeros
     and joins the scan after step 3 with the constant map S -> S_end, as ScanSchedule does);
  3. per piece, the single-process layer `DeltaNet._mix` from S_p -> y_p and S_{p+1}.
backward: the piece's vector-Jacobian product is linear in (dy, dS_end), so
  a. ranks other than the first: every piece in reverse with the shard's dS_end = 0,
     recomputing the piece with autograd -> dx, parameter gradients and L = the gradient on
     the incoming state (the last rank is done after this: nothing reads its final state);
  b. the reverse scan of the gradient maps G -> A^T G + L -> this shard's dS_end;
  c. ranks other than the last: every piece in reverse again with (dy = 0 on ranks that ran
     (a), dS_end); rank 0 skipped (a), nobody needs its L, so it runs (dy, dS_end) at once.
At P = 2 every rank runs one backward sweep; in the middle of a longer ring two. Only one
piece's graph is ever alive.

One-way mode (P = 2, or the layer's schedule "pass" at any P): no scan and no maps. Rank r
receives its incoming state from r - 1 and sends its end state to r + 1 after its outputs;
in backward it sweeps once with (dy, dS_end from r + 1) and sends the gradient on its
incoming state to r - 1 from an autograd hook. Nobody waits for a send, so over a stack of
layers the ranks lag each other by P - 1 layers once per step rather than taking turns.
"""

from __future__ import annotations

import torch

from seqshard.dist import Mesh, agree, exchange, exclusive_scan

from ..dtypes import FLOAT_DTYPES, compute_dtype
from .api import _nonfinite, agreement_facts
from .chunk import default_chunk_size, prepare_blocked, shard_map
from .sharded import compose


def _spans(length: int, piece_tokens: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) of the pieces; the last one may be short."""
    return [(start, min(start + piece_tokens, length))
            for start in range(0, length, piece_tokens)]


def _context(x: torch.Tensor, halo: torch.Tensor, start: int) -> torch.Tensor:
    """The halo-many tokens before token `start` of the shard x [B, N, C]: [B, halo, C]."""
    rows = halo.shape[1]
    if start >= rows:
        return x[:, start - rows:start]
    return torch.cat([halo[:, start:], x[:, :start]], dim=1)


def _add_context_grad(dx: torch.Tensor, dhalo: torch.Tensor, grad: torch.Tensor | None,
                      start: int) -> None:
    """Scatter the gradient grad [B, halo, C] of `_context(x, halo, start)` into dx, dhalo."""
    rows = dhalo.shape[1]
    if grad is None:  # no context (no conv)
        return
    if start >= rows:
        dx[:, start - rows:start] += grad
    else:
        dhalo[:, start:] += grad[:, :rows - start]
        dx[:, :start] += grad[:, rows - start:]


class _Shard:
    """One shard's pieces, how one piece is computed, and the scan over the ranks."""

    def __init__(self, layer, mesh: Mesh | None, piece_tokens: int, x: torch.Tensor):
        self.layer, self.spans = layer, _spans(x.shape[1], piece_tokens)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.first = self.mesh is None or self.mesh.rank == 0
        self.last = self.mesh is None or self.mesh.rank == self.mesh.size - 1
        self.work = compute_dtype(x.dtype)  # the chain's dtype
        head_dim = layer.head_dim
        self.state_shape = (x.shape[0], layer.num_heads, head_dim, head_dim)  # [B, H, Dk, Dv]
        device = x.device.type  # backward recomputes the pieces under the forward's autocast
        self.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                             dtype=torch.get_autocast_dtype(device))
        # the state goes rank to rank as one-way messages: at P = 2 (where that is the scan),
        # and with the layer's schedule "pass" at any P (the ranks then lag each other by
        # P - 1 layers once per step instead of a middle rank composing its map and
        # sweeping twice at every layer)
        self.one_way = self.mesh is not None and (self.mesh.size == 2
                                                  or layer.schedule == "pass")
        self.recompute = _recomputing()
        self.wants_grad = False  # set by the Function: will backward run?
        self.graphs = {}  # piece index -> (x_part, context, state, y, s_end) with autograd

    def send(self, t: torch.Tensor, dst: int) -> None:
        """A one-way send that this rank never waits for in line: the receiver may be a whole
        layer behind (backward) and waiting would make the ranks take turns. The pending send
        is kept on the layer and settled at its next forward (`settle`), so it sends a copy
        of its own: a view (the halo rows of x) would keep its whole base alive until then,
        one shard-sized tensor per layer of a model held from its forward to its backward."""
        t = t.clone(memory_format=torch.contiguous_format)
        self.layer._in_flight.append(exchange([(t, dst)], [], self.mesh.group,
                                              timeout=self.mesh.timeout, op="DeltaNet handoff"))

    def post_recv(self, like: torch.Tensor, src: int):
        """A receive posted now, waited for (`.wait()[0]`) where its value is needed."""
        return exchange([], [(torch.empty_like(like, memory_format=torch.contiguous_format),
                              src)], self.mesh.group, timeout=self.mesh.timeout,
                        op="DeltaNet handoff")

    def zeros(self, x: torch.Tensor):
        """(A, B) = (0 [B, H, Dk, Dk], 0 [B, H, Dk, Dv]): the map nobody reads."""
        state = x.new_zeros(self.state_shape, dtype=self.work)
        return state.new_zeros(self.state_shape[:3] + (self.state_shape[2],)), state

    def chunks(self, x: torch.Tensor, halo: torch.Tensor, start: int, end: int):
        """The chunk tensors of the piece [start, end) (no autograd): features, then the UT
        transform."""
        features = self.layer._features(x[:, start:end], _context(x, halo, start))
        # q, k, v, beta, gate in the chain's dtype
        inputs = [t.to(self.work) if t is not None else None for t in features]
        chunk = min(self.layer.chunk_size or default_chunk_size(x.device), end - start)
        return prepare_blocked(inputs, inputs[0].shape[-1] ** -0.5, chunk)

    def shard_map(self, x: torch.Tensor, halo: torch.Tensor):
        """The shard's affine state map S -> A S + Bm, composed piece by piece:
        (A [B, H, Dk, Dk], Bm [B, H, Dk, Dv])."""
        pair = None
        for start, end in self.spans:
            step = shard_map(self.chunks(x, halo, start, end))
            pair = step if pair is None else compose(pair, step)
        return pair

    def scan(self, pair, reverse: bool) -> torch.Tensor:
        """The B part of this rank's exclusive prefix: its incoming state (forward) or the
        gradient of its last state (reverse); None on the rank that starts the scan."""
        prefix = exclusive_scan(pair, compose, self.mesh.group, reverse=reverse,
                                timeout=self.mesh.timeout)
        return None if prefix is None else prefix[1]


def _recomputing() -> bool:
    """True inside a backward pass: activation checkpointing is running this forward again.
    The recomputation then reuses what the first forward received (`_recall`) instead of
    asking the other ranks again: they are a layer or more ahead in backward and would
    otherwise have to wait for this rank's forward, making the ranks take turns."""
    return torch._C._current_graph_task_id() != -1


def _keep(layer, x, halo, state, a_map) -> None:
    """Remember, on the layer, what this forward received from the other ranks (a few rows
    and one state: O(B H Dk Dv)) with x's first and last rows to recognise its recomputation."""
    layer._kept = (x.shape, x[:, :1].clone(), x[:, -1:].clone(), halo, state, a_map)


def _recall(layer, x):
    """(halo, incoming state, A) that the forward of this same x received."""
    kept = getattr(layer, "_kept", None)
    if (kept is None or kept[0] != x.shape or not torch.equal(kept[1], x[:, :1])
            or not torch.equal(kept[2], x[:, -1:])):
        raise RuntimeError("DeltaNet in pieces: recomputing a forward (activation "
                           "checkpointing) whose input differs from the layer's last forward; "
                           "run each forward's backward before the layer's next forward")
    return kept[3:]


def _halo_in(shard: _Shard, x: torch.Tensor) -> torch.Tensor:
    """The conv context before the shard [B, halo, dim]: rank r - 1's last rows (zeros on
    rank 0), one way: each rank posts its own last rows to rank r + 1 first, then waits."""
    rows = shard.layer.halo
    zeros = x.new_zeros(x.shape[0], rows, x.shape[2])
    if shard.mesh is None or rows == 0:
        return zeros
    if x.shape[1] < rows:
        raise ValueError(f"ShortConv: local length {x.shape[1]} is shorter than the halo "
                         f"conv_size - 1 = {rows}; use fewer ranks or a longer sequence")
    rank = shard.mesh.rank
    if not shard.last:
        shard.send(x[:, x.shape[1] - rows:], rank + 1)
    return zeros if shard.first else shard.post_recv(zeros, rank - 1).wait()[0]


def _state_in(shard: _Shard, x: torch.Tensor, halo: torch.Tensor):
    """(this shard's incoming state [B, H, Dk, Dv], its transition A or None)."""
    zeros = x.new_zeros(shard.state_shape, dtype=shard.work)
    if shard.first:
        return zeros, None
    if shard.one_way:  # from rank r - 1, sent after its outputs
        return shard.post_recv(zeros, shard.mesh.rank - 1).wait()[0], None
    if shard.last:
        return shard.scan(shard.zeros(x), reverse=False), None  # nobody reads its map
    pair = shard.shard_map(x, halo)
    return shard.scan(pair, reverse=False), pair[0]


def _fwd(shard: _Shard, x: torch.Tensor, halo: torch.Tensor | None):
    """Returns y [B, N, dim], the state before each piece [pieces, B, H, Dk, Dv], the
    shard's transition A [B, H, Dk, Dk] (None where backward does not need it) and the halo
    [B, halo, dim] the conv read."""
    layer = shard.layer
    if shard.recompute:
        kept_halo, state, a_map = _recall(layer, x)
        halo = kept_halo if halo is None else halo
    else:
        halo = _halo_in(shard, x) if halo is None else halo
        state, a_map = _state_in(shard, x, halo)
        _keep(layer, x, halo, state, a_map)
    y = None  # [B, N, dim], in the dtype of the layer's output (autocast may lower it)
    starts = x.new_empty((len(shard.spans),) + shard.state_shape, dtype=shard.work)
    for i, (start, end) in enumerate(shard.spans):
        starts[i] = state
        if shard.recompute and shard.wants_grad and i == len(shard.spans) - 1:
            # the backward sweep starts with this piece: keep its graph for it
            y_part, state = _graph(shard, x, halo, i, state)
            state = state.detach()
        else:
            y_part, state = layer._mix(x[:, start:end], _context(x, halo, start), state,
                                       check=False)
        if y is None:
            y = y_part.new_empty(x.shape[:2] + y_part.shape[2:])
        y[:, start:end] = y_part.detach()
    layer._graphs = shard.graphs  # for this recomputation's backward (empty otherwise)
    if shard.mesh is not None and not shard.last and not shard.recompute:
        # the end state leaves after the outputs: running the chain alone first would cost
        # a second pass over the features, while with one-way messages the next rank lags by
        # this one layer once per step, not once per layer
        if shard.one_way:
            shard.send(state.to(shard.work), shard.mesh.rank + 1)
        elif shard.first:
            shard.scan((shard.zeros(x)[0], state.to(shard.work)), reverse=False)
    return y, starts, a_map, halo, state.to(shard.work)


def _graph(shard: _Shard, x, halo, i: int, state):
    """Piece i's forward with autograd from state [B, H, Dk, Dv], its graph kept on the shard
    for `_sweep` (an activation-checkpointing recomputation of the layer builds it for the
    last piece, which the sweep needs first, so that piece is not computed a third time).
    Returns (y_part, the state after the piece)."""
    start, end = shard.spans[i]
    x_part = x[:, start:end].detach().requires_grad_()
    context = _context(x, halo, start).detach().requires_grad_()
    state = state.detach().requires_grad_()
    # identity hooks: inside a checkpoint's recomputation its own saved-tensor hooks would
    # take this graph's saved tensors for the ones the recomputation is looking for
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        y, s_end = shard.layer._mix(x_part, context, state, check=False)
    shard.graphs[i] = (x_part, context, state, y, s_end)
    return y, s_end


def _graphs_for(shard: _Shard, x: torch.Tensor) -> dict:
    """The piece graphs that a checkpoint recomputation of this layer over this same x kept
    (on the layer: backward runs on the first forward's node, not the recomputation's)."""
    graphs = shard.layer.__dict__.pop("_graphs", {})
    for i, (x_part, *_) in graphs.items():
        start, end = shard.spans[i]
        if x_part.shape != x[:, start:end].shape or not torch.equal(x_part, x[:, start:end]):
            return {}  # from another input: not this backward's
    return graphs


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _sweep(shard: _Shard, x, halo, starts, params, dy, ds_end, grads, on_state_grad=None):
    """Backward through the pieces in reverse, adding into grads = [dx, dhalo, *dparams].
    dy [B, N, dim] or None (zero), ds_end: gradient of the shard's last state, None, or a
    callable returning it (waited for only once the first piece's graph is built, so that
    forward overlaps the wait). Returns the gradient on the shard's incoming state, also
    handed to on_state_grad (if given) as soon as autograd computes it."""
    grad_state = ds_end
    for i in range(len(shard.spans) - 1, -1, -1):
        if i not in shard.graphs:
            with torch.autocast(**shard.autocast):
                _graph(shard, x, halo, i, starts[i])
        x_part, context, state, y, s_end = shard.graphs.pop(i)
        start, end = shard.spans[i]
        if callable(grad_state):
            grad_state = grad_state()
        outs, pulls = [], []
        if dy is not None:
            outs.append(y), pulls.append(dy[:, start:end].to(y.dtype))
        if grad_state is not None:
            outs.append(s_end), pulls.append(grad_state.to(s_end.dtype))
        if i == 0 and on_state_grad is not None:
            state.register_hook(on_state_grad)  # returns None: the gradient stays as it is
        got = torch.autograd.grad(outs, [x_part, context, state] + params, pulls,
                                  allow_unused=True)
        grads[0][:, start:end] += got[0]
        _add_context_grad(grads[0], grads[1], got[1], start)
        for total, part in zip(grads[2:], got[3:]):
            if part is not None:
                total += part
        grad_state = got[2]
    return grad_state


def _bwd(shard: _Shard, x, halo, starts, a_map, params, dy, halo_given: bool):
    """Gradients of x [B, N, dim], halo [B, halo, dim] and every parameter. Without a given
    halo its gradient goes one way to rank r - 1, and rank r + 1's comes back into dx."""
    grads = [torch.zeros_like(x), torch.zeros_like(halo)] + [torch.zeros_like(p) for p in params]
    shard.graphs = _graphs_for(shard, x)
    if shard.mesh is None:
        _sweep(shard, x, halo, starts, params, dy, None, grads)
        return grads
    rank = shard.mesh.rank
    if shard.one_way:
        # one sweep with (dy, dS_end): dS_end comes from rank r + 1 and is waited for only once
        # the first swept piece is built; the gradient on the incoming state goes to rank
        # r - 1 from a hook the moment autograd has it (after the first piece's delta-rule
        # backward, before its conv and projection gradients), never waited for
        ds_end = None
        if not shard.last:
            pending = shard.post_recv(starts[0], rank + 1)
            ds_end = lambda: pending.wait()[0]  # noqa: E731
        sent = []
        send = None if shard.first else (
            lambda grad: sent.append(shard.send(grad.to(shard.work), rank - 1)))
        own = _sweep(shard, x, halo, starts, params, dy, ds_end, grads, on_state_grad=send)
        if send is not None and not sent:  # autograd computed no such gradient: zeros
            send(torch.zeros_like(starts[0]) if own is None else own)
    elif shard.first:  # nobody needs rank 0's incoming-state gradient: one sweep, after the scan
        ds_end = lambda: shard.scan(shard.zeros(x), reverse=True)  # noqa: E731
        _sweep(shard, x, halo, starts, params, dy, ds_end, grads)
    else:
        own = _sweep(shard, x, halo, starts, params, dy, None, grads)  # L: with dS_end = 0
        # the shard's gradient map G -> A^T G + L; the last rank's A^T is never read
        pair = (shard.zeros(x)[0] if shard.last else a_map.mT, own.to(shard.work))
        ds_end = shard.scan(pair, reverse=True)
        if not shard.last:  # linear in (dy, dS_end): add the dS_end part
            _sweep(shard, x, halo, starts, params, None, ds_end, grads)
    rows = halo.shape[1]
    if not halo_given and rows:  # after the state messages, in the order the peers send
        if not shard.first:
            shard.send(grads[1], rank - 1)
        if not shard.last:
            grads[0][:, x.shape[1] - rows:] += shard.post_recv(halo, rank + 1).wait()[0]
    return grads


def _settle(layer) -> None:
    """Wait for the one-way sends of the layer's previous call: long delivered by now (the
    receiver needed them), and a send must stay alive until it completes."""
    in_flight = getattr(layer, "_in_flight", None)
    if in_flight is None:
        layer._in_flight = in_flight = []
    while in_flight:
        in_flight.pop(0).wait()


class _LayerInPieces(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, halo, layer, mesh, piece_tokens, *params):
        _settle(layer)
        shard = _Shard(layer, mesh, piece_tokens, x)
        shard.wants_grad = any(ctx.needs_input_grad)
        ctx.halo_given = halo is not None
        y, starts, a_map, halo, end = _fwd(shard, x, halo)
        ctx.save_for_backward(x, halo, starts, a_map)
        ctx.shard = shard
        ctx.mark_non_differentiable(end)
        return y, end

    @staticmethod
    def backward(ctx, dy, _d_end):  # the end state carries no gradient
        x, halo, starts, a_map = ctx.saved_tensors
        # the pieces are recomputed with the layer's parameters (as torch's checkpoint does);
        # only those that want a gradient are differentiated
        wanted = ctx.needs_input_grad[5:]
        params = [p for p, want in zip(ctx.shard.layer.parameters(), wanted) if want]
        grads = _bwd(ctx.shard, x, halo, starts, a_map, params, dy, ctx.halo_given)
        dparams = iter(grads[2:])
        return (grads[0], grads[1] if ctx.halo_given else None, None, None, None,
                *(next(dparams) if want else None for want in wanted))


def deltanet_in_pieces(layer, x: torch.Tensor, halo: torch.Tensor | None, mesh: Mesh | None,
                       piece_tokens: int, check: bool = True, end_state: bool = False):
    """`layer` (a `DeltaNet`) over its shard in pieces of `piece_tokens` tokens, exactly.

    x [B, N_local, dim]: this rank's contiguous shard; halo [B, conv_size - 1, dim]: the
    tokens before it (`causal_halo` in layer.py: rank r - 1's last ones, zeros on rank 0),
    through which the conv's gradient reaches rank r - 1; None: fetched here one way (rank r
    sends its last rows to r + 1 without waiting; the gradient returns the same way).
    Returns y [B, N_local, dim], or with end_state (y, the delta-rule state after this shard's
    last token [B, H, Dk, Dv] in the chain's dtype, without gradient: on the last rank the
    state after the whole sequence, which `DeltaNet.forward(final_state=True)` hands to every
    rank). Every rank of mesh calls this (mesh None or of size 1: one
    process). `DeltaNet.forward` calls it when N_local > its mixer_piece_tokens.

    check: reject NaN/inf input and, with a mesh, agree with the other ranks first (one small
    all-gather). A caller that agreed already (DeltaNetLM checks its token shards once per
    forward) passes False: the layer then sends nothing but the state and the halo.

    At P = 2 the state crosses as one message each way that the sender never waits for, and
    a recomputation under activation checkpointing reuses what the first forward received, so
    in backward the last rank never waits for rank 0: the ranks lag by one layer once per step
    instead of taking turns at every layer. P >= 3 runs the scan (README.md).

    >>> from seqshard.ops.delta_rule import DeltaNet
    >>> layer, x = DeltaNet(32, 2, mixer_piece_tokens=None), torch.randn(1, 50, 32)
    >>> y = deltanet_in_pieces(layer, x, torch.zeros(1, layer.halo, 32), None, 16)
    >>> torch.allclose(y, layer(x), atol=1e-6)
    True
    """
    problems = _nonfinite([("x", x), ("halo", halo)]) if check else []
    if check and mesh is not None and mesh.size > 1 and not _recomputing():
        # the same facts as delta_rule's check on the whole-shard path (the "path" fact says
        # which), so ranks that took different paths raise instead of mixing scans
        head_dim = layer.head_dim
        dtype = x.dtype if x.dtype in FLOAT_DTYPES else None
        chunk = layer.chunk_size or default_chunk_size(x.device)
        facts = agreement_facts("pieces", x.shape[0], layer.num_heads, head_dim, head_dim,
                                [dtype] * 4 + [dtype if layer.use_gate else None],
                                head_dim ** -0.5, chunk, "scan", False)
        agree(facts, mesh.group, what="DeltaNet", problem="; ".join(problems) or None,
              timeout=mesh.timeout)
    elif problems:
        raise ValueError("DeltaNet: " + "; ".join(problems))
    params = list(layer.parameters())
    y, end = _LayerInPieces.apply(x, halo, layer, mesh, piece_tokens, *params)
    return (y, end) if end_state else y
