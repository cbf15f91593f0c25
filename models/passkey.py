"""Passkey retrieval samples built in the data's own token space, one shard at a time.

A sample of `length` tokens is filler text with two overlays:

    filler ... [intro + key digits] ... filler ... [question + key digits]
               ^ starts at depth * (length - needle - tail)    ^ the last `tail` tokens

The model reads the whole sample; it is scored teacher-forced on the final key digits: the
positions whose next token is a key digit (the answer mask) must all predict that digit.
Nothing is downloaded: for a byte vocabulary (>= 256 ids) the phrases and digits are ASCII;
for a small synthetic vocabulary, the ten digits are ids 0..9 and the phrases are fixed runs
of the top ids (a model trained on those tasks has never seen them: it scores near chance).
For a .bin a tokenizer made (`for_tokenizer`), the phrases are the tokenizer's encoding of the
same English and each digit is the tokenizer's own single token for it: the key is written
digit by digit, so a k-digit key is exactly k tokens wherever it stands, and the sample is
exactly `length` tokens (the overlays replace filler ids one for one; text is never
re-tokenized). The score is on the key's digit ids.

Every rank builds only its own shard: the overlays are written at the global positions this
rank holds (`positions`), so the filler can come straight from a sharded read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INTRO = b"The pass key is "
REMEMBER = b". Remember it. "
QUESTION = b" What is the pass key? The pass key is "


@dataclass(frozen=True)
class PasskeyTokens:
    """The token ids a passkey sample is written with."""

    digits: tuple[int, ...]
    """Ids of the digits 0..9, in order."""
    intro: tuple[int, ...]
    """Written before the hidden key."""
    outro: tuple[int, ...]
    """Written after the hidden key."""
    question: tuple[int, ...]
    """Written before the key at the end (the key there is what is scored)."""

    @classmethod
    def for_vocab(cls, vocab_size: int) -> "PasskeyTokens":
        """ASCII for a byte vocabulary, else digits 0..9 and phrases of the top ids."""
        if vocab_size >= 256:
            return cls(tuple(b"0123456789"), tuple(INTRO), tuple(REMEMBER), tuple(QUESTION))
        if vocab_size < 13:
            raise ValueError(f"vocab_size = {vocab_size}: a passkey needs at least 13 ids "
                             f"(10 digits and 3 markers)")
        top = (vocab_size - 1, vocab_size - 2, vocab_size - 3)
        return cls(tuple(range(10)), top, top[::-1], top[1:] + top[:1])


    @classmethod
    def for_tokenizer(cls, tokenizer, name: str = "the tokenizer") -> "PasskeyTokens":
        """The phrases as `tokenizer` encodes them (no special tokens) and, per digit, the
        tokenizer's single token for it; ValueError naming the digit when it has none."""
        def encode(text: bytes) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text.decode(), add_special_tokens=False))

        digits = tuple(_digit_id(tokenizer, str(d), name) for d in range(10))
        return cls(digits, encode(INTRO), encode(REMEMBER), encode(QUESTION))

    def check_vocab(self, vocab_size: int, name: str) -> None:
        """ValueError unless every id is below the model's vocab_size."""
        top = max(self.digits + self.intro + self.outro + self.question)
        if top >= vocab_size:
            raise ValueError(f"passkey: {name} writes the passkey with id {top} >= the model's "
                             f"vocab_size = {vocab_size}")


def _digit_id(tokenizer, digit: str, name: str) -> int:
    """The id of the one token that is `digit`: its encoding when that is one token, else the
    vocabulary's entry (a tokenizer that prefixes a word marker to a lone digit)."""
    ids = tokenizer.encode(digit, add_special_tokens=False)
    found = ids[0] if len(ids) == 1 else tokenizer.convert_tokens_to_ids(digit)
    unknown = found is None or found == tokenizer.unk_token_id
    if unknown or tokenizer.decode([found]).strip() != digit:
        raise ValueError(f"passkey: {name} has no single token for the digit {digit!r} (it "
                         f"encodes as {ids}): the key is written digit by digit")
    return int(found)


def needle_and_tail(tokens: PasskeyTokens, key: list[int]) -> tuple[list[int], list[int]]:
    """(the hidden needle, the question + key at the end) as id lists; key: digit values."""
    digits = [tokens.digits[d] for d in key]
    return list(tokens.intro) + digits + list(tokens.outro), list(tokens.question) + digits


def min_length(tokens: PasskeyTokens, key_digits: int) -> int:
    """The shortest sample that holds the needle and the tail apart."""
    needle, tail = needle_and_tail(tokens, [0] * key_digits)
    return len(needle) + len(tail) + 1


def needle_start(length: int, depth: float, needle: int, tail: int) -> int:
    """Global position of the needle's first token at `depth` (0: the start, 1: just before
    the tail)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth = {depth}: must be within [0, 1]")
    room = length - needle - tail
    if room < 0:
        raise ValueError(f"passkey length = {length} is shorter than the needle ({needle}) "
                         f"plus the question and answer ({tail}) tokens")
    return int(round(depth * room))


def _overlay(ids: torch.Tensor, positions: torch.Tensor, start: int, values: list[int]) -> None:
    """Write `values` at global positions start.. into the local ids [B, N_local] in place."""
    offset = positions - start  # [N_local]
    inside = (offset >= 0) & (offset < len(values))
    if inside.any():
        table = torch.tensor(values, dtype=ids.dtype, device=ids.device)
        ids[:, inside] = table[offset[inside]]


def passkey_shard(filler: torch.Tensor, positions: torch.Tensor, length: int, depth: float,
                  key: list[int], tokens: PasskeyTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, N_local], answer_mask [B, N_local] bool) of this rank's shard of a sample.

    filler [B, N_local]: this rank's filler tokens; positions [N_local]: their global
    positions (`Layout.positions`). answer_mask is True where the next token is one of the
    final key digits: the positions scored, teacher-forced.

    >>> t = PasskeyTokens.for_vocab(256)
    >>> ids, mask = passkey_shard(torch.full((1, 80), ord("x")), torch.arange(80), 80, 0.0,
    ...                           [4, 2], t)
    >>> bytes(ids[0].tolist())[:22], bytes(ids[0].tolist())[-5:], mask.nonzero()[:, 1].tolist()
    (b'The pass key is 42. Re', b'is 42', [77, 78])
    """
    if filler.dim() != 2 or positions.shape != filler.shape[1:]:
        raise ValueError(f"filler {tuple(filler.shape)} and positions {tuple(positions.shape)}"
                         f" must be [B, N_local] and [N_local]")
    needle, tail = needle_and_tail(tokens, key)
    start = needle_start(length, depth, len(needle), len(tail))
    ids = filler.clone()
    positions = positions.to(filler.device)
    _overlay(ids, positions, start, needle)
    _overlay(ids, positions, length - len(tail), tail)
    # position p predicts token p + 1: the answer digits sit at length - k .. length - 1
    first = length - len(key) - 1
    scored = (positions >= first) & (positions < length - 1)  # [N_local]
    return ids, scored.unsqueeze(0).expand_as(ids).clone()


def random_key(generator: torch.Generator, digits: int) -> list[int]:
    """`digits` decimal digit values, the first one not 0 (a number as written)."""
    first = int(torch.randint(1, 10, (1,), generator=generator))
    return [first] + torch.randint(0, 10, (digits - 1,), generator=generator).tolist()
