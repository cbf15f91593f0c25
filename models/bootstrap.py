"""A process group for a Trainer that no launcher started (DeepSpeed's engine needs one)."""

from __future__ import annotations

import os

import torch.distributed as dist

from seqshard.dist import free_port, init_process_group


def ensure_single_process_group() -> None:
    """Start a one-rank gloo group unless a process group is already running. Environment
    variables a launcher set are kept; only missing ones get one-rank values."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)
    init_process_group()
