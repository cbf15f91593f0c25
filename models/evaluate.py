"""Evaluation of a sharded LM: loss by position and passkey retrieval (the `[eval]` section).

Both run on the training mesh, one sharded forward per sample, so evaluating at N tokens works
wherever training at N does; lengths are multiples of train.seq_len (1, 2, 4: extrapolation).

Loss by position: mean next-token loss in log-spaced buckets of the global position
(`bucket_edges`). Each rank sums the losses of the positions it holds into the buckets, over
all its samples; one all-reduce over the sp group (and one over dp replicas, which evaluate
different samples) gives the totals. The per-token losses come from the final norm's output
through the LM head in pieces (`token_losses`), so no rank holds [N_local, V] logits at once.

Passkey retrieval (passkey.py): a key hidden at a depth of held-out filler, asked for at the
end; a sample counts as retrieved when every key digit at the end is the greedy
(teacher-forced) prediction. Accuracy by (length, depth).

Data: a `Source` is a callable (length, index, positions) -> this rank's ids [B, N_local] at
the global `positions` of sample `index`; `task_source` gives the trainer's own held-out data.
Results are plain records ({"type": "eval", "metric": ...}) for records.msgpack and summary.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqshard.dist import Layout, Mesh, get_layout

from .data import _generator, random_batch, recall_batch
from .loss import IGNORE, next_token_targets
from .passkey import PasskeyTokens, min_length, passkey_shard, random_key
from .tokenizer import check_folder, load_tokenizer

Source = Callable[[int, int, torch.Tensor], torch.Tensor]
HELD_OUT_STEP = -(10**9)
"""Synthetic held-out samples use steps from here down: training uses steps 0.. and the
exactness check -1 - step, so none is ever trained on."""


@dataclass
class EvalConfig:
    """What to evaluate at the end of training and under `seqshard eval`."""

    at_end: bool = False
    """Run the evaluation after the last training step."""
    lengths: tuple[int, ...] = (1, 2, 4)
    """Loss-by-position lengths, as multiples of train.seq_len (empty: skip)."""
    samples: int = 2
    """Held-out sequences per loss-by-position length, per data-parallel replica."""
    buckets: int = 8
    """Log-spaced position buckets over train.seq_len (fewer where short sequences merge
    them); longer lengths continue the same grid, so their first buckets line up."""
    passkey_lengths: tuple[int, ...] = (1, 2, 4)
    """Passkey context lengths, as multiples of train.seq_len (empty: skip)."""
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Where the key is hidden: 0 at the start of the filler, 1 just before the question."""
    passkey_trials: int = 4
    """Samples per (length, depth) per data-parallel replica, each with its own key."""
    passkey_digits: int = 5
    """Digits of the key."""
    seed: int = 0
    """Seeds the held-out samples and the keys (independent of train.seed)."""
    tokenizer: str = ""
    """The local tokenizer folder that made a .bin whose [data] does not name it (data.tokenizer
    is used when set): passkeys on tokenized data are written in its ids."""

    def __post_init__(self) -> None:
        for name in ("lengths", "passkey_lengths", "passkey_depths"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"eval.{name} = {value!r}: expected a list")
            setattr(self, name, tuple(value))
        for name in ("lengths", "passkey_lengths"):
            bad = [m for m in getattr(self, name) if not isinstance(m, int) or m < 1]
            if bad:
                raise ValueError(f"eval.{name} = {list(getattr(self, name))}: expected positive "
                                 f"integers (multiples of train.seq_len), got {bad}")
        bad = [d for d in self.passkey_depths if not isinstance(d, (int, float)) or not 0 <= d <= 1]
        if bad:
            raise ValueError(f"eval.passkey_depths = {list(self.passkey_depths)}: each must be "
                             f"within [0, 1], got {bad}")
        for name in ("samples", "buckets", "passkey_trials", "passkey_digits"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} = {getattr(self, name)}: must be >= 1")
        if self.tokenizer:
            check_folder(self.tokenizer, "eval.tokenizer")


# --- per-token losses -------------------------------------------------------------------------
@torch.no_grad()
def _piece_losses(head, hidden: torch.Tensor, targets: torch.Tensor,
                  piece_tokens: int) -> torch.Tensor:
    """Cross-entropy per token [B, N_local] (0 where ignored), the head run piece by piece."""
    safe = torch.where(targets == IGNORE, torch.zeros_like(targets), targets)
    out = []
    for h, t in zip(torch.split(hidden, piece_tokens, 1), torch.split(safe, piece_tokens, 1)):
        logits = head(h).float()  # [B, n, V]: one piece only
        out.append(F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none")
                   .view(t.shape))
    return torch.cat(out, 1) * (targets != IGNORE)


@torch.no_grad()
def token_losses(model, ids: torch.Tensor, targets: torch.Tensor,
                 piece_tokens: int = 8192) -> torch.Tensor:
    """Next-token loss per local token [B, N_local] (fp32; 0 where the target is ignored).

    model: a CausalLM, or a wrapper holding it as `.module` (DeepSpeed's engine). The model's
    own forward runs unchanged (its loss path, so the logits of the shard never exist at once);
    a forward hook on the final norm takes its output [B, N_local, C] through the head in
    pieces. Calling the head as a module keeps wrappers' parameter hooks (ZeRO-3) working."""
    inner = getattr(model, "module", model)
    found = {}

    def hook(module, args, hidden):
        found["losses"] = _piece_losses(inner.head, hidden, targets, piece_tokens)

    handle = inner.norm.register_forward_hook(hook)
    try:
        model(ids, targets)
    finally:
        handle.remove()
    return found["losses"]


# --- loss by position -------------------------------------------------------------------------
def bucket_edges(length: int, buckets: int, base_length: int | None = None) -> list[int]:
    """Log-spaced bucket bounds over the positions 0 .. length - 2 that have a next token:
    bucket i holds positions edges[i] <= p < edges[i + 1]. The first is position 0 alone;
    `buckets` buckets span a sequence of `base_length` (default `length`) geometrically, and a
    longer sequence continues the same grid, so lengths N, 2N, 4N share their first buckets.

    >>> bucket_edges(64, 4)
    [0, 1, 4, 16, 63]
    >>> bucket_edges(128, 4, base_length=64)
    [0, 1, 4, 16, 63, 127]
    """
    scored, base = length - 1, (base_length or length) - 1
    if scored < 1 or base < 1:
        raise ValueError(f"loss by position needs lengths >= 2, got {length} (base "
                         f"{base_length})")
    if buckets == 1 or base == 1:
        return sorted({0, 1, scored} if base == 1 and scored > 1 else {0, scored})
    ratio = base ** (1.0 / (buckets - 1))
    edges, i = {0}, 0
    while round(ratio ** i) < scored:
        edges.add(int(round(ratio ** i)))
        i += 1
    return sorted(edges | {scored})


def _sum_over(stats: torch.Tensor, mesh: Mesh, *, sp: bool = True) -> torch.Tensor:
    """Sum over the sp group (unless the stats are already the same on every sp rank) and then
    the dp replicas; each is a no-op on a group of one."""
    for group, size in ((mesh.group, mesh.size if sp else 1), (mesh.dp_group, mesh.dp_size)):
        if size > 1:
            dist.all_reduce(stats, group=group)
    return stats


@torch.no_grad()
def loss_by_position(model, mesh: Mesh, layout: str | Layout, source: Source, length: int,
                     samples: int, buckets: int, piece_tokens: int = 8192,
                     base_length: int | None = None) -> list[dict]:
    """Mean loss per log-spaced position bucket (`bucket_edges(length, buckets, base_length)`)
    over `samples` sequences of `length` per replica: one record per bucket (start, end,
    loss, tokens), the same on every rank."""
    layout = get_layout(layout)
    positions = layout.positions(length, mesh.rank, mesh.size)  # [N_local] global positions
    edges = bucket_edges(length, buckets, base_length)
    which = torch.bucketize(positions, torch.tensor(edges[1:]), right=True)  # [N_local]
    which = which.clamp(max=len(edges) - 2).to(mesh.device)
    sums = torch.zeros(2, len(edges) - 1, dtype=torch.float64, device=mesh.device)
    for index in range(samples):
        ids = source(length, index, positions).to(mesh.device)  # [B, N_local]
        targets = next_token_targets(ids, mesh, layout=layout)
        losses = token_losses(model, ids, targets, piece_tokens)  # [B, N_local]
        valid = targets != IGNORE
        slots = which.expand_as(ids)[valid]
        sums[0].index_add_(0, slots, losses[valid].double())
        sums[1].index_add_(0, slots, torch.ones_like(slots, dtype=torch.float64))
    total, count = _sum_over(sums, mesh).cpu()
    return [{"type": "eval", "metric": "loss_by_position", "length": length, "bucket": i,
             "start": edges[i], "end": edges[i + 1],
             "loss": float(total[i] / count[i]) if count[i] else math.nan,
             "tokens": int(count[i])} for i in range(len(edges) - 1)]


# --- passkey ------------------------------------------------------------------------------------
@torch.no_grad()
def passkey_correct(predictions: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor,
                    mesh: Mesh) -> torch.Tensor:
    """Per sample [B] bool: every answer position of the whole sequence predicted its target
    (one all-reduce of the wrong counts over the sp group)."""
    wrong = ((predictions != targets) & answer.bool()).sum(1).to(torch.float64)  # [B]
    if mesh.size > 1:
        dist.all_reduce(wrong, group=mesh.group)
    return wrong == 0


@torch.no_grad()
def passkey_accuracy(model, mesh: Mesh, layout: str | Layout, source: Source,
                     tokens: PasskeyTokens, length: int, depths, trials: int, digits: int,
                     seed: int) -> list[dict]:
    """Accuracy of retrieving a `digits`-digit key at each depth in samples of `length`: one
    record per depth (length, depth, accuracy, samples), the same on every rank."""
    layout = get_layout(layout)
    if length < min_length(tokens, digits):
        raise ValueError(f"passkey length {length} is shorter than the "
                         f"{min_length(tokens, digits)} tokens a {digits}-digit key needs")
    positions = layout.positions(length, mesh.rank, mesh.size)
    hits = torch.zeros(2, len(depths), dtype=torch.float64, device=mesh.device)
    for d, depth in enumerate(depths):
        for trial in range(trials):
            index = d * trials + trial
            # the same key on every sp rank of this replica, another one on every replica
            key = random_key(_generator(seed, length * 1009 + index, mesh.dp_rank), digits)
            filler = source(length, index, positions).to(mesh.device)  # [B, N_local]
            ids, answer = passkey_shard(filler, positions, length, float(depth), key, tokens)
            targets = next_token_targets(ids, mesh, layout=layout)
            _, predictions = model(ids, targets, answer)  # the loss path: argmax ids
            ok = passkey_correct(predictions, targets, answer, mesh)
            hits[0, d] += ok.sum()
            hits[1, d] += ok.numel()
    right, seen = _sum_over(hits, mesh, sp=False).cpu()  # each sample was scored over sp
    return [{"type": "eval", "metric": "passkey", "length": length, "depth": float(depth),
             "accuracy": float(right[d] / seen[d]), "samples": int(seen[d]),
             "digits": digits} for d, depth in enumerate(depths)]


# --- wiring to a trainer ------------------------------------------------------------------------
def task_source(trainer, seed: int) -> Source:
    """Held-out samples of the trainer's own task: recall/random sequences from steps no
    training step uses, or for train.task = 'data' the corpus's held-out split, each rank
    reading only its own positions."""
    tc, mesh = trainer.tc, trainer.mesh

    def source(length: int, index: int, positions: torch.Tensor) -> torch.Tensor:
        if tc.task == "data":  # documents are not separated here: positions are the stream's
            return trainer.corpus.batch("heldout", 1, length, seed=seed, step=index,
                                        replica=mesh.dp_rank, positions=positions)
        step = HELD_OUT_STEP - index
        if tc.task == "recall":
            ids, _ = recall_batch(trainer.task, 1, length, seed=seed, step=step,
                                  replica=mesh.dp_rank)
        else:
            ids, _ = random_batch(tc.vocab_size, 1, length, seed=seed, step=step,
                                  replica=mesh.dp_rank)
        return ids[:, positions]  # [1, N_local]

    return source


def passkey_tokens(trainer, tokenizer: str = "") -> tuple[PasskeyTokens | None, str]:
    """(the ids passkeys are written with, '') or (None, why there is no passkey here):
    ASCII for byte data, the synthetic tasks' own ids, and for a .bin of tokenizer ids the
    tokenizer's (data.tokenizer, else `tokenizer` = eval.tokenizer; none named: skipped)."""
    tc = trainer.tc
    if tc.task != "data":
        return PasskeyTokens.for_vocab(tc.vocab_size), ""
    from .sources import BinTokens

    if not isinstance(trainer.corpus.source, BinTokens):
        return PasskeyTokens.for_vocab(256), ""  # text read as bytes
    named = trainer.corpus.cfg.tokenizer
    if named and tokenizer and os.path.realpath(named) != os.path.realpath(tokenizer):
        raise ValueError(f"eval.tokenizer = {tokenizer!r} but data.tokenizer = {named!r}: the "
                         f"passkey must use the tokenizer that made {trainer.corpus.name!r}")
    folder, key = (named, "data.tokenizer") if named else (tokenizer, "eval.tokenizer")
    if not folder:
        return None, (f"passkey skipped: data.path {trainer.corpus.name!r} holds tokenizer ids "
                      f"and neither data.tokenizer nor eval.tokenizer names the tokenizer")
    tokens = PasskeyTokens.for_tokenizer(load_tokenizer(folder, key), f"{key} {folder!r}")
    tokens.check_vocab(tc.vocab_size, f"{key} {folder!r}")
    return tokens, ""


@torch.no_grad()
def evaluate(trainer, cfg: EvalConfig, source: Source | None = None) -> list[dict]:
    """Every evaluation `cfg` asks for, on the trainer's model and mesh: a list of records
    (plus an "eval_skipped" record for a part that cannot run on this data).
    source: where samples come from (default `task_source(trainer, cfg.seed)`)."""
    tc, model = trainer.tc, trainer.engine
    source = source or task_source(trainer, cfg.seed)
    pieces = trainer.model_config.tokenwise_piece_tokens
    tokens, why = passkey_tokens(trainer, cfg.tokenizer) if cfg.passkey_lengths else (None, "")
    records = [{"type": "eval_skipped", "reason": why}] if why and cfg.passkey_lengths else []
    was_training = model.training
    model.eval()
    try:
        with trainer.autocast:
            for m in cfg.lengths:
                records += loss_by_position(model, trainer.mesh, trainer.layout, source,
                                            m * tc.seq_len, cfg.samples, cfg.buckets, pieces,
                                            base_length=tc.seq_len)
            for m in cfg.passkey_lengths if tokens is not None else ():
                need = min_length(tokens, cfg.passkey_digits)
                if m * tc.seq_len < need:  # a too-short cell, not a failed run at its end
                    records.append({"type": "eval_skipped", "reason": (
                        f"passkey at {m} x train.seq_len = {m * tc.seq_len} tokens skipped: "
                        f"a {cfg.passkey_digits}-digit key needs {need}")})
                    continue
                records += passkey_accuracy(model, trainer.mesh, trainer.layout, source, tokens,
                                            m * tc.seq_len, cfg.passkey_depths,
                                            cfg.passkey_trials, cfg.passkey_digits, cfg.seed)
    finally:
        model.train(was_training)
    return records
