"""Synthetic long-context data the tests and benchmarks make themselves.

Multi-query associative recall: a sequence opens with `pairs` (key, value) tokens, then filler,
then `queries` look-ups at the very end: a key from the opening followed by its value. The model
must predict the value after each query key, i.e. carry information from the first shard to the
last one. Every sequence draws its own random key -> value map, so nothing can be memorised.

Token ids: keys [0, K), values [K, 2K), filler [2K, vocab) with K = vocab // 4.
Batches depend only on (seed, step, replica): every rank of a replica builds the same full batch
and keeps its shard, so resuming at step s reproduces the data exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RecallTask:
    """vocab_size: ids used. pairs: (key, value) pairs written. queries: look-ups at the end."""

    vocab_size: int = 64
    pairs: int = 8
    queries: int = 8

    def __post_init__(self) -> None:
        k = self.vocab_size // 4
        if self.pairs > k or k < 1:
            raise ValueError(f"recall pairs={self.pairs} need vocab_size >= 4 * pairs, got "
                             f"vocab_size={self.vocab_size}")
        if self.queries < 1:
            raise ValueError(f"recall queries={self.queries} must be >= 1")

    @property
    def num_keys(self) -> int:
        return self.vocab_size // 4

    def min_len(self) -> int:
        return 2 * self.pairs + 2 * self.queries

    def chance(self) -> float:
        """Accuracy of guessing a value among the pairs written."""
        return 1.0 / self.pairs


def _generator(seed: int, step: int, replica: int) -> torch.Generator:
    # a fixed mixing of the three integers: distinct streams, no Python hash randomisation
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) * 65_537 + replica)
    return g


def recall_batch(task: RecallTask, batch_size: int, seq_len: int, *, seed: int, step: int,
                 replica: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, N] int64, answer_mask [B, N] bool) for one global batch.

    answer_mask is True at each query key: the position whose next token is the value to
    recall (use it as the loss mask and for accuracy).

    >>> ids, mask = recall_batch(RecallTask(64, 4, 2), 1, 32, seed=0, step=0)
    >>> ids.shape, int(mask.sum())
    (torch.Size([1, 32]), 2)
    """
    if seq_len < task.min_len():
        raise ValueError(f"seq_len={seq_len} is shorter than the recall layout needs "
                         f"({task.min_len()} = 2 * pairs + 2 * queries)")
    g = _generator(seed, step, replica)
    k = task.num_keys
    ids = torch.randint(2 * k, task.vocab_size, (batch_size, seq_len), generator=g)  # filler
    mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    q0 = seq_len - 2 * task.queries
    for b in range(batch_size):
        keys = torch.randperm(k, generator=g)[: task.pairs]  # [pairs] distinct keys
        values = k + torch.randint(0, k, (task.pairs,), generator=g)  # [pairs]
        ids[b, 0: 2 * task.pairs: 2] = keys
        ids[b, 1: 2 * task.pairs: 2] = values
        asked = torch.randint(0, task.pairs, (task.queries,), generator=g)
        ids[b, q0::2] = keys[asked]
        ids[b, q0 + 1::2] = values[asked]
        mask[b, q0::2] = True
    return ids, mask


def random_batch(vocab_size: int, batch_size: int, seq_len: int, *, seed: int, step: int,
                 replica: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random ids [B, N] and an all-True mask (throughput runs, exactness checks)."""
    g = _generator(seed, step, replica)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    return ids, torch.ones(batch_size, seq_len, dtype=torch.bool)
