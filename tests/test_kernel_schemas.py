"""Every private aten op that ops/attention/kernels.py calls is pinned: a torch release that
renames or changes one fails here loudly (at run time its path would silently fall back to
the slow plain-torch kernel). The CUDA ops' schemas are registered in CPU builds too."""

from __future__ import annotations

import pytest
import torch

from seqshard.ops.attention import kernels


@pytest.mark.parametrize("name", sorted(kernels.SCHEMAS))
def test_private_kernel_schema(name):
    op = getattr(torch.ops.aten, name, None)
    assert op is not None, f"torch {torch.__version__} has no aten::{name}"
    assert str(op.default._schema) == kernels.SCHEMAS[name], (
        f"aten::{name} changed in torch {torch.__version__}; kernels.py expects "
        f"{kernels.SCHEMAS[name]}")


def test_every_path_loaded():
    """Every fused path is available in the tested torch (none fell back): CPU, CUDA flash,
    CUDA memory-efficient and the varlen flash kernel (documents and windows)."""
    assert kernels.FUSED_CPU is not None
    assert kernels.FLASH_CUDA is not None
    assert kernels.EFFICIENT_CUDA is not None
    assert kernels.VARLEN_CUDA is not None
