"""`build_model(kind, config, mesh)`: the one entry point the launcher and Trainer use."""

from __future__ import annotations

from seqshard.dist import Mesh

from .config import LMConfig, make_config
from .lm import CausalLM


def model_class(kind: str) -> type[CausalLM]:
    # imported here so a kind whose op is unavailable does not break the others
    if kind == "transformer":
        from .transformer import TransformerLM
        return TransformerLM
    if kind == "deltanet":
        from .deltanet import DeltaNetLM
        return DeltaNetLM
    if kind == "fit":
        from .fit import FITLM
        return FITLM
    raise ValueError(f"model kind={kind!r}: expected 'transformer', 'deltanet' or 'fit'")


def build_model(kind: str, config: dict | LMConfig, mesh: Mesh | None = None) -> CausalLM:
    """A language model of `kind` ('transformer' | 'deltanet' | 'fit') on `mesh`.

    config: a dict of the kind's config dataclass fields (or the dataclass). The model's
    forward maps input_ids [B, N_local] -> logits [B, N_local, vocab_size].

    >>> model = build_model("transformer", {"vocab_size": 32, "dim": 64, "num_heads": 2})
    >>> model(torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 32])
    """
    return model_class(kind)(make_config(kind, config), mesh)
