"""OBD on torch.distributed: all-reduced curvature and global selection over sharded parameters.

Two jobs, each built only from torch.distributed collectives (``all_reduce``,
``all_gather`` of small tensors), so it runs on gloo (CPU) and NCCL (CUDA)
alike; every tensor handed to a collective lives on the data's device (an
empty shard under NCCL uses the current CUDA device).

**Curvature and statistics** (:func:`all_reduce_tensors`,
:func:`all_reduce_curvature`): each data-parallel rank accumulates curvature
on its own data; one all-reduce per dtype (the tensors flattened into one
buffer) combines them. Sums add exactly as single-process accumulation would
(up to float rounding). Means need care: the mean of the ranks' means is the
global mean only when every rank saw the same amount of data. With unequal
shards, accumulate sums and divide by the all-reduced count, or pass
``count=`` (the rank's number of batches or samples) and the mean is weighted
by it; :func:`all_reduce_curvature` does that by itself with a
:class:`~obd_ext.curvature.Curvature`'s ``batches``.

**Global selection over sharded parameters** (:func:`prune_global_sharded_`):
the parameters are seen as one flat vector (all tensors flattened and
concatenated in a fixed order, FSDP's flat parameter), and each rank holds a
contiguous slice of it, rank r's slice before rank r+1's. The k lowest
saliencies of the whole vector are found without moving weights, curvatures
or saliencies between ranks, by a distributed radix select on the saliency's
order-preserving integer key (the kernels' key, written once in
:mod:`obd_ext.saliency_keys`):

1. one ``all_gather`` of a row of counts per rank (entries, already deleted,
   non-finite, key width, argument checks): every rank learns N, k, whether
   to raise (and where the first non-finite entry is), and the key width;
2. per 16-bit digit of the key, top first: ``torch.bincount`` of the digit of
   the local alive entries matching the prefix found so far, ``all_reduce``
   SUM of the 2^16 int64 bins, and the bin holding the k-th key extends the
   prefix. Two rounds for float32 saliencies, four for float64, fewer when a
   bin is taken whole;
3. if the prefix ends as a full key with more equal entries than still
   needed, one ``all_gather`` of each rank's count of that key splits the
   remaining quota in rank order (ties go by global position, as in the
   single-process selection: tensor index, then flat index);
4. each rank now knows how many of its own entries are deleted, and they are
   its lowest ones, so the local kernel (:func:`obd_ext.ops.global_select_`)
   deletes exactly those and writes masks and weights as single-process
   pruning does. One last ``all_gather`` of (deleted, max, sum) gives the
   global statistics.

Why: per rank the traffic is O(2^16) integers per round, independent of the
model's size, and no rank ever holds the full model or the full saliency;
the masks and weights are bitwise those of :func:`obd_ext.prune_global_` on
the unsharded tensors. Errors found on one rank (bad arguments, a non-finite
entry) are agreed on through the first ``all_gather``, so every rank raises
together instead of some waiting forever in a collective.

If every rank holds the whole (replicated) model and the all-reduced
curvature, no communication is needed at all: :func:`obd_ext.prune_global_`
is deterministic, so calling it on every rank gives identical results.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .constants import STAT_DELETED_NOW, STAT_MAX_DELETED, STAT_SALIENCY_SUM
from .ops import saliency
from .saliency_keys import order_key, saliency_keys
from .selection import Selection
from .selection_checks import check_factor, check_finite, check_nonfinite, check_pool, resolve_k

__all__ = [
    "ShardedSelection",
    "all_reduce_tensors",
    "all_reduce_curvature",
    "shard_flat",
    "prune_global_sharded_",
    "select_global_sharded",
]

DIGIT_BITS = 16
"""Bits of the key resolved per histogram round (2^16 bins of int64 cross the wire)."""

_BINS = 1 << DIGIT_BITS
_CHUNK = 1 << 22  # elements per key computation: bounds the temporaries, not the traffic
_OP = "obd_ext.distributed.prune_global_sharded_"


@dataclass(repr=False)
class ShardedSelection(Selection):
    """What a sharded selection did: local masks, global statistics.

    ``masks`` are this rank's keep-masks (one per local piece). ``deleted_now``,
    ``deleted_before``, ``skipped_nonfinite``, ``max_saliency`` and
    ``predicted_increase`` are totals over all ranks (the same on every rank),
    so ``sparsity`` is the global sparsity. ``max_saliency`` is exactly the
    single-process value; ``predicted_increase`` adds the ranks' sums in rank
    order, so it may differ from the single-process sum by float64 rounding.

    Attributes:
        numel: entries in the whole pool (all ranks).
        local: this rank's own statistics.
    """

    numel: int = 0
    local: Selection = field(default_factory=lambda: Selection([]), repr=False)

    @property
    def sparsity(self) -> float:
        return (self.deleted_now + self.deleted_before) / self.numel if self.numel else 0.0


# ---------------------------------------------------------------------------
# Plumbing: group, devices, agreement
# ---------------------------------------------------------------------------


def _group_info(group, op: str) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialised; "
                           "call torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(tensors: Sequence[Tensor], group) -> torch.device:
    """The data's device; for a rank without data, the one its backend needs."""
    tensors = [t for t in tensors if isinstance(t, Tensor)]
    if tensors:
        return tensors[0].device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(row: Tensor, group) -> Tensor:
    """One small 1-D tensor per rank -> (world x len) on the CPU."""
    out = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, row, group=group)
    return torch.stack(out).cpu()


def _exchange(op: str, row: Sequence[float], error: Optional[BaseException], device, group) -> Tensor:
    """all_gather one float64 row per rank and raise on every rank if any rank failed.

    The rank that failed raises its own error; the others raise a RuntimeError
    naming it, so that no rank is left waiting in a later collective.
    """
    vec = torch.tensor([1.0 if error is not None else 0.0, *row], dtype=torch.float64, device=device)
    rows = _all_gather_rows(vec, group)
    failed = [r for r in range(rows.shape[0]) if rows[r, 0] != 0]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{op}: rank(s) {failed} rejected their arguments (see the error raised there); "
                           "every rank stops here instead of waiting in a collective")
    return rows[:, 1:]


# ---------------------------------------------------------------------------
# All-reduce of curvature and statistics
# ---------------------------------------------------------------------------

_REDUCE_OPS = ("sum", "mean")


def _layout(tensors, names) -> str:
    return ";".join(f"{n}:{t.dtype}:{tuple(t.shape)}" for n, t in zip(names, tensors))


def all_reduce_tensors(
    tensors: Union[Mapping, Sequence[Tensor]],
    *,
    op: str = "sum",
    count: Optional[float] = None,
    group=None,
) -> Union[Mapping, Sequence[Tensor]]:
    """All-reduce many tensors in place with one collective per dtype and device.

    The tensors are flattened into one buffer per (dtype, device), reduced with
    ``all_reduce`` SUM, and copied back. A first ``all_gather`` of a few
    numbers per rank checks that every rank passes the same layout (names,
    dtypes, shapes, ``op``), so a mismatch raises on every rank instead of
    corrupting the sums or hanging.

    Args:
        tensors: a dict name -> tensor (e.g. a :class:`~obd_ext.curvature.Curvature`,
            or calibration statistics) or a list of tensors; the same layout on
            every rank.
        op: "sum", or "mean". Without ``count`` the mean is the plain mean over
            ranks: the global mean only if every rank's value is a mean over
            the same amount of data.
        count: with ``op="mean"``, this rank's amount of data (batches or
            samples); the result is the mean weighted by it, i.e. the global
            mean of per-rank means over unequal shards. Exact alternative:
            accumulate sums, all-reduce them with ``op="sum"`` and divide by the
            all-reduced count.
        group: the process group (default: the world).

    Returns:
        ``tensors``, reduced in place.
    """
    what = "obd_ext.distributed.all_reduce_tensors"
    rank, world = _group_info(group, what)
    if isinstance(tensors, Mapping):
        names, items = [str(k) for k in tensors.keys()], list(tensors.values())
    else:
        items = list(tensors)
        names = [str(i) for i in range(len(items))]
    error: Optional[BaseException] = None
    try:
        _check_reduce_args(items, op, count)
    except (ValueError, TypeError) as e:
        error = e
    device = _comm_device([t for t in items if isinstance(t, Tensor)], group)
    layout = zlib.crc32(_layout(items, names).encode()) if error is None else 0
    weight = float(count) if (error is None and count is not None) else 1.0
    row = [len(items), layout, _REDUCE_OPS.index(op) if op in _REDUCE_OPS else -1, weight]
    rows = _exchange(what, row, error, device, group)
    if any(not torch.equal(rows[r, :3], rows[0, :3]) for r in range(world)):
        raise ValueError(f"{what}: every rank must pass the same tensors (names, dtypes, shapes) and op; the layouts "
                         f"differ between ranks (per rank: tensors={rows[:, 0].long().tolist()}, "
                         f"layout crc32={rows[:, 1].long().tolist()}, op={[_REDUCE_OPS[int(o)] for o in rows[:, 2]]})")
    total = float(rows[:, 3].sum())
    if op == "mean" and count is not None and not total > 0:
        raise ValueError(f"{what}: the counts add up to {total} over all ranks; they must be positive for a mean")
    scale_before = weight if (op == "mean" and count is not None) else None
    scale_after = (1.0 / total if count is not None else 1.0 / world) if op == "mean" else None
    for members in _by_dtype_device(items).values():
        _reduce_bucket(members, scale_before, scale_after, group)
    return tensors


def _check_reduce_args(items: Sequence, op: str, count) -> None:
    what = "obd_ext.distributed.all_reduce_tensors"
    if op not in _REDUCE_OPS:
        raise ValueError(f"{what}: op must be one of {_REDUCE_OPS}, got {op!r}")
    if count is not None:
        if op != "mean":
            raise ValueError(f"{what}: count weights a mean; it needs op='mean', got op={op!r}")
        if isinstance(count, bool) or not isinstance(count, numbers.Real) or not math.isfinite(count) or count < 0:
            raise ValueError(f"{what}: count must be a finite number >= 0, got {count!r}")
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: tensors[{i}] must be a Tensor, got {type(t).__name__}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{what}: tensors[{i}] has dtype {t.dtype}; only real floating and integer tensors add up")
        if op == "mean" and not t.is_floating_point():
            raise TypeError(f"{what}: op='mean' needs floating tensors, tensors[{i}] has dtype {t.dtype}")


def _by_dtype_device(items: Sequence[Tensor]) -> Dict[Tuple[torch.dtype, torch.device], List[Tensor]]:
    buckets: Dict[Tuple[torch.dtype, torch.device], List[Tensor]] = {}
    for t in items:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    return buckets


@torch.no_grad()
def _reduce_bucket(members: List[Tensor], scale_before: Optional[float], scale_after: Optional[float], group) -> None:
    buf = torch.cat([t.detach().reshape(-1) for t in members])
    if scale_before is not None:
        buf.mul_(scale_before)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    if scale_after is not None:
        buf.mul_(scale_after)
    offset = 0
    for t in members:
        n = t.numel()
        t.detach().copy_(buf[offset:offset + n].view(t.shape))
        offset += n


def all_reduce_curvature(curv: Mapping, reduction: Optional[str] = None, *, count: Optional[float] = None,
                         group=None) -> Mapping:
    """Combine per-rank curvature (name -> tensor) in place.

    Args:
        curv: e.g. ``obd_ext.hessian_diag(model, loss, my_shard, ...)`` on each rank.
        reduction: "sum" adds the ranks' curvatures (use with per-rank
            ``reduction="sum"`` curvature: the result is the curvature of all
            the data, as one process would compute it). "mean" averages them,
            weighted by ``count``. Default: the Curvature's own reduction, or
            "sum" for a plain dict.
        count: for "mean", this rank's amount of data. Default for a
            :class:`~obd_ext.curvature.Curvature`: its ``batches``, so that a
            per-rank mean over unequal numbers of batches becomes the mean over
            all batches; for a plain dict: equal weights (exact only for
            equal-size shards).
        group: the process group (default: the world).

    Returns:
        ``curv``; a Curvature also gets the global ``batches`` and ``negative``.
    """
    if reduction is None:
        reduction = getattr(curv, "reduction", "sum")
    if reduction not in _REDUCE_OPS:
        raise ValueError(f"obd_ext.distributed.all_reduce_curvature: reduction must be one of {_REDUCE_OPS}, "
                         f"got {reduction!r}")
    batches = getattr(curv, "batches", None)
    if reduction == "mean" and count is None and isinstance(batches, int):
        count = batches
    all_reduce_tensors(curv, op=reduction, count=count if reduction == "mean" else None, group=group)
    if isinstance(batches, int):
        total = torch.tensor([batches], dtype=torch.int64, device=_comm_device(list(curv.values()), group))
        dist.all_reduce(total, group=group)
        curv.batches = int(total.item())
    if hasattr(curv, "negative"):
        curv.negative = {k: int((v < 0).sum()) for k, v in curv.items()}
    return curv


# ---------------------------------------------------------------------------
# Flat sharding
# ---------------------------------------------------------------------------


def shard_flat(tensors: Sequence[Tensor], rank: int, world_size: int, *, allow_copies: bool = False) -> List[Tensor]:
    """The flat slices of ``tensors`` that ``rank`` owns under an even FSDP-style split.

    The tensors are seen as one flat vector of N entries; each rank owns
    ``ceil(N / world_size)`` consecutive entries (FSDP's padded split: the last
    ranks may own fewer, or none). A tensor may be cut between two ranks.

    Args:
        tensors: tensors (weights, curvatures or masks), in a fixed order.
        rank: this rank, in [0, world_size).
        world_size: number of ranks.
        allow_copies: slice a non-contiguous tensor through a contiguous copy
            instead of raising. Right for read-only inputs such as curvatures
            (``hessian_diag`` may return transposed layouts); never for weights
            or masks, whose pruning would then be lost.

    Returns:
        1-D slices, in order; pieces of length 0 are left out. Of contiguous
        tensors they are views, so in-place pruning of them writes the tensors.
    """
    for name, v in (("world_size", world_size), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"shard_flat: {name} must be an integer, got {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_flat: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    n = sum(t.numel() for t in tensors)
    per = -(-n // world_size)
    start = min(rank * per, n)
    return _flat_slice(tensors, start, min(start + per, n), allow_copies)


def _flat_slice(tensors: Sequence[Tensor], start: int, stop: int, allow_copies: bool) -> List[Tensor]:
    pieces, offset = [], 0
    for i, t in enumerate(tensors):
        n = t.numel()
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            if not (t.is_contiguous() or allow_copies):
                raise ValueError(f"shard_flat: tensors[{i}] (shape {tuple(t.shape)}) is not contiguous, so its flat "
                                 "slices would be copies that pruning cannot write through; pass contiguous tensors, "
                                 "or allow_copies=True for read-only inputs such as curvatures")
            pieces.append(t.detach().reshape(-1)[a - offset:b - offset])
        offset += n
    return pieces


# ---------------------------------------------------------------------------
# Sharded global selection
# ---------------------------------------------------------------------------

# Columns of the row every rank contributes to the first all_gather.
(_NUMEL, _BEFORE, _NONFINITE, _WIDE, _K_STATE, _K, _SPARSITY_STATE, _SPARSITY, _KEEP,
 _BAD_TENSOR, _BAD_INDEX, _BAD_POOL, _BAD_IS_W, _BAD_VALUE) = range(14)
_ROW = 14


def _key_bits(wide: bool) -> int:
    return 64 if wide else 32


def _keys(w: Tensor, h: Tensor, wide: bool) -> Tensor:
    """The kernels' keys (:func:`obd_ext.saliency_keys.saliency_keys`) of the saliencies of (w, h)."""
    s = saliency(w, h)
    return saliency_keys(s.to(torch.float64) if wide else s)


def _chunks(weights: Sequence[Tensor], curvatures: Sequence[Tensor], masks: Sequence[Tensor]):
    """(w, h, alive-and-finite) flat chunks of every local piece, in pool order."""
    for w, h, m in zip(weights, curvatures, masks):
        wf, hf, mf = w.detach().reshape(-1), h.detach().reshape(-1), m.reshape(-1)
        for a in range(0, hf.numel(), _CHUNK):
            cw, ch = wf[a:a + _CHUNK], hf[a:a + _CHUNK]
            yield cw, ch, mf[a:a + _CHUNK] & torch.isfinite(cw) & torch.isfinite(ch)


def _local_histogram(weights, curvatures, masks, wide: bool, prefix: int, pbits: int, device) -> Tensor:
    """int64 counts of the next digit among the local candidates whose key starts with ``prefix``."""
    bits = _key_bits(wide)
    hist = torch.zeros(_BINS, dtype=torch.int64, device=device)
    for w, h, ok in _chunks(weights, curvatures, masks):
        key = _keys(w, h, wide)[ok]
        if pbits:
            key = key[((key >> (bits - pbits)) & ((1 << pbits) - 1)) == prefix]
        hist += torch.bincount((key >> (bits - pbits - DIGIT_BITS)) & (_BINS - 1), minlength=_BINS)
    return hist


def _local_deletions(weights, curvatures, masks, wide: bool, want: int, rank: int, device, group) -> int:
    """How many of this rank's candidates are among the ``want`` lowest of the global pool.

    Distributed radix select: one all_reduce of a 2^16-bin histogram per
    digit, then (for ties on the full key) one all_gather of a count per rank.
    """
    bits = _key_bits(wide)
    prefix, pbits, r, below_local = 0, 0, want, 0
    while True:
        local = _local_histogram(weights, curvatures, masks, wide, prefix, pbits, device)
        hist = local.clone()
        dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=group)
        hist, local = hist.cpu(), local.cpu()
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor([r])).item())
        if b >= _BINS:
            raise RuntimeError(f"{_OP}: radix select lost count (the ranks' data changed during the call?)")
        r -= int(cum[b]) - int(hist[b])
        count, in_bin = int(hist[b]), int(local[b])
        below_local += int(local[:b].sum())
        prefix, pbits = (prefix << DIGIT_BITS) | b, pbits + DIGIT_BITS
        if r == count:  # the bin is taken whole
            return below_local + in_bin
        if pbits == bits:  # r of `count` equal keys: split them in rank order
            ties = _all_gather_rows(torch.tensor([in_bin], dtype=torch.int64, device=device), group)[:, 0]
            earlier = int(ties[:rank].sum())
            return below_local + min(max(r - earlier, 0), in_bin)


def _tensors(x) -> List[Tensor]:
    """The tensors among a (possibly malformed) argument, for choosing the communication device."""
    if isinstance(x, Tensor):
        return [x]
    try:
        return [t for t in x if isinstance(t, Tensor)]
    except TypeError:
        return []


def _first_nonfinite(weights, curvature, masks) -> List[float]:
    """[tensor, flat index, pool index, is weight, value] of the first alive non-finite entry."""
    offset = 0
    for i, (w, h, m) in enumerate(zip(weights, curvature, masks)):
        wf, hf = w.detach().reshape(-1), h.detach().reshape(-1)
        bad = (m.reshape(-1) & ~(torch.isfinite(wf) & torch.isfinite(hf))).nonzero()
        if bad.numel():
            j = int(bad[0, 0])
            is_w = not bool(torch.isfinite(wf[j]))
            return [i, j, offset + j, float(is_w), float((wf if is_w else hf)[j])]
        offset += hf.numel()
    raise AssertionError("no non-finite entry")  # pragma: no cover - only called when the kernel counted one


def _code(v, kind) -> Tuple[float, float]:
    """(state, value) for the agreement check: state 0 = not given, 1 = a number, 2 = not a number."""
    if v is None:
        return 0.0, 0.0
    if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(float(v)):
        return 2.0, 0.0
    return 1.0, float(v)


def _local_row(pool, k, sparsity, keep: bool) -> List[float]:
    """Count this rank's (checked) pool: entries, already deleted, non-finite, and the first of those."""
    weights, curvature, masks = pool.weights, pool.curvature, pool.masks
    row = [0.0] * _ROW
    row[_K_STATE], row[_K] = _code(k, numbers.Integral)
    row[_SPARSITY_STATE], row[_SPARSITY] = _code(sparsity, numbers.Real)
    row[_KEEP] = float(keep)
    row[_BAD_TENSOR] = -1.0
    row[_NUMEL] = float(pool.numel)
    row[_WIDE] = float(any(t.dtype == torch.float64 for t in (*weights, *curvature)))
    if not curvature:
        return row
    # Counted here, not by the kernel with k=0: that call would bump the version
    # counters of tensors it does not change.
    row[_BEFORE] = float(sum(int((~m).sum()) for m in masks))
    row[_NONFINITE] = float(sum(check_finite(pool, keep=True)))
    if row[_NONFINITE] and not keep:
        row[_BAD_TENSOR:_BAD_VALUE + 1] = _first_nonfinite(weights, curvature, masks)
    return row


def _check_agreement(rows: Tensor) -> None:
    for cols, name in (((_K_STATE, _K), "k"), ((_SPARSITY_STATE, _SPARSITY), "sparsity"), ((_KEEP,), "nonfinite")):
        vals = [tuple(r) for r in rows[:, list(cols)].tolist()]
        if any(v != vals[0] for v in vals):
            shown = [(None if v[0] == 0 else "invalid" if v[0] == 2 else v[1]) if len(v) == 2
                     else ("keep" if v[0] else "error") for v in vals]
            raise ValueError(f"{_OP}: {name} must be the same on every rank, got (per rank) {shown}")


def _nonfinite_error(rows: Tensor) -> ValueError:
    r = int(rows[:, _NONFINITE].gt(0).nonzero()[0, 0])
    i, j = int(rows[r, _BAD_TENSOR]), int(rows[r, _BAD_INDEX])
    pool = int(rows[:r, _NUMEL].sum()) + int(rows[r, _BAD_POOL])
    which = "weights" if rows[r, _BAD_IS_W] else "curvature"
    return ValueError(
        f"{_OP}: rank {r}: {which}[{i}] (that rank's local tensor {i}) has a non-finite value "
        f"({float(rows[r, _BAD_VALUE])}) at flat index {j} (global pool index {pool}); pass nonfinite='keep' to "
        "treat non-finite entries as never prunable"
    )


def _merge_stats(rows: Tensor) -> Tuple[int, float, float]:
    """(deleted, max, sum) over ranks: counts add, the max is by key, sums add in rank order."""
    now = int(rows[:, 0].sum())
    done = [float(v) for n, v in zip(rows[:, 0].tolist(), rows[:, 1].tolist()) if n > 0]
    best = max(done, key=order_key) if done else math.nan
    total = 0.0
    for v in rows[:, 2].tolist():
        total += v
    return now, best, total


def prune_global_sharded_(
    weights: Sequence[Tensor],
    curvature: Sequence[Tensor],
    *,
    k: Optional[int] = None,
    sparsity: Optional[float] = None,
    masks: Optional[Sequence[Tensor]] = None,
    factor: Optional[float] = 0.0,
    nonfinite: str = "error",
    group=None,
) -> ShardedSelection:
    """Global OBD selection over parameters sharded across ranks (call on every rank).

    The pool is the concatenation, in rank order, of every rank's local pieces
    (in their order): e.g. the views :func:`shard_flat` returns, or FSDP's
    local flat-parameter shards. Masks and written weights are bitwise those of
    :func:`obd_ext.prune_global_` on the unsharded tensors in the same order,
    ties included (equal saliencies go by global position). Only histograms and
    per-rank counts cross the wire; see the module docstring.

    Args:
        weights: this rank's pieces, any shapes and float dtypes, on one device
            (may be empty: a rank that owns nothing still takes part).
        curvature: one curvature tensor per piece (same shape).
        k: entries deleted wanted in the whole pool (already deleted ones
            count); the same on every rank.
        sparsity: or the fraction of the whole pool to have deleted, in [0, 1].
        masks: this rank's keep-masks (updated in place); all-kept if None.
        factor: multiply deleted weights by this (0 deletes); None only writes masks.
        nonfinite: "error" raises on every rank, naming the rank, local tensor
            and position of the first NaN/Inf; "keep" never prunes such entries.
        group: the process group (default: the world).

    Returns:
        A :class:`ShardedSelection`: this rank's masks, global statistics.

    Raises:
        TypeError, ValueError: on every rank together, before anything is
            written: a bad argument on any rank (that rank raises its own
            error, the others name it), or a non-finite entry.
    """
    return _prune_sharded(weights, curvature, k, sparsity, masks, factor, nonfinite, group, copy_masks=False)


def _prune_sharded(weights_in, curvature_in, k, sparsity, masks_in, factor, nonfinite, group, copy_masks: bool):
    rank, _ = _group_info(group, _OP)
    error: Optional[BaseException] = None
    row = [0.0] * _ROW
    skip = False
    weights = curvature = masks = []
    try:
        factor, skip = check_factor(factor), check_nonfinite(nonfinite)
        pool = check_pool(_OP, weights_in, curvature_in, masks_in, writes_weights=factor is not None)
        if copy_masks and masks_in is not None:
            pool.masks = [m.clone() for m in pool.masks]
        weights, curvature, masks = pool.weights, pool.curvature, pool.masks
        row = _local_row(pool, k, sparsity, skip)
    except (ValueError, TypeError, RuntimeError) as e:
        error = e
    device = _comm_device(curvature if curvature else [t for t in _tensors(curvature_in)], group)
    rows = _exchange(_OP, row, error, device, group)
    _check_agreement(rows)
    n = int(rows[:, _NUMEL].sum())
    if rows[:, _NONFINITE].sum() > 0 and not skip:
        raise _nonfinite_error(rows)
    bad = int(rows[:, _NONFINITE].sum()) if skip else 0
    try:
        k = resolve_k(k, sparsity, n, "the number of entries in the whole pool", bad)
    except ValueError as e:
        raise ValueError(f"{_OP}: {e}") from None
    before = int(rows[:, _BEFORE].sum())
    want = max(k - before, 0)
    wide = bool(rows[:, _WIDE].max() > 0)
    local_before = int(rows[rank, _BEFORE])
    local = Selection(masks, deleted_before=local_before, skipped_nonfinite=int(rows[rank, _NONFINITE]) if skip else 0)
    sel = ShardedSelection(masks, deleted_before=before, skipped_nonfinite=bad, numel=n, local=local)
    if want == 0:
        return sel
    mine = _local_deletions(weights, curvature, masks, wide, want, rank, device, group)
    stats, error = [0.0, math.nan, 0.0], None
    try:
        if mine:
            with torch.no_grad():
                st = ops.global_select_(weights, curvature, masks, local_before + mine, factor, skip).tolist()
            local.deleted_now, local.max_saliency = int(st[STAT_DELETED_NOW]), st[STAT_MAX_DELETED]
            local.predicted_increase = st[STAT_SALIENCY_SUM]
            if local.deleted_now != mine:
                raise RuntimeError(f"{_OP}: rank {rank} deleted {sel.local.deleted_now} entries, expected {mine}")
        stats = [float(local.deleted_now), local.max_saliency, local.predicted_increase]
    except RuntimeError as e:
        error = e
    sel.deleted_now, sel.max_saliency, sel.predicted_increase = _merge_stats(_exchange(_OP, stats, error, device,
                                                                                       group))
    return sel


def select_global_sharded(
    weights: Sequence[Tensor],
    curvature: Sequence[Tensor],
    *,
    k: Optional[int] = None,
    sparsity: Optional[float] = None,
    masks: Optional[Sequence[Tensor]] = None,
    nonfinite: str = "error",
    group=None,
) -> ShardedSelection:
    """Like :func:`prune_global_sharded_` but leaves the weights and the input masks untouched."""
    return _prune_sharded(weights, curvature, k, sparsity, masks, None, nonfinite, group, copy_masks=True)
