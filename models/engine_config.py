"""The DeepSpeed engine's config dict, from a TrainConfig."""

from __future__ import annotations

from .config import TrainConfig


def deepspeed_config(tc: TrainConfig) -> dict:
    """What `deepspeed.initialize(config=...)` gets: micro-batch, clipping and the ZeRO stage;
    the optimizer and LR schedule are ours (models/optim.py), passed in as objects."""
    return {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.zero_stage},
        "zero_allow_untested_optimizer": True,  # our torch AdamW, wrapped by ZeRO
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
