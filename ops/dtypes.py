"""The dtypes every op computes in: the real floating ones.

Integer, bool and complex inputs have no softmax attention or delta rule (torch's SDPA
rejects them too), and float8 has no kernel here. Each op raises a ValueError naming the
dtype it got.
"""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What an op accumulates and chains in for inputs of `dtype`: float64 stays float64, every
    other floating dtype (bf16, fp16, fp32) works in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
