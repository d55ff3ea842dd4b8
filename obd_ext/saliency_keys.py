"""The order-preserving integer key of a saliency: one home for the mapping the kernels use.

The selection kernels order saliencies by an unsigned integer key made from
the float's bits (``key_of`` in ``csrc/kernels/common.h``): NaN becomes the
positive quiet NaN, -0.0 becomes +0.0, then non-negative floats get their
sign bit set and negative floats have every bit flipped. Integer order of the
keys is then float order (with NaN above +inf), so a radix select on the keys
finds the k lowest saliencies. The distributed selection
(:mod:`obd_ext.distributed`) must use exactly this order to give the
kernels' masks bit for bit; it is written once here, in torch ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["saliency_keys", "order_key"]


def saliency_keys(s: Tensor) -> Tensor:
    """The kernels' order-preserving keys of saliencies ``s``, as int64 bit patterns.

    Args:
        s: float32 saliencies (32-bit keys) or float64 ones (64-bit keys).

    Returns:
        int64 of the shape of ``s``. 32-bit keys are non-negative values below
        2^32 and compare as numbers; 64-bit keys use all 64 bits as an unsigned
        pattern (extract digits with shifts and masks, never compare them as
        signed numbers).
    """
    if s.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"saliency_keys: saliencies must be float32 or float64, got {s.dtype}")
    s = torch.where(torch.isnan(s), math.nan, s)  # any NaN -> the positive quiet NaN
    if s.dtype == torch.float64:
        u = s.view(torch.int64)
        u = torch.where(u == -(1 << 63), 0, u)  # -0.0 -> +0.0
        return torch.where(u < 0, ~u, u ^ -(1 << 63))
    u = s.view(torch.int32).to(torch.int64)
    u = torch.where(u == -(1 << 31), 0, u)
    return torch.where(u < 0, -1 - u, u + (1 << 31))


def order_key(x: float) -> int:
    """The unsigned 64-bit key of one float64 (:func:`saliency_keys` as a Python int in [0, 2^64))."""
    return int(saliency_keys(torch.tensor([float(x)], dtype=torch.float64))[0]) & (2 ** 64 - 1)
