"""obd_ext.distributed on real gloo process groups (world sizes 2 and 3, CPU).

Each world size is one launch: this file, run as a script, is the worker.
Every rank builds the same full pools from fixed seeds, runs single-process
``obd_ext.prune_global_`` on a copy of them, runs ``prune_global_sharded_``
on its own slice of another copy, and compares its slice bitwise (masks,
written weights) plus the global statistics. Expected errors are raised on
every rank; the launch has a deadline, so a rank left waiting in a collective
fails the test instead of hanging it. Every collective the selection issues is
recorded: none may carry more than a histogram, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn as nn

import obd_ext
from obd_ext import distributed as D
from obd_ext.saliency_keys import order_key, saliency_keys

WORLD_SIZES = (2, 3)
LAUNCH_TIMEOUT_S = 120
HISTOGRAM_NUMEL = 1 << D.DIGIT_BITS
MAX_COLLECTIVES_PER_SELECTION = 1 + 64 // D.DIGIT_BITS + 2  # counts, digit rounds, ties, statistics

# ---------------------------------------------------------------------------
# Helpers shared by the worker cases
# ---------------------------------------------------------------------------

_AS_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in _AS_INT:
        return torch.equal(a.view(_AS_INT[a.dtype]), b.view(_AS_INT[b.dtype]))
    return torch.equal(a, b)


def _pieces(tensors: Sequence[torch.Tensor], start: int, stop: int) -> List[torch.Tensor]:
    """Flat views of entries [start, stop) of the tensors seen as one vector (the test's own slicer)."""
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            out.append(t.view(-1)[a - offset:b - offset])
        offset += n
    return out


def _fsdp_bounds(n: int, world: int) -> List[int]:
    per = -(-n // world)
    return [min(r * per, n) for r in range(world)] + [n]


def _same_float(a: float, b: float, rel: float = 0.0) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or math.isclose(a, b, rel_tol=rel, abs_tol=rel)


_COLLECTIVES: List[tuple] = []  # (name, numel) of every collective while recording
_RECORDING = [False]


def _record_collectives() -> None:
    """Wrap torch.distributed's collectives so that the selection's traffic is recorded."""
    import torch.distributed as dist

    names = ["all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor",
             "reduce_scatter", "all_to_all", "all_to_all_single", "gather", "scatter", "reduce", "send", "recv",
             "isend", "irecv", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"]
    for name in names:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, __fn=fn, __name=name, **kwargs):
            if _RECORDING[0]:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                lists = [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
                numel = max([t.numel() for t in tensors] or [0])  # the tensor this rank sends
                _COLLECTIVES.append((__name, numel if tensors else max([t.numel() for t in lists] or [-1])))
            return __fn(*args, **kwargs)

        setattr(dist, name, wrapped)


def _check(rank: int, world: int, ws, hs, masks=None, bounds=None, split=None, select_only: bool = False,
           **kw) -> List[str]:
    """Sharded vs single-process selection on copies of the same pools; the problems found on this rank.

    This rank's pieces are ``split(tensors)``: by default the flat slice
    ``bounds[rank]:bounds[rank + 1]`` (FSDP's even split when ``bounds`` is None).
    """
    rw = [w.clone() for w in ws]
    rm = None if masks is None else [m.clone() for m in masks]
    sw = [w.clone() for w in ws]
    sm = None if masks is None else [m.clone() for m in masks]
    if select_only:
        ref = obd_ext.select_global(rw, hs, masks=rm, **kw)
    else:
        ref = obd_ext.prune_global_(rw, hs, masks=rm, **kw)
    if split is None:
        n = sum(h.numel() for h in hs)
        start, stop = (_fsdp_bounds(n, world) if bounds is None else bounds)[rank:rank + 2]

        def split(ts):
            return _pieces(ts, start, stop)

        lw, lh = (split(sw), split(hs)) if bounds else (D.shard_flat(sw, rank, world), D.shard_flat(hs, rank, world))
    else:
        lw, lh = split(sw), split(hs)
    lm = None if sm is None else split(sm)
    lm_before = None if lm is None else [m.clone() for m in lm]
    del _COLLECTIVES[:]
    _RECORDING[0] = True
    try:
        fn = D.select_global_sharded if select_only else D.prune_global_sharded_
        sel = fn(lw, lh, masks=lm, **kw)
    finally:
        _RECORDING[0] = False
    where = f"rank {rank}, {kw}"
    problems = []
    want_masks = split(ref.masks)
    if len(sel.masks) != len(want_masks) or not all(_same_bits(a, b) for a, b in zip(sel.masks, want_masks)):
        problems.append(f"{where}: masks differ")
    if not all(_same_bits(a, b) for a, b in zip(split(sw), split(rw))):
        problems.append(f"{where}: weights differ")
    if select_only and lm is not None and not all(_same_bits(a, b) for a, b in zip(lm, lm_before)):
        problems.append(f"{where}: select_global_sharded changed the input masks")
    for name in ("deleted_now", "deleted_before", "skipped_nonfinite"):
        if getattr(sel, name) != getattr(ref, name):
            problems.append(f"{where}: {name} {getattr(sel, name)} != {getattr(ref, name)}")
    if not _same_float(sel.max_saliency, ref.max_saliency):
        problems.append(f"{where}: max_saliency {sel.max_saliency!r} != {ref.max_saliency!r}")
    if not _same_float(sel.predicted_increase, ref.predicted_increase, rel=1e-9):
        problems.append(f"{where}: predicted_increase {sel.predicted_increase!r} != {ref.predicted_increase!r}")
    if sel.sparsity != ref.sparsity:
        problems.append(f"{where}: sparsity {sel.sparsity} != {ref.sparsity}")
    problems += _traffic_problems(where)
    return problems


def _traffic_problems(where: str) -> List[str]:
    problems = [] if _COLLECTIVES else [f"{where}: no collective was recorded"]
    big = [c for c in _COLLECTIVES if c[1] > HISTOGRAM_NUMEL or c[1] < 0]
    if big:
        problems.append(f"{where}: collectives larger than a histogram: {big}")
    if len(_COLLECTIVES) > MAX_COLLECTIVES_PER_SELECTION:
        problems.append(f"{where}: {len(_COLLECTIVES)} collectives: {_COLLECTIVES}")
    return problems


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_pools(shapes, seed: int, wdtypes=None, hdtypes=None):
    g = _gen(seed)
    ws, hs = [], []
    for i, shape in enumerate(shapes):
        wd = wdtypes[i] if wdtypes else torch.float32
        hd = hdtypes[i] if hdtypes else torch.float32
        ws.append(torch.randn(shape, generator=g, dtype=torch.float64).to(wd))
        hs.append((torch.rand(shape, generator=g, dtype=torch.float64) + 0.1).to(hd))
    return ws, hs


SHAPES = [(7, 5), (13,), (3, 4, 5), (1,), (0,), (31, 2), (4, 4)]


def _ks(n: int) -> List[int]:
    return sorted({0, 1, n // 3, n // 2, n - 1, n})


def _bounds_variants(n: int, world: int, seed: int) -> List[Optional[List[int]]]:
    """FSDP's even split, a random uneven split, and one where a rank owns nothing."""
    g = _gen(seed)
    cuts = sorted(torch.randint(0, n + 1, (world - 1,), generator=g).tolist())
    # A rank that owns nothing: the first of two, or the middle ones of more.
    empty = [0, 0, n] if world == 2 else [0] + [n // 2] * (world - 1) + [n]
    return [None, [0, *cuts, n], empty]


# ---------------------------------------------------------------------------
# Worker cases: each returns the problems this rank found (empty: ok)
# ---------------------------------------------------------------------------


def case_float32_mixed_shapes(rank, world):
    ws, hs = _random_pools(SHAPES, seed=1)
    n = sum(h.numel() for h in hs)
    return [p for b in _bounds_variants(n, world, 1) for k in _ks(n)
            for p in _check(rank, world, ws, hs, bounds=b, k=k)]


def case_float64_pool(rank, world):
    # One float64 operand anywhere makes the whole pool float64 (64-bit keys).
    wd = [torch.float32] * len(SHAPES)
    hd = [torch.float32] * len(SHAPES)
    wd[5], hd[2] = torch.float64, torch.float64
    ws, hs = _random_pools(SHAPES, seed=2, wdtypes=wd, hdtypes=hd)
    n = sum(h.numel() for h in hs)
    out = [p for b in _bounds_variants(n, world, 2) for k in _ks(n) for p in _check(rank, world, ws, hs, bounds=b, k=k)]
    ws, hs = _random_pools(SHAPES, seed=3, wdtypes=[torch.float64] * 7, hdtypes=[torch.float64] * 7)
    return out + [p for k in _ks(n) for p in _check(rank, world, ws, hs, k=k)]


def case_half_weights(rank, world):
    wd = [torch.float16, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float16, torch.float32]
    ws, hs = _random_pools(SHAPES, seed=4, wdtypes=wd)
    n = sum(h.numel() for h in hs)
    return [p for k in _ks(n) for p in _check(rank, world, ws, hs, k=k)]


def case_quantised_ties(rank, world):
    g = _gen(5)
    ws = [torch.where(torch.rand(s, generator=g) < 0.5, -1.0, 1.0) for s in SHAPES]
    hs = [torch.randint(1, 5, s, generator=g).float() / 4 for s in SHAPES]
    n = sum(h.numel() for h in hs)
    return [p for b in _bounds_variants(n, world, 5) for k in range(0, n + 1, 13)
            for p in _check(rank, world, ws, hs, bounds=b, k=k)]


def case_all_equal(rank, world):
    ws = [torch.full(s, 0.5) for s in SHAPES]
    hs = [torch.ones(s) for s in SHAPES]
    n = sum(h.numel() for h in hs)
    return [p for b in _bounds_variants(n, world, 6) for k in _ks(n) + [n // 2 + 1]
            for p in _check(rank, world, ws, hs, bounds=b, k=k)]


def case_negative_curvature(rank, world):
    # Negative saliencies, and +0.0 / -0.0 ones (w = 0 with h of either sign), which are equal.
    out = []
    for dt, step in ((torch.float32, 9), (torch.float64, 13)):
        g = _gen(7)
        ws, hs = [], []
        for s in SHAPES:
            w = torch.randn(s, generator=g, dtype=dt)
            w[torch.rand(s, generator=g) < 0.3] = 0.0
            h = torch.randn(s, generator=g, dtype=dt)
            h[torch.rand(s, generator=g) < 0.1] = -0.0
            ws.append(w)
            hs.append(h)
        n = sum(h.numel() for h in hs)
        out += [p for b in _bounds_variants(n, world, 7) for k in range(0, n + 1, step)
                for p in _check(rank, world, ws, hs, bounds=b, k=k)]
    return out


def case_existing_masks(rank, world):
    ws, hs = _random_pools(SHAPES, seed=8)
    g = _gen(8)
    masks = [torch.rand(s, generator=g) > 0.3 for s in SHAPES]
    n = sum(h.numel() for h in hs)
    before = sum(int((~m).sum()) for m in masks)
    ks = sorted({0, before // 2, before, before + 1, (before + n) // 2, n})
    return [p for b in _bounds_variants(n, world, 8) for k in ks
            for p in _check(rank, world, ws, hs, masks=masks, bounds=b, k=k)]


def case_sparsity_and_factor(rank, world):
    ws, hs = _random_pools(SHAPES, seed=9)
    g = _gen(9)
    masks = [torch.rand(s, generator=g) > 0.2 for s in SHAPES]
    out = []
    for sparsity in (0.0, 0.37, 0.5, 1.0):
        out += _check(rank, world, ws, hs, sparsity=sparsity)
    out += _check(rank, world, ws, hs, masks=masks, sparsity=0.6, factor=0.5)
    out += _check(rank, world, ws, hs, masks=masks, sparsity=0.6, factor=None)
    out += _check(rank, world, ws, hs, masks=masks, sparsity=0.6, select_only=True)
    return out


def case_nonfinite_keep(rank, world):
    ws, hs = _random_pools(SHAPES, seed=10)
    ws[0][1, 2], ws[2][2, 3, 4], ws[6][0, 0] = float("nan"), float("inf"), float("nan")
    hs[1][5], hs[5][30, 1], hs[6][0, 0] = float("nan"), float("-inf"), 1.0
    masks = [torch.ones(s, dtype=torch.bool) for s in SHAPES]
    masks[6][0, 0] = False  # a deleted non-finite entry is not counted as skipped
    n = sum(h.numel() for h in hs)
    prunable = n - 4  # four alive non-finite entries
    out = [p for b in _bounds_variants(n, world, 10) for k in (0, 9, n // 2, prunable)
           for p in _check(rank, world, ws, hs, masks=masks, bounds=b, k=k, nonfinite="keep")]
    try:
        D.prune_global_sharded_(D.shard_flat(ws, rank, world), D.shard_flat(hs, rank, world),
                                masks=D.shard_flat(masks, rank, world), k=prunable + 1, nonfinite="keep")
        out.append(f"rank {rank}: k above the prunable count did not raise")
    except ValueError as e:
        if f"k={prunable + 1}, but only {prunable} of {n}" not in str(e):
            out.append(f"rank {rank}: unexpected message {e}")
    return out


def case_overflow_saliency(rank, world):
    # Finite w and h whose saliency overflows (inf) or is 0 * inf (NaN): prunable, ordered as the kernel orders.
    ws, hs = _random_pools(SHAPES, seed=11)
    ws[0][0, 0], hs[0][0, 0] = 1e30, 0.0
    ws[5][3, 1], hs[5][3, 1] = 1e30, 1.0
    ws[6][2, 2], hs[6][2, 2] = -1e30, -2.0
    n = sum(h.numel() for h in hs)
    return [p for k in _ks(n) for p in _check(rank, world, ws, hs, k=k)]


def case_many_pieces_large_pool(rank, world):
    # A pool far larger than a histogram: the traffic must not grow with it. Small
    # key chunks make each piece span several.
    shapes = [(300, 257), (50_000,), (3, 7, 11), (40_000,)]
    out, chunk = [], D._CHUNK
    D._CHUNK = 4096
    try:
        for dt in (torch.float32, torch.float64):
            ws, hs = _random_pools(shapes, seed=12, wdtypes=[dt] * 4, hdtypes=[dt] * 4)
            n = sum(h.numel() for h in hs)
            assert n > 2 * HISTOGRAM_NUMEL
            out += _check(rank, world, ws, hs, k=n // 3)
            out += _check(rank, world, ws, hs, sparsity=0.9)
    finally:
        D._CHUNK = chunk
    return out


def case_whole_noncontiguous_tensors(rank, world):
    # Pieces need not be flat: here each rank holds whole tensors (any shape, some
    # transposed, so non-contiguous); the pool is still tensor order, rank order.
    ws, hs = _random_pools([(6, 5), (4, 7), (9,), (3, 2, 4), (8, 3)], seed=16)
    ws[0], hs[1], ws[4] = ws[0].t(), hs[1].t(), ws[4].t()
    hs[0], ws[1], hs[4] = hs[0].t().contiguous().t().t(), ws[1].t(), hs[4].t()
    g = _gen(16)
    masks = [torch.rand(w.shape, generator=g) > 0.2 for w in ws]
    masks[3] = masks[3].transpose(0, 2).contiguous().transpose(0, 2)
    owner = [min(i * world // len(ws), world - 1) for i in range(len(ws))]
    mine = [i for i, o in enumerate(owner) if o == rank]

    def split(ts):
        return [ts[i] for i in mine]

    n = sum(h.numel() for h in hs)
    return [p for k in _ks(n) for p in _check(rank, world, ws, hs, masks=masks, split=split, k=k)] + \
        _check(rank, world, ws, hs, masks=masks, split=split, sparsity=0.5, factor=-0.25)


def _expect_error(rank, exc_type, pattern: str, fn: Callable[[], object]) -> List[str]:
    import re

    try:
        fn()
    except exc_type as e:
        return [] if re.search(pattern, str(e)) else [f"rank {rank}: message {str(e)!r} does not match {pattern!r}"]
    except Exception as e:  # noqa: BLE001 - reported
        return [f"rank {rank}: raised {type(e).__name__}: {e}, expected {exc_type}"]
    return [f"rank {rank}: did not raise ({pattern!r})"]


def case_nonfinite_error(rank, world):
    ws, hs = _random_pools(SHAPES, seed=13)
    hs[6][1, 2] = float("nan")  # owned by the last rank under the even split
    n = sum(h.numel() for h in hs)
    last = world - 1
    pool_index = n - 16 + 6
    bounds = _fsdp_bounds(n, world)
    assert bounds[last] <= pool_index < bounds[last + 1]
    lw, lh = D.shard_flat(ws, rank, world), D.shard_flat(hs, rank, world)
    theirs = D.shard_flat(hs, last, world)  # the message names the last rank's own pieces
    local, index = len(theirs) - 1, 6 - (16 - theirs[-1].numel())
    before = [w.clone() for w in lw]
    out = _expect_error(rank, ValueError,
                        rf"rank {last}: curvature\[{local}\] .* non-finite value \(nan\) at flat index "
                        rf"{index} \(global pool index {pool_index}\); pass nonfinite='keep'",
                        lambda: D.prune_global_sharded_(lw, lh, k=5))
    if not all(_same_bits(a, b) for a, b in zip(lw, before)):
        out.append(f"rank {rank}: weights written despite the error")
    # The first non-finite entry in global order wins: a weight on rank 0.
    ws[0][0, 3] = float("inf")
    lw = D.shard_flat(ws, rank, world)
    out += _expect_error(rank, ValueError,
                         r"rank 0: weights\[0\] .* non-finite value \(inf\) at flat index 3 \(global pool index 3\)",
                         lambda: D.prune_global_sharded_(lw, lh, sparsity=0.5))
    return out


def case_argument_errors(rank, world):
    ws, hs = _random_pools(SHAPES, seed=14)
    n = sum(h.numel() for h in hs)
    lw, lh = D.shard_flat(ws, rank, world), D.shard_flat(hs, rank, world)
    out = _expect_error(rank, ValueError, rf"k must be in \[0, {n}\] \(the number of entries in the whole pool\), "
                        rf"got {n + 1}", lambda: D.prune_global_sharded_(lw, lh, k=n + 1))
    out += _expect_error(rank, ValueError, r"sparsity must be a number in \[0, 1\], got 1.5",
                         lambda: D.prune_global_sharded_(lw, lh, sparsity=1.5))
    out += _expect_error(rank, ValueError, "exactly one of k and sparsity",
                         lambda: D.prune_global_sharded_(lw, lh, k=3, sparsity=0.5))
    out += _expect_error(rank, ValueError, r"k must be the same on every rank, got \(per rank\) \[0.0, 1.0",
                         lambda: D.prune_global_sharded_(lw, lh, k=rank))
    # A bad argument on one rank only: that rank raises its own error, the others name it.
    bad_w = [w.to(torch.int32) if rank == 0 else w for w in lw]
    expected = (r"weights\[0\] must be float32, float64, float16 or bfloat16, got torch.int32" if rank == 0
                else r"rank\(s\) \[0\] rejected their arguments")
    out += _expect_error(rank, TypeError if rank == 0 else RuntimeError, expected,
                         lambda: D.prune_global_sharded_(bad_w, lh, k=3))
    masks = D.shard_flat([torch.ones(s, dtype=torch.bool) for s in SHAPES], rank, world)
    masks = masks[:-1] if rank == world - 1 else masks
    expected = "masks must have one tensor per weight" if rank == world - 1 else rf"rank\(s\) \[{world - 1}\]"
    out += _expect_error(rank, (ValueError, RuntimeError), expected,
                         lambda: D.prune_global_sharded_(lw, lh, masks=masks, k=3))
    out += _expect_error(rank, ValueError, "nonfinite must be 'error' or 'keep', got 'drop'",
                         lambda: D.prune_global_sharded_(lw, lh, k=3, nonfinite="drop"))
    # The group is still in step after all of these.
    return out + _check(rank, world, ws, hs, k=n // 2)


def case_empty_pool(rank, world):
    # No rank owns anything: only k = 0 is possible.
    out = _expect_error(rank, ValueError, r"k must be in \[0, 0\]", lambda: D.prune_global_sharded_([], [], k=1))
    sel = D.prune_global_sharded_([], [], k=0)
    if sel.masks or sel.deleted_now or sel.numel:
        out.append(f"rank {rank}: empty pool gave {sel}")
    return out


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batches() -> list:
    g = _gen(15)
    return [(torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64))
            for _ in range(7)]


def case_curvature_all_reduce(rank, world):
    model, loss, data = _mlp(), nn.MSELoss(), _batches()
    mine = data[rank::world]  # unequal numbers of batches per rank
    out = []
    for reduction in ("sum", "mean"):
        full = obd_ext.hessian_diag(model, loss, data, method="lm", reduction=reduction, progress=False)
        part = obd_ext.hessian_diag(model, loss, mine, method="lm", reduction=reduction, progress=False)
        got = D.all_reduce_curvature(part)
        if got is not part or part.batches != len(data) or list(part) != list(full):
            out.append(f"rank {rank}: {reduction}: batches {part.batches}, names {list(part)}")
        for name in full:
            if not torch.allclose(part[name], full[name], rtol=1e-12, atol=1e-14):
                out.append(f"rank {rank}: {reduction}: {name} differs by {(part[name] - full[name]).abs().max()}")
        if part.negative != full.negative:
            out.append(f"rank {rank}: {reduction}: negative {part.negative} != {full.negative}")
    return out


def _rank_tensors(r: int) -> list:
    g = _gen(100 + r)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g, dtype=torch.float64),
            torch.randint(0, 100, (2, 2), generator=g), torch.randn(6, generator=g)[::2]]


def case_all_reduce_tensors(rank, world):
    out = []
    mine = _rank_tensors(rank)
    D.all_reduce_tensors(mine, op="sum")
    want = [sum(ts) for ts in zip(*[_rank_tensors(r) for r in range(world)])]
    if not all(torch.allclose(a, b, rtol=1e-6) if a.is_floating_point() else torch.equal(a, b)
               for a, b in zip(mine, want)):
        out.append(f"rank {rank}: sum differs")
    # A mean weighted by each rank's count: rank r saw r + 1 batches.
    floats = {f"t{i}": t for i, t in enumerate(_rank_tensors(rank)) if t.is_floating_point()}
    D.all_reduce_tensors(floats, op="mean", count=rank + 1)
    total = world * (world + 1) / 2
    for i, name in enumerate(["t0", "t1", "t3"]):
        j = [0, 1, 3][i]
        expect = sum((r + 1) * _rank_tensors(r)[j] for r in range(world)) / total
        if not torch.allclose(floats[name], expect, rtol=1e-5):
            out.append(f"rank {rank}: weighted mean of {name} differs")
    plain = _rank_tensors(rank)[:2]
    D.all_reduce_tensors(plain, op="mean")
    if not torch.allclose(plain[0], sum(_rank_tensors(r)[0] for r in range(world)) / world, rtol=1e-6):
        out.append(f"rank {rank}: plain mean differs")
    layout = _rank_tensors(rank)[: 3 if rank == 0 else 2]
    out += _expect_error(rank, ValueError, "layouts differ between ranks",
                         lambda: D.all_reduce_tensors(layout))
    out += _expect_error(rank, TypeError, "op='mean' needs floating tensors",
                         lambda: D.all_reduce_tensors(_rank_tensors(rank), op="mean"))
    return out


def case_aliasing_changes_nothing(rank, world):
    # The same piece twice on rank 0: rank 0 names it, the others name rank 0; no rank writes anything.
    ws, hs = _random_pools(SHAPES, seed=15)
    lw, lh = D.shard_flat(ws, rank, world), D.shard_flat(hs, rank, world)
    masks = [torch.ones_like(h, dtype=torch.bool) for h in lh]
    before, versions = [w.clone() for w in lw], [t._version for t in lw + masks]
    dup_w, dup_h = (lw + lw[:1], lh + lh[:1]) if rank == 0 else (lw, lh)
    dup_m = masks + [torch.ones_like(lh[0], dtype=torch.bool)] if rank == 0 else masks
    n = len(lw)
    expected = (rf"weights\[0\] and weights\[{n}\] are the same tensor" if rank == 0
                else r"rank\(s\) \[0\] rejected their arguments")
    out = _expect_error(rank, ValueError if rank == 0 else RuntimeError, expected,
                        lambda: D.prune_global_sharded_(dup_w, dup_h, masks=dup_m, k=5))
    # Masks that overlap (views of one buffer) on every rank that has two pieces; the others name those ranks.
    buf = torch.ones(max([h.numel() for h in lh] + [1]), dtype=torch.bool)
    shared = [buf[:h.numel()].view(h.shape) for h in lh]
    some = [r for r in range(world) if len(D.shard_flat(hs, r, world)) > 1]
    if some:
        expected = (r"masks\[0\] and masks\[1\] share memory \(overlapping views\)" if len(lh) > 1
                    else r"rejected their arguments")
        out += _expect_error(rank, ValueError if len(lh) > 1 else RuntimeError, expected,
                             lambda: D.prune_global_sharded_(lw, lh, masks=shared, k=5))
    if not all(_same_bits(a, b) for a, b in zip(lw, before)) or not all(m.all() for m in masks):
        out.append(f"rank {rank}: weights or masks written despite the error")
    if [t._version for t in lw + masks] != versions:
        out.append(f"rank {rank}: version counters changed despite the error")
    return out + _check(rank, world, ws, hs, k=7)


CASES: Dict[str, Callable] = {
    name[len("case_"):]: fn for name, fn in list(globals().items()) if name.startswith("case_")
}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    _record_collectives()
    results = {}
    for name, fn in CASES.items():
        t0 = time.perf_counter()
        try:
            problems = fn(rank, world)
        except Exception:  # noqa: BLE001 - reported to the parent
            problems = [f"rank {rank} raised:\n{traceback.format_exc()}"]
        results[name] = {"problems": problems, "seconds": time.perf_counter() - t0}
    Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------
# The parent: one launch per world size, one test per case
# ---------------------------------------------------------------------------


def _launch(world: int, tmp: Path) -> List[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs, logs = [], []
    for r in range(world):
        log = open(tmp / f"rank{r}.log", "w")
        logs.append(log)
        cmd = [sys.executable, __file__, "--worker", str(r), str(world), str(tmp / "init"), str(tmp / f"rank{r}.json")]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"world {world}: workers still running after {LAUNCH_TIMEOUT_S}s (a rank hung in a collective?)\n"
                    + "\n".join((tmp / f"rank{r}.log").read_text()[-3000:] for r in range(world)))
    finally:
        for log in logs:
            log.close()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{(tmp / f'rank{r}.log').read_text()[-5000:]}"
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory) -> List[dict]:
    return _launch(request.param, tmp_path_factory.mktemp(f"dist{request.param}"))


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_matches_single_process(world_results, case):
    problems = [p for results in world_results for p in results[case]["problems"]]
    assert not problems, "\n".join(problems[:20])


def test_shard_flat_even_split_views():
    ts = [torch.arange(6.0).reshape(2, 3), torch.arange(5.0) + 10, torch.zeros(0), torch.arange(2.0) + 20]
    flat = torch.cat([t.reshape(-1) for t in ts])
    for world in (1, 2, 3, 4, 13, 20):
        got = [D.shard_flat(ts, r, world) for r in range(world)]
        assert torch.equal(torch.cat([p for ps in got for p in ps]), flat)
        per = -(-flat.numel() // world)
        assert all(sum(p.numel() for p in ps) <= per for ps in got)
        assert all(p.numel() > 0 for ps in got for p in ps)
    piece = D.shard_flat(ts, 0, 2)[-1]  # rank 0 owns entries [0, 7): ts[0] and ts[1][:1], as views
    piece.fill_(-1.0)
    assert ts[1][:2].tolist() == [-1.0, 11.0]
    with pytest.raises(ValueError, match=r"need 0 <= rank < world_size, got rank=2, world_size=2"):
        D.shard_flat(ts, 2, 2)
    with pytest.raises(ValueError, match=r"tensors\[0\] \(shape \(3, 2\)\) is not contiguous"):
        D.shard_flat([ts[0].t()], 0, 2)
    copied = D.shard_flat([ts[0].t()], 0, 2, allow_copies=True)  # read-only inputs: a copy is fine
    assert torch.equal(torch.cat(copied), ts[0].t().reshape(-1)[:3])


def test_needs_an_initialised_process_group():
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - pytest does not start one
        pytest.fail("a process group is already initialised in the test process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        D.prune_global_sharded_([torch.ones(2)], [torch.ones(2)], k=1)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        D.all_reduce_tensors([torch.ones(2)])


def test_saliency_keys_order_like_floats():
    # One home for the kernels' key: float order (NaN above +inf, -0.0 == +0.0), both widths.
    vals = [-math.inf, -3e38, -2.0, -1e-40, -0.0, 0.0, 1e-40, 3.0, 3e38, math.inf, math.nan]
    for dt in (torch.float32, torch.float64):
        keys = saliency_keys(torch.tensor(vals, dtype=dt)).tolist()
        if dt == torch.float64:
            keys = [k & (2 ** 64 - 1) for k in keys]
        assert keys == sorted(keys) and keys[4] == keys[5] and len(set(keys)) == len(keys) - 1
    assert saliency_keys(torch.tensor([-math.nan])).tolist() == saliency_keys(torch.tensor([math.nan])).tolist()


def test_order_key_matches_float_order():
    vals = [-math.inf, -1e300, -2.0, -1e-300, -0.0, 0.0, 1e-300, 3.0, 1e300, math.inf]
    keys = [order_key(v) for v in vals]
    assert keys == sorted(keys) and keys[4] == keys[5]


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
