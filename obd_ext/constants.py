"""Facts the C++ kernels and the Python layer share: one home for each.

Production code and the test oracle (``reference.py``) both import from
here; production code never imports the oracle.
"""

from __future__ import annotations

import torch

__all__ = [
    "NUM_STATS",
    "STAT_DELETED_NOW",
    "STAT_DELETED_BEFORE",
    "STAT_SKIPPED",
    "STAT_MAX_DELETED",
    "STAT_SALIENCY_SUM",
    "ACT_KINDS",
    "saliency_dtype",
]

# Layout of the float64 statistics every selection op returns (csrc/kernels/common.h, kStat*).
NUM_STATS = 5
STAT_DELETED_NOW, STAT_DELETED_BEFORE, STAT_SKIPPED, STAT_MAX_DELETED, STAT_SALIENCY_SUM = range(NUM_STATS)

# Activation codes of the activation_hessian op (csrc/kernels/common.h, ActKind).
ACT_KINDS = {
    "tanh": 0, "sigmoid": 1, "relu": 2, "leaky_relu": 3, "elu": 4, "gelu": 5, "gelu_tanh": 6, "silu": 7,
    "softplus": 8, "hardtanh": 9,
}


def saliency_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype saliency is computed and returned in: float64 if any operand is float64, float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
