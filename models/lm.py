"""The shell every language model shares: embedding -> blocks -> RMSNorm -> head.

A subclass builds `self.blocks` (each called as block(x, ctx) with x [B, N_local, C] and the
`ShardContext`) and may override `mix` when its mixer is one op over the whole stack (FIT).
The model holds its Mesh; `model(input_ids_local)` returns logits [B, N_local, V] for the
local shard. Parameter gradients after backward are this rank's share: sum them over the
mesh's sp group (the Trainer / DeepSpeed does) to get the exact gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqshard.dist import Mesh
from seqshard.dist.agree import agree, digest

from .config import LMConfig
from .layers import ShardContext, RMSNorm
from .tokenwise import lm_loss_in_pieces


def checkpoint_each(modules) -> None:
    """Recompute each module's forward in the backward pass (activation checkpointing).

    Overrides the instance's `forward` rather than wrapping the module, so parameter names
    and state_dicts stay the same with and without checkpointing. Collectives inside a block
    are re-run in the same order on every rank during recomputation, so this is safe sharded.
    """
    for module in modules:
        inner = module.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        module.forward = forward


def init_normal(modules, std: float) -> None:
    """Normal(0, std) weights and zero biases for the Linear and Embedding layers given."""
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                nn.init.normal_(sub.weight, std=std)
                if getattr(sub, "bias", None) is not None:
                    nn.init.zeros_(sub.bias)


class CausalLM(nn.Module):
    """Base class; see the module docstring. Subclasses call `finish()` after their blocks."""

    supported_layouts: tuple[str, ...] = ("contiguous", "zigzag", "striped")
    packs_documents: bool = False
    """Whether every mixer honours document boundaries (`doc_lens`): attention-only models."""

    def __init__(self, config: LMConfig, mesh: Mesh | None = None):
        super().__init__()
        if config.layout not in self.supported_layouts:
            raise ValueError(f"{type(self).__name__} supports layouts {self.supported_layouts}, "
                             f"got layout={config.layout!r}")
        self.config = config
        self.mesh = mesh or Mesh.single()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.norm = RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.blocks = nn.ModuleList()

    def finish(self, owned: list[nn.Module]) -> None:
        """Initialise the layers this package owns and set up checkpointing and tying."""
        init_normal([self.embed, self.head, *owned], self.config.init_std)
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight
        if self.config.activation_checkpointing:
            checkpoint_each(self.checkpoint_units())

    def checkpoint_units(self):
        """The modules recomputed one by one under activation checkpointing."""
        return self.blocks

    def context(self, input_ids: torch.Tensor, doc_lens=None) -> ShardContext:
        return ShardContext.make(input_ids.shape[1], self.mesh, self.config.layout,
                                 input_ids.device, doc_lens)

    def mix(self, x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, ctx)
        return x

    def embed_and_mix(self, input_ids: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        """input_ids [B, N_local] -> the blocks' output [B, N_local, C]; a subclass may
        override it to recompute the embedding in backward with its first block."""
        return self.mix(self.embed(input_ids), ctx)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, doc_lens=None):
        """input_ids [B, N_local] (this rank's shard) -> logits [B, N_local, vocab_size].

        doc_lens: lengths of packed documents over the global sequence (sum == N, the same
        list on every rank and for every row): no token attends across a document boundary.
        Only models whose every mixer is attention take it (`packs_documents`).

        With targets [B, N_local] (from `next_token_targets`; loss_mask optional) it returns
        (loss, predictions [B, N_local]) instead, equal to `sharded_lm_loss` of the logits and
        their argmax, but with the head and loss run in pieces (`lm_loss_in_pieces`) so the
        shard's logits never exist at once. Both go through forward so that wrappers such as
        DeepSpeed's engine (ZeRO-3 parameter gathering) see the call.
        """
        problem = None
        if input_ids.dim() != 2:
            problem = f"input_ids must be [B, N_local], got {tuple(input_ids.shape)}"
        elif doc_lens is not None and not self.packs_documents:
            problem = (f"{type(self).__name__} does not take doc_lens (packed documents): its "
                       f"recurrent or grouped mixers carry context across document boundaries")
        if self.mesh.size > 1:
            # once per forward, so that the layers below (whose shapes all follow from the
            # token shard and the config) can skip their own per-call agreement gathers
            agree({"input_ids": tuple(input_ids.shape), "targets": targets is not None,
                   "loss_mask": loss_mask is not None,
                   "doc_lens": None if doc_lens is None else digest(
                       torch.as_tensor(doc_lens).flatten().tolist())}, self.mesh.group,
                  what=type(self).__name__, problem=problem, timeout=self.mesh.timeout)
        elif problem is not None:
            raise ValueError(problem)
        ctx = self.context(input_ids, doc_lens)
        x = self.embed_and_mix(input_ids, ctx)  # [B, N_local, C]
        if targets is None:
            return self.head(self.norm(x))  # [B, N_local, V]
        pieces = {"loss_mask": loss_mask, "piece_tokens": self.config.tokenwise_piece_tokens}
        if torch.is_grad_enabled():
            # the final norm runs inside the loss pieces: its output and saved tensors (2 KB a
            # token at C = 256 in fp32) never exist for the whole shard, nor its backward's
            return lm_loss_in_pieces(x, self.head, targets, self.mesh, norm=self.norm, **pieces)
        # without autograd nothing is saved; one call over the shard, so a forward hook on the
        # norm sees the whole hidden state (evaluate.token_losses)
        return lm_loss_in_pieces(self.norm(x), self.head, targets, self.mesh, **pieces)
