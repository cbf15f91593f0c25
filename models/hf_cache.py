"""`ShardedCache`: a transformers `Cache` whose K/V stay sharded, so `model.generate()` runs on
a prompt sharded over ranks (see seqshard.models.hf for the usage).

Prefill: every rank runs its prompt shard through the registered sharded attention and keeps
the K/V of that shard, where they were computed (nothing is gathered). Decode: every rank runs
the same new token; its query meets all ranks' cache shards through
`seqshard.ops.attention.decode_attention` (one all-gather of (out, lse) per layer per token)
and its K/V are stored on one rank only, round-robin (decode step i on rank i % P), so the
shards stay balanced within one token. Sliding-window layers drop the keys no later query can
see, so they keep at most the window (plus the prompt shard's until the first step).

Positions are the cache's business, because generate() cannot know them: the prompt's are
the layout's global positions, decode continues at N, N + 1, ... (rotary embeddings must see
global positions). So the cache installs two hooks on the model (once per model; they do
nothing on calls without a ShardedCache): before a forward it checks the call, agrees it
with the other ranks (one 1 KiB all-gather), and sets `position_ids`; after a prefill it
replaces the logits by the global last token's, taken from the rank that holds it, so every
rank picks the same next token.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from seqshard.dist import Mesh, agree, all_gather, digest, get_layout

from .hf import CACHE_KWARG

_HOOKED = "_seqshard_cache_hooks"  # attribute marking a model whose hooks are installed


class ShardLayer(CacheLayerMixin):
    """One layer's cache shard on this rank: keys/values [B, Hkv, S_local, D] (views of a
    buffer that grows by doubling, so appending a token is amortised O(1)) and the global
    position of every cached key, int64 [S_local]."""

    is_sliding = False

    def __init__(self, owner: "ShardedCache"):
        super().__init__()
        self.owner = owner
        self._k = self._v = None  # [B, Hkv, capacity, D]
        self.positions = torch.empty(0, dtype=torch.int64)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        shape = (*key_states.shape[:2], 0, key_states.shape[-1])
        self._k = key_states.new_empty(shape)
        self._v = value_states.new_empty(shape)
        self.positions = self.positions.to(self.device)
        self.is_initialized = True

    @property
    def keys(self):
        return None if self._k is None else self._k[:, :, :self.length]

    @keys.setter
    def keys(self, value):  # the base class assigns None in __init__
        if value is not None:
            raise AttributeError("ShardLayer.keys is read-only: use update()")

    @property
    def values(self):
        return None if self._v is None else self._v[:, :, :self.length]

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("ShardLayer.values is read-only: use update()")

    def _append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store k, v [B, Hkv, n, D] at global `positions` [n]."""
        need = self.length + k.shape[2]
        if need > self._k.shape[2]:
            # doubling, but never past what this rank can ever hold (max_tokens bounds it):
            # a prompt shard near the maximum grows once, by the decode share only
            self._resize(max(need, min(2 * self._k.shape[2], self.owner.rank_capacity)))
        self._k[:, :, self.length:need] = k
        self._v[:, :, self.length:need] = v
        self.positions = torch.cat([self.positions, positions.to(self.positions.device)])
        self.length = need

    def _resize(self, capacity: int) -> None:
        """Move the cached keys/values into buffers of `capacity` keys."""
        for name in ("_k", "_v"):
            old = getattr(self, name)
            buf = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            buf[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, buf)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Keep the new K/V this rank owns; return this rank's (keys, values) to attend over:
        in prefill the prompt shard itself, in decode the whole cache shard."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self.owner
        mine = cache.step_owned  # bool [T]: which of this step's tokens this rank stores
        if bool(mine.all()):
            self._append(key_states, value_states, cache.step_positions)
        elif bool(mine.any()):
            idx = mine.nonzero().flatten().to(key_states.device)
            self._append(key_states.index_select(2, idx), value_states.index_select(2, idx),
                         cache.step_positions[mine])
        if cache.prefilling:
            return key_states, value_states
        return self.keys, self.values

    def drop_before(self, first: int) -> None:
        """Forget keys at positions < first (a sliding window no later query reaches)."""
        keep = self.positions >= first
        if self.length == 0 or bool(keep.all()):
            return
        idx = keep.nonzero().flatten()
        n = idx.numel()
        self._k[:, :, :n] = self._k.index_select(2, idx.to(self._k.device))
        self._v[:, :, :n] = self._v.index_select(2, idx.to(self._v.device))
        self.positions, self.length = self.positions[idx], n
        if self._k.shape[2] > 2 * n + 64:  # a window layer after the prompt: free the rest
            self._resize(2 * n + 64)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # no mask is built for seqshard attention

    def get_seq_length(self) -> int:
        return self.owner.seen  # global: generate() reads it as the tokens processed so far

    def get_max_length(self) -> int:
        return self.owner.max_tokens

    def reset(self) -> None:
        self.length = 0
        self.positions = self.positions[:0]

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("ShardedCache cannot crop (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx) -> None:
        raise ValueError("ShardedCache does not support beam search; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("ShardedCache does not support num_return_sequences > 1 or beams")

    def batch_select_indices(self, indices) -> None:
        raise ValueError("ShardedCache does not support selecting batch rows")


class ShardedCache(Cache):
    """K/V cache of a prompt sharded over `mesh` by `layout`, for `model.generate()`.

    max_tokens: the most tokens (prompt + generated) one sequence may reach; a longer prompt,
    or a decode step past it, raises ValueError on every rank. Every rank builds its own
    ShardedCache with the same arguments and passes it as `generate(..., cache=cache)`.
    One cache serves one generate() call (build a new one per prompt).
    """

    def __init__(self, model, mesh: Mesh | None, *, layout="contiguous", max_tokens: int):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be a positive integer")
        self.mesh = mesh or Mesh.single()
        self.layout = get_layout(layout)
        self.max_tokens = max_tokens
        self.seen = 0  # global tokens processed (prompt, then decoded ones)
        self.prompt_len = 0
        self.prefilling = False
        self.step_positions = torch.empty(0, dtype=torch.int64)  # [T] this forward's tokens
        self.step_owned = torch.empty(0, dtype=torch.bool)  # [T] stored on this rank
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[ShardLayer(self) for _ in range(n_layers)])
        install_hooks(model)

    def begin(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Check and agree one forward's tokens [B, T] over the ranks; returns their global
        positions int64 [T] and sets which of them this rank stores."""
        mesh = self.mesh
        b, t = input_ids.shape
        prefill = self.seen == 0
        problem = None
        if prefill:
            n = t * mesh.size
            if n > self.max_tokens:
                problem = (f"the prompt has {n} tokens ({t} per rank x {mesh.size}), more than "
                           f"the cache's max_tokens={self.max_tokens}")
        elif self.seen + t > self.max_tokens:
            problem = (f"the cache is out of room: position {self.seen + t - 1} is past "
                       f"max_tokens={self.max_tokens} (prompt {self.prompt_len} + generated "
                       f"{self.seen - self.prompt_len}); build the ShardedCache with a larger "
                       f"max_tokens or generate fewer tokens")
        facts = {"phase": "prefill" if prefill else "decode", "batch": b, "tokens": t,
                 "seen": self.seen, "max_tokens": self.max_tokens, "layout": self.layout.name}
        if not prefill:  # every rank must run the same new tokens
            facts["input_ids"] = digest(input_ids.tolist())
        agree(facts, mesh.group, what="ShardedCache", problem=problem, timeout=mesh.timeout)
        if prefill:
            self.prompt_len = t * mesh.size
            self.layout.check(self.prompt_len, mesh.size)
            positions = self.layout.positions(self.prompt_len, mesh.rank, mesh.size)
            owned = torch.ones(t, dtype=torch.bool)
        else:
            positions = torch.arange(self.seen, self.seen + t)
            owned = (positions - self.prompt_len) % mesh.size == mesh.rank  # round-robin
        self.prefilling = prefill
        self.step_positions, self.step_owned = positions, owned
        return positions.to(input_ids.device)

    @property
    def rank_capacity(self) -> int:
        """The most keys one layer's shard on this rank can hold: its prompt shard and its
        round-robin share of the max_tokens - N tokens decoding may add."""
        p = self.mesh.size
        share = len(range(self.mesh.rank, self.max_tokens - self.prompt_len, p))
        return self.prompt_len // p + share

    def end(self) -> None:
        """The forward finished: its tokens now count as seen."""
        self.seen += len(self.step_positions) * (self.mesh.size if self.prefilling else 1)

    def last_token_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The prompt's global last token's logits [B, 1, V] on every rank, from the rank that
        holds it (its last local row, in every layout)."""
        mesh = self.mesh
        if mesh.size == 1:
            return logits[:, -1:]
        owner = next(r for r in range(mesh.size)
                     if int(self.layout.positions(self.prompt_len, r, mesh.size)[-1])
                     == self.prompt_len - 1)
        b = logits.shape[0]
        rows = all_gather(logits[:, -1:].contiguous(), 0, mesh.group, timeout=mesh.timeout)
        return rows[owner * b:(owner + 1) * b]  # [B, 1, V]

    def window_done(self, layer_idx: int, window: int) -> None:
        """After a layer attended: drop the keys no later query of a window-W layer reads
        (the next query is at position seen + T, and reads keys > it - W)."""
        nxt = self.seen + len(self.step_positions) * (self.mesh.size if self.prefilling else 1)
        self.layers[layer_idx].drop_before(nxt - window + 1)


def _before_forward(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, ShardedCache):
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        raise ValueError("ShardedCache needs input_ids (inputs_embeds are not supported)")
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not bool(mask.bool().all()):
            raise ValueError("ShardedCache does not support padding: pass an attention_mask of "
                             "all ones, or none")
        kwargs["attention_mask"] = None  # causality comes from the positions
    positions = cache.begin(ids)  # [T]
    kwargs["position_ids"] = positions.unsqueeze(0).expand(ids.shape[0], -1)
    kwargs[CACHE_KWARG] = cache
    return args, kwargs


def _after_forward(module, args, kwargs, output):
    cache = kwargs.get(CACHE_KWARG)
    if not isinstance(cache, ShardedCache):
        return None
    if cache.prefilling and getattr(output, "logits", None) is not None:
        output.logits = cache.last_token_logits(output.logits)
    cache.end()
    return output


def install_hooks(model) -> None:
    """Install the ShardedCache hooks on `model` (once; a no-op when already there)."""
    if getattr(model, _HOOKED, False):
        return
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, with_kwargs=True)
    setattr(model, _HOOKED, True)
