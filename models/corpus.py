"""Training and evaluation tokens from real text: the `[data]` section (train.task = 'data').

Sources (models/sources.py): a flat .bin of token ids (uint16 / uint32, memory-mapped), a text
file or a folder of text files read as UTF-8 bytes (vocabulary 256, each file followed by a
separator byte 0), or by default the source files of Python's own standard library, read the
same way (tens of MB of real text on every machine, no download).

Splits: the stream's last `heldout_fraction` is 'heldout', the rest 'train'; every sequence
lies wholly inside one split, so training never sees a held-out token.

Sampling: row b of the batch at (seed, step, replica) starts at a uniform random offset of its
split, drawn from a generator seeded by those three integers only, so a resumed run sees
exactly the batches it would have seen. `batch(..., positions=)` reads only the given global
positions of each row: a rank passes its layout's positions and reads its shard straight
from the source; nothing reads the whole sequence.

Packed documents: with `packed = true` the separator `eos_id` ends a document (the separator
belongs to the document it ends) and `doc_lens` gives each row's document lengths over the
global sequence. Finding them scans the row's ids in windows, keeping only the separators'
positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data import _generator
from .fill import fill
from .sources import BIN_DTYPES, SEPARATOR, WINDOW, BinTokens, open_source
from .tokenizer import load_tokenizer

SPLITS = ("train", "heldout")


@dataclass
class DataConfig:
    """Where tokens come from when train.task = 'data'."""

    path: str = ""
    """A .bin file of token ids, a text file or a folder of text files; empty: the source
    files of Python's own standard library, read as bytes."""
    dtype: str = "uint16"
    """Id type of a .bin file: 'uint16' (nanoGPT's) or 'uint32' (vocabularies over 65536)."""
    tokenizer: str = ""
    """A local folder holding a Hugging Face tokenizer (never downloaded) that made the .bin:
    its vocabulary size is checked against the ids. Text is tokenized once, beforehand, by
    `seqshard data prepare IN OUT.bin --tokenizer DIR`."""
    heldout_fraction: float = 0.01
    """The last this fraction of the stream is held out: never sampled for training."""
    packed: bool = False
    """Separators split each sequence into documents that do not attend to each other."""
    eos_id: int = SEPARATOR
    """The document separator id: 0 for byte sources (written after every file, so a folder's
    files are its documents; 10 would make every line one); the tokenizer's EOS for a .bin."""

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction = {self.heldout_fraction}: must be in (0, 1)")
        if self.eos_id < 0:
            raise ValueError(f"data.eos_id = {self.eos_id}: must be >= 0")
        if self.dtype not in BIN_DTYPES:
            raise ValueError(f"data.dtype = {self.dtype!r}: expected one of {sorted(BIN_DTYPES)}")


class Corpus:
    """One token stream split into 'train' and 'heldout'; see the module docstring."""

    def __init__(self, cfg: DataConfig, source, vocab_size: int):
        self.cfg, self.source, self.vocab_size = cfg, source, vocab_size
        held = int(source.size * cfg.heldout_fraction)
        self._bounds = {"train": (0, source.size - held), "heldout": (source.size - held, held)}

    @property
    def name(self) -> str:
        return self.source.name

    def num_tokens(self, split: str) -> int:
        return self._split(split)[1]

    def _split(self, split: str) -> tuple[int, int]:
        if split not in SPLITS:
            raise ValueError(f"split = {split!r}: expected one of {SPLITS}")
        return self._bounds[split]

    def check_length(self, seq_len: int) -> None:
        """ValueError naming the source and the numbers unless each split holds a sequence."""
        if self.source.size < seq_len:
            raise ValueError(f"data.path {self.name!r} holds {self.source.size} tokens, shorter "
                             f"than one sequence of train.seq_len = {seq_len}")
        for split in SPLITS:
            if self.num_tokens(split) < seq_len:
                raise ValueError(
                    f"data.path {self.name!r}: its {split} split (data.heldout_fraction = "
                    f"{self.cfg.heldout_fraction} of {self.source.size} tokens) holds "
                    f"{self.num_tokens(split)} tokens, fewer than one sequence of "
                    f"train.seq_len = {seq_len}")

    def read(self, split: str, start: int, length: int) -> torch.Tensor:
        """Raw tokens [length] int64 from offset `start` of the split (e.g. filler text)."""
        base, size = self._split(split)
        if start < 0 or length < 0 or start + length > size:
            raise ValueError(f"read({split!r}, start={start}, length={length}) is outside the "
                             f"{size} tokens of the {split} split")
        return torch.from_numpy(self.source.span(base + start, length))

    def starts(self, split: str, batch_size: int, seq_len: int, *, seed: int, step: int,
               replica: int = 0) -> list[int]:
        """Stream offsets of the batch's rows: a function of (seed, step, replica) only."""
        base, size = self._split(split)
        if size < seq_len:
            raise ValueError(f"the {split} split of {self.name!r} holds {size} tokens, fewer "
                             f"than one sequence of {seq_len}")
        # the held-out stream gets its own generator stream, so train and eval never share draws
        g = _generator(seed, step, replica * 2 + (split == "heldout"))
        offsets = torch.randint(0, size - seq_len + 1, (batch_size,), generator=g)
        return [base + int(o) for o in offsets]

    def batch(self, split: str, batch_size: int, seq_len: int, *, seed: int, step: int,
              replica: int = 0, positions=None) -> torch.Tensor:
        """Ids int64 [B, len(positions) or seq_len]: the global positions `positions` (a
        rank's layout positions, e.g. `layout.positions(N, rank, P)`; None: all) of each row."""
        rows = self.starts(split, batch_size, seq_len, seed=seed, step=step, replica=replica)
        if positions is None:
            return torch.stack([torch.from_numpy(self.source.span(s, seq_len)) for s in rows])
        pos = torch.as_tensor(positions, dtype=torch.int64).numpy()
        if pos.ndim != 1 or (len(pos) and (pos.min() < 0 or pos.max() >= seq_len)):
            raise ValueError(f"positions must be 1-d global positions in [0, {seq_len}), got "
                             f"shape {tuple(pos.shape)}")
        return torch.stack([torch.from_numpy(self.source.take(s + pos)) for s in rows])

    def doc_lens(self, split: str, batch_size: int, seq_len: int, *, seed: int, step: int,
                 replica: int = 0) -> list[list[int]]:
        """Each row's document lengths over the global sequence (sum == seq_len): a document
        ends after each `eos_id`. Scans the rows in windows; keeps only separator positions."""
        eos = self.cfg.eos_id
        out = []
        for s in self.starts(split, batch_size, seq_len, seed=seed, step=step, replica=replica):
            ends = [0]
            for w in range(0, seq_len, WINDOW):
                ids = self.source.span(s + w, min(WINDOW, seq_len - w))
                ends.extend((w + np.flatnonzero(ids == eos) + 1).tolist())
            if ends[-1] != seq_len:
                ends.append(seq_len)
            out.append(np.diff(ends).tolist())
        return out

    def fingerprint(self) -> dict:
        """What a checkpoint records of the data (resuming under other data is refused)."""
        return {**asdict(self.cfg), "source": self.name, "tokens": self.source.size}


def open_corpus(cfg: DataConfig | dict, vocab_size: int, *, seq_len: int = 0,
                batch_size: int = 1) -> Corpus:
    """The checked corpus of a [data] section for a model of `vocab_size` ids.

    ValueError naming the file and the number for: a missing file, ids >= vocab_size (a .bin
    is scanned once, in chunks), a byte source with vocab_size < 256, and, with seq_len, a
    split shorter than one sequence; packed with batch_size > 1 (one doc_lens per batch)."""
    cfg = fill(DataConfig, cfg, "data")
    source = open_source(cfg.path, cfg.dtype)
    if isinstance(source, BinTokens):
        if cfg.tokenizer:
            vocab_size = min(vocab_size, len(load_tokenizer(cfg.tokenizer, "data.tokenizer")))
        top, where = source.max_id()
        if top >= vocab_size:
            raise ValueError(f"data.path {cfg.path!r} holds token id {top} (at position "
                             f"{where}) >= vocab_size = {vocab_size}")
    else:
        if cfg.tokenizer:
            raise ValueError(f"data.tokenizer = {cfg.tokenizer!r} with text data.path "
                             f"{source.name!r}: tokenize it once with `seqshard data prepare "
                             f"{cfg.path or 'IN'} OUT.bin --tokenizer {cfg.tokenizer}` and set "
                             f"data.path to OUT.bin")
        if vocab_size < 256:
            raise ValueError(f"data.path {source.name!r} is read as bytes (ids 0..255): needs "
                             f"vocab_size >= 256, got train.vocab_size = {vocab_size}")
        vocab_size = 256
    if cfg.packed and cfg.eos_id >= vocab_size:
        raise ValueError(f"data.eos_id = {cfg.eos_id} is not an id of {source.name!r} "
                         f"(vocab_size = {vocab_size}): no document would ever end")
    if cfg.packed and batch_size > 1:
        raise ValueError(f"data.packed = true needs train.batch_size = 1, got {batch_size}: the "
                         f"model takes one doc_lens list for the whole batch")
    corpus = Corpus(cfg, source, vocab_size)
    if seq_len:
        corpus.check_length(seq_len)
    return corpus
