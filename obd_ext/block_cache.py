"""Recycling of large CPU tensors while a curvature sweep runs.

A sweep allocates and frees the same few tensor sizes many times per batch;
on Linux, glibc hands large blocks back to the kernel, so each new tensor is
fresh memory faulted in page by page (csrc/generic/block_cache.cpp says how much
that costs). Inside :func:`cpu_block_cache` freed CPU blocks of 1 MiB or more
are kept and reused for requests of the same size; live plus cached bytes stay
within 1.5x the scope's peak of live bytes, and everything is released when
the outermost scope closes.
``OBD_EXT_DISABLE_BLOCK_CACHE=1`` turns it off (for comparisons).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Dict, Iterator

import torch

from . import _C  # noqa: F401  (registers the ops)

__all__ = ["cpu_block_cache", "block_cache_stats"]


def _disabled() -> bool:
    return os.environ.get("OBD_EXT_DISABLE_BLOCK_CACHE", "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def cpu_block_cache() -> Iterator[None]:
    """Recycle freed CPU blocks of 1 MiB or more until the scope closes (scopes nest)."""
    if _disabled():
        yield
        return
    torch.ops.obd_ext._block_cache_enter()
    try:
        yield
    finally:
        torch.ops.obd_ext._block_cache_exit()


def block_cache_stats() -> Dict[str, int]:
    """Open scopes; bytes held for reuse; requests of 1 MiB or more served from the cache
    (hits) or not (misses), counted since the process started; bytes of the blocks handed
    out and still in use (live_bytes) and their high-water mark in the current scope."""
    depth, cached, hits, misses, live, hwm = torch.ops.obd_ext._block_cache_stats()
    return {"depth": depth, "cached_bytes": cached, "hits": hits, "misses": misses, "live_bytes": live,
            "high_water_bytes": hwm}
