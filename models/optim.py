"""The optimizer and its learning-rate schedule, from a TrainConfig."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_lambda(tc: TrainConfig):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at tc.steps (a LambdaLR factor)."""

    def factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        span = max(1, tc.steps - tc.warmup_steps)
        progress = min(1.0, (step - tc.warmup_steps) / span)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, tc: TrainConfig):
    """AdamW or SGD (weight decay on matrices only) and its LambdaLR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if tc.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=tc.lr)
    else:
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
