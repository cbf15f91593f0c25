"""seqshard.models: language models built from the sharded ops, the sharded LM loss, the
synthetic recall data, real-text corpora (`open_corpus`) and the DeepSpeed Trainer.

    from seqshard.models import build_model, sharded_lm_loss, Trainer, TrainConfig
    model = build_model("transformer", {"dim": 128, "num_heads": 4}, mesh)
    logits_local = model(input_ids_local)            # [B, N_local] -> [B, N_local, vocab]
    new_ids = generate(model, input_ids_local, mesh, max_new_tokens=8)   # [B, 8], every rank
    loss = sharded_lm_loss(logits_local, input_ids_local, mesh, layout="contiguous")

Model classes import their op lazily through `build_model`, so the Transformer works even where
an op package is unavailable. The Hugging Face adapter lives in `seqshard.models.hf`.
"""

from .build import build_model, model_class
from .config import (
    DeltaNetConfig,
    FITConfig,
    LMConfig,
    TrainConfig,
    TransformerConfig,
    make_config,
    make_train_config,
    merged_model_config,
)
from .corpus import Corpus, DataConfig, open_corpus
from .data import RecallTask, random_batch, recall_batch
from .generate import decode_step, generate, prefill
from .loss import next_token_targets, sharded_accuracy, sharded_lm_loss
from .tokenwise import in_pieces, lm_loss_in_pieces
from .trainer import Trainer

__all__ = [
    "Corpus", "DataConfig", "DeltaNetConfig", "FITConfig", "LMConfig", "RecallTask",
    "TrainConfig", "Trainer", "TransformerConfig", "build_model", "decode_step", "generate",
    "in_pieces", "lm_loss_in_pieces", "make_config", "make_train_config",
    "merged_model_config", "model_class", "next_token_targets", "open_corpus", "prefill",
    "random_batch", "recall_batch", "sharded_accuracy", "sharded_lm_loss",
]
