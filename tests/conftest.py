import os

import pytest
import torch

# DeepSpeed picks its accelerator at import; CI and this machine have no GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

CUDA_SKIP = "needs a CUDA device (SEQSHARD_TEST_DEVICE=cuda on a GPU machine)"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: runs on CUDA tensors; only with SEQSHARD_TEST_DEVICE=cuda and a GPU")


def pytest_collection_modifyitems(config, items):
    # a cuda test runs only when asked for and possible; otherwise it says why under -rs
    if os.environ.get("SEQSHARD_TEST_DEVICE") == "cuda" and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
