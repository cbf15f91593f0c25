"""The dtypes every op computes in: the real floating ones.

Integer, bool and complex inputs have no softmax attention or delta rule (torch's SDPA
rejects them too), and float8 has no kernel here. Each op raises a ValueError naming the
dtype it got.
"""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
