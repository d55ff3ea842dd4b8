"""Saliency-based selection for users: counts or sparsities, scopes, N:M patterns, names.

Every function here takes weights and curvature (the diagonal of the Hessian,
or any per-entry curvature estimate), computes OBD saliency ``s = h w^2 / 2``
inside the kernels, and deletes the lowest-saliency entries within a *scope*
(:data:`obd_ext.vocabulary.SCOPES`):

- ``global``: one pool over all tensors (the paper's rule; exact k, no concat);
- ``layer``: each tensor its own pool, same sparsity everywhere;
- ``row``: each output row its own pool (what works best for LLMs);
- ``group``: structured; whole units / conv channels by summed saliency.

and a *pattern*: ``"unstructured"``, or ``"N:M"`` such as ``"2:4"`` (keep the
N most salient of every M consecutive inputs, within each row; sparsity
1 - N/M).

Masks are bool *keep* masks (``True`` = kept), as in ``torch.nn.utils.prune``.
Entries already deleted count towards the target and stay deleted. Functions
ending in ``_`` also write the weights in place: deleted entries are zeroed,
or multiplied by ``factor`` (the paper's "decrease instead of delete").
Equal saliencies are deleted in order of tensor index, then flat index.

Every call is atomic: all arguments are checked
(:mod:`obd_ext.selection_checks`) before anything is written, so an error
leaves every weight and mask as it was. The writes are real in-place
operations: they bump the tensors' version counters like ``Tensor.mul_``, so a
backward through a graph that saved a pruned weight raises instead of using
the new values.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from .constants import STAT_DELETED_BEFORE, STAT_DELETED_NOW, STAT_MAX_DELETED, STAT_SALIENCY_SUM, STAT_SKIPPED
from .selection_checks import (Pool, check_factor, check_finite, check_nonfinite, check_pool, check_sparsity,
                               count_for_sparsity, resolve_counts, resolve_k)
from .vocabulary import SCOPES, check_pattern_sparsity, check_scope, parse_pattern

__all__ = [
    "Selection",
    "SCOPES",
    "check_sparsity",
    "count_for_sparsity",
    "select_global",
    "prune_global_",
    "select_scores",
    "prune_layers_",
    "prune_rows_",
    "prune_nm_",
    "prune_groups_",
    "prune_",
]

# The N:M kernels keep at most this many entries per group in registers.
_MAX_M = 1024

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # obd_ext/, for warnings' stack levels


@dataclass(repr=False)
class Selection:
    """What a selection did.

    Attributes:
        masks: one bool keep-mask per tensor (``True`` = kept).
        deleted_now: entries deleted by this call.
        deleted_before: entries that were already deleted on entry.
        skipped_nonfinite: non-finite entries left alone (``nonfinite="keep"``).
        max_saliency: largest saliency deleted by this call (NaN if none).
        predicted_increase: sum of the deleted saliencies: OBD's prediction
            of the increase of the objective (the paper's eq. 3).
        per_tensor: for the per-tensor scopes of :func:`prune_` and
            :func:`prune_layers_`, one Selection per tensor.
    """

    masks: List[Tensor]
    deleted_now: int = 0
    deleted_before: int = 0
    skipped_nonfinite: int = 0
    max_saliency: float = math.nan
    predicted_increase: float = 0.0
    per_tensor: List["Selection"] = field(default_factory=list)

    def _add(self, stats: Tensor) -> None:
        """Accumulate the float64 statistics an op returned."""
        st = stats.tolist()
        _merge(self, Selection([], int(st[STAT_DELETED_NOW]), int(st[STAT_DELETED_BEFORE]), int(st[STAT_SKIPPED]),
                               st[STAT_MAX_DELETED], st[STAT_SALIENCY_SUM]))

    @property
    def numel(self) -> int:
        """Entries of all the masks."""
        return sum(m.numel() for m in self.masks)

    @property
    def sparsity(self) -> float:
        """Fraction of all entries deleted after the call."""
        total = self.numel
        return (self.deleted_now + self.deleted_before) / total if total else 0.0

    def _summary(self) -> str:
        return (f"tensors={len(self.masks)}, numel={self.numel}, deleted_now={self.deleted_now}, "
                f"deleted_before={self.deleted_before}, sparsity={self.sparsity:.4g}, "
                f"skipped_nonfinite={self.skipped_nonfinite}, max_saliency={self.max_saliency:.6g}, "
                f"predicted_increase={self.predicted_increase:.6g}")

    def __repr__(self) -> str:
        # A summary, never the masks: a model's masks would print megabytes.
        return f"{type(self).__name__}({self._summary()})"


def _merge(total: Selection, part: Selection) -> None:
    """Add what ``part`` did to ``total`` (counts and sums add; the max is a max)."""
    total.deleted_now += part.deleted_now
    total.deleted_before += part.deleted_before
    total.skipped_nonfinite += part.skipped_nonfinite
    total.predicted_increase += part.predicted_increase
    if not math.isnan(part.max_saliency):
        total.max_saliency = (
            part.max_saliency if math.isnan(total.max_saliency) else max(total.max_saliency, part.max_saliency)
        )


# ---------------------------------------------------------------------------
# Inner functions: they trust their (checked) arguments.
# ---------------------------------------------------------------------------


def _run_global(pool: Pool, k: int, factor: Optional[float], keep: bool, counts_check=None) -> Selection:
    """One global_select_ call. Its kernel checks every entry before it writes (so a failure changes
    nothing); a failure is then explained with the user's names by :func:`_explain`."""
    sel = Selection(pool.masks)
    if pool.curvature:
        try:
            with torch.no_grad():
                stats = ops.global_select_(pool.weights, pool.curvature, pool.masks, k, factor, keep)
        except RuntimeError:
            if counts_check is not None:
                _explain(pool, keep, counts_check)
            raise
        sel._add(stats)
        warn_overflow(pool.where, sel)
    return sel


def warn_overflow(where: str, sel: Selection) -> None:
    """Warn when the deleted saliencies reach +-inf: entries tied there were deleted in index order.

    Finite inputs whose ``h w^2 / 2`` exceeds the saliency precision's range
    (float32 for float32/float16/bfloat16 inputs) round to +-inf; the
    selection stays exact below that, but among the overflowed entries it
    cannot order by the exact value. Only a selection whose boundary reaches
    them is affected, which its largest deleted saliency shows at no cost.
    """
    parts = sel.per_tensor or [sel]
    if any(math.isinf(p.max_saliency) for p in parts):
        warnings.warn(f"{where}: some saliencies h*w^2/2 overflowed to {max(p.max_saliency for p in parts):g} and "
                      "entries tied there were deleted in index order, not by their exact saliency (and "
                      "predicted_increase is infinite); pass float64 weights and curvature for the exact order",
                      stacklevel=_caller_level())


def _caller_level() -> int:
    """warnings.warn's stacklevel of the first frame outside obd_ext (the public entry points nest)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _explain(pool: Pool, keep: bool, counts_check) -> None:
    """After a kernel refused its arguments (writing nothing): raise the named error that says why.

    The kernels check finiteness (and, with ``nonfinite="keep"``, whether
    enough finite entries are left) in the pass they need anyway, so the
    common, valid call pays for no extra pass; only a failing call pays for
    finding the culprit here. Returns if nothing is found (the caller re-raises).
    """
    bad = check_finite(pool, keep)  # raises for a non-finite entry when keep is False
    if keep:
        counts_check(bad)


def _run_each(pool: Pool, ks: Sequence[int], factor: Optional[float], keep: bool, rows: bool,
              nm: Optional[tuple] = None, counts_check=None) -> Selection:
    """One selection per tensor (layer, row or N:M), with per-tensor results.

    With several tensors the caller has checked all of them first (a kernel
    refusing tensor 2 would come after tensor 1 was written); a single
    tensor's kernel checks it before writing, and a failure is explained.
    """
    sel = Selection(pool.masks)
    with torch.no_grad():
        for i, (h, m) in enumerate(zip(pool.curvature, pool.masks)):
            part = Selection([m])
            w = pool.weights[i]
            try:
                if nm is not None:
                    stats = ops.nm_select_(w, h, m, nm[0], nm[1], factor, keep)
                elif rows:
                    stats = ops.row_select_(w, h, m, ks[i], factor, keep)
                else:
                    stats = ops.global_select_([w], [h], [m], ks[i], factor, keep)
            except RuntimeError:
                if len(pool.curvature) == 1 and counts_check is not None:
                    _explain(pool, keep, counts_check)
                raise
            part._add(stats)
            sel.per_tensor.append(part)
            _merge(sel, part)
    warn_overflow(pool.where, sel)
    return sel


def _rows_cols(shape) -> tuple:
    """Rows of a weight: dim 0, everything else flattened (a conv's output channel)."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _segments(t: Tensor, nm: Optional[tuple]) -> Tensor:
    """``t`` as (segments x entries): rows, or N:M groups along the input dimension."""
    if nm is None:
        return t.reshape(_rows_cols(t.shape))
    m = nm[1]
    d = 1 if t.dim() >= 2 else 0
    c = t.shape[d]
    outer, inner = math.prod(t.shape[:d]), math.prod(t.shape[d + 1:])
    return t.reshape(outer, c // m, m, inner).permute(0, 1, 3, 2).reshape(-1, m)


def _check_segments(pool: Pool, bad: Sequence[int], target: Sequence[int], nm: Optional[tuple]) -> None:
    """With non-finite entries kept, every segment must still hold the entries it has to delete."""
    for i, nbad in enumerate(bad):
        if not nbad:
            continue
        w, h, m = pool.weights[i], pool.curvature[i], pool.masks[i]
        alive = _segments(m, nm)
        finite = _segments(torch.isfinite(w) & torch.isfinite(h), nm)
        want = (target[i] - (~alive).sum(1)).clamp(min=0)
        short = (want > (alive & finite).sum(1)).nonzero()
        if short.numel():
            s = int(short[0, 0])
            what = f"row {s}" if nm is None else f"{nm[0]}:{nm[1]} group {s}"
            raise ValueError(f"{pool.where}: {what} of {pool.label(pool.weights_arg, i)} has too few finite entries "
                             f"to delete the {target[i]} wanted (its non-finite ones are kept, nonfinite='keep')")


def check_nm_shapes(where: str, pattern: str, nm: tuple, labelled: Iterable[Tuple[str, Tensor]]) -> None:
    """Raise unless M is supported and each (label, weight)'s input dimension is a multiple of M."""
    if nm[1] > _MAX_M:
        raise ValueError(f"{where}: pattern {pattern!r}: M must be at most {_MAX_M}")
    for label, w in labelled:
        d = 1 if w.dim() >= 2 else 0
        if w.dim() == 0 or w.shape[d] % nm[1]:
            raise ValueError(f"{where}: pattern {pattern!r} needs the input dimension (dim {d}) of {label} to be a "
                             f"multiple of {nm[1]}, got shape {tuple(w.shape)}")


def _check_nm_shape(pool: Pool, nm: tuple, pattern: str) -> None:
    check_nm_shapes(pool.where, pattern, nm, ((pool.label(pool.weights_arg, i), w) for i, w in enumerate(pool.weights)))


def _nm_of(pattern: str, where: str) -> tuple:
    nm = parse_pattern(pattern)
    if nm is None:
        raise ValueError(f"{where}: needs an N:M pattern such as '2:4', got {pattern!r}")
    return nm


# ---------------------------------------------------------------------------
# Public entry points: each checks everything once, then runs.
# ---------------------------------------------------------------------------


def prune_global_(
    weights: Sequence[Tensor],
    curvature: Sequence[Tensor],
    *,
    k: Optional[int] = None,
    sparsity: Optional[float] = None,
    masks: Optional[Sequence[Tensor]] = None,
    factor: Optional[float] = 0.0,
    nonfinite: str = "error",
    names: Optional[Sequence[str]] = None,
) -> Selection:
    """Delete the lowest-saliency entries over all tensors as one pool.

    Args:
        weights: tensors of any shapes and float dtypes, on one device, each
            passed once (no two may share memory).
        curvature: one curvature tensor per weight (same shape, any float dtype).
        k: number of deleted entries wanted in total (already deleted ones count).
        sparsity: or the fraction of all entries to have deleted, in [0, 1].
        masks: current keep-masks (updated in place); all-kept if None.
        factor: multiply deleted weights by this (0 deletes); None leaves the
            weights untouched and only writes masks.
        nonfinite: "error" (default) raises on NaN/Inf in a kept entry, naming
            the tensor and position; "keep" treats such entries as never prunable.
        names: tensor names for error messages (e.g. parameter names).

    Returns:
        A :class:`Selection` with the masks and what was deleted.

    Raises:
        TypeError, ValueError: a bad argument, named; nothing was written.
    """
    return _prune_global("obd_ext.prune_global_", weights, curvature, k, sparsity, masks, factor, nonfinite, names)


def _prune_global(where, weights, curvature, k, sparsity, masks, factor, nonfinite, names) -> Selection:
    factor, keep = check_factor(factor), check_nonfinite(nonfinite)
    pool = check_pool(where, weights, curvature, masks, names=names, writes_weights=factor is not None)
    return _run_global(pool, _pool_k(pool, k, sparsity), factor, keep, _pool_check(pool, k, sparsity))


def select_global(
    weights: Sequence[Tensor],
    curvature: Sequence[Tensor],
    *,
    k: Optional[int] = None,
    sparsity: Optional[float] = None,
    masks: Optional[Sequence[Tensor]] = None,
    nonfinite: str = "error",
    names: Optional[Sequence[str]] = None,
) -> Selection:
    """Like :func:`prune_global_` but leaves the weights and the input masks untouched (new masks returned)."""
    where = "obd_ext.select_global"
    keep = check_nonfinite(nonfinite)
    pool = check_pool(where, weights, curvature, masks, names=names, writes_weights=False)
    count = _pool_k(pool, k, sparsity)
    pool.masks = [m.clone() for m in pool.masks] if masks is not None else pool.masks
    return _run_global(pool, count, None, keep, _pool_check(pool, k, sparsity))


def select_scores(
    scores: Sequence[Tensor],
    *,
    k: Optional[int] = None,
    sparsity: Optional[float] = None,
    masks: Optional[Sequence[Tensor]] = None,
    nonfinite: str = "error",
    names: Optional[Sequence[str]] = None,
) -> Selection:
    """Global selection on precomputed scores (lowest deleted first); masks updated in place."""
    where = "obd_ext.select_scores"
    keep = check_nonfinite(nonfinite)
    pool = check_pool(where, None, scores, masks, names=names, writes_weights=False, curvature_arg="scores")
    return _run_global(pool, _pool_k(pool, k, sparsity), None, keep, _pool_check(pool, k, sparsity))


def prune_layers_(
    weights: Sequence[Tensor],
    curvature: Sequence[Tensor],
    *,
    sparsity: float,
    masks: Optional[Sequence[Tensor]] = None,
    factor: Optional[float] = 0.0,
    nonfinite: str = "error",
    names: Optional[Sequence[str]] = None,
) -> Selection:
    """Each tensor its own pool, every one pruned to ``sparsity`` (arguments as in :func:`prune_global_`)."""
    return _prune_layers("obd_ext.prune_layers_", weights, curvature, sparsity, masks, factor, nonfinite, names)


def _prune_layers(where, weights, curvature, sparsity, masks, factor, nonfinite, names) -> Selection:
    if sparsity is None:
        raise ValueError(f"{where}: sparsity is required (each tensor is pruned to it)")
    factor, keep = check_factor(factor), check_nonfinite(nonfinite)
    pool = check_pool(where, weights, curvature, masks, names=names, writes_weights=factor is not None)
    ns = [h.numel() for h in pool.curvature]

    def counts(bad):
        return _counts(pool, None, sparsity, ns, "entries of", bad)

    bad = check_finite(pool, keep) if len(ns) > 1 else None  # several kernel calls: check all before the first
    return _run_each(pool, counts(bad), factor, keep, rows=False, counts_check=counts)


def _pool_k(pool: Pool, k, sparsity) -> int:
    """The count of a global pool (the kernel checks it against the non-finite entries it skips)."""
    return _k(pool, k, sparsity, pool.numel, "the number of entries", 0)


def _pool_check(pool: Pool, k, sparsity):
    """What :func:`_explain` checks with the non-finite counts once a global kernel refused."""
    return lambda bad: _k(pool, k, sparsity, pool.numel, "the number of entries", sum(bad))


def _k(pool: Pool, k, sparsity, n: int, what: str, bad: int) -> int:
    """resolve_k with the function's name on its errors."""
    try:
        return resolve_k(k, sparsity, n, what, bad)
    except ValueError as e:
        raise ValueError(f"{pool.where}: {e}") from None


def _counts(pool: Pool, k, sparsity, ns, what: str, bad=None) -> List[int]:
    """resolve_counts with the tensors' labels, and the function's name on its errors."""
    whats = [f"{what} {pool.label(pool.weights_arg, i)}" for i in range(len(ns))]
    try:
        return resolve_counts(k, sparsity, ns, whats, bad)
    except ValueError as e:
        raise ValueError(f"{pool.where}: {e}") from None


def prune_rows_(
    weight: Tensor,
    curvature: Tensor,
    *,
    k: Optional[int] = None,
    sparsity: Optional[float] = None,
    mask: Optional[Tensor] = None,
    factor: Optional[float] = 0.0,
    nonfinite: str = "error",
    name: Optional[str] = None,
) -> Selection:
    """Each output row (dim 0; other dims flattened) its own pool, ``k`` deleted per row.

    Args:
        weight: a tensor of any float dtype (a scalar is one row of one entry).
        curvature: its curvature (same shape, any float dtype).
        k: deleted entries wanted per row (already deleted ones count).
        sparsity: or the fraction of each row to have deleted, in [0, 1].
        mask: the current keep-mask (updated in place); all-kept if None.
        factor, nonfinite: as in :func:`prune_global_`.
        name: the tensor's name for error messages.
    """
    return _prune_rows("obd_ext.prune_rows_", [weight], [curvature], k, sparsity,
                       None if mask is None else [mask], factor, nonfinite, None if name is None else [name], True)


def _prune_rows(where, weights, curvature, k, sparsity, masks, factor, nonfinite, names, single) -> Selection:
    factor, keep = check_factor(factor), check_nonfinite(nonfinite)
    pool = _pool(where, weights, curvature, masks, names, factor, single)
    ks = _counts(pool, k, sparsity, [_rows_cols(w.shape)[1] for w in pool.weights], "entries per row of")

    def segments(bad):
        _check_segments(pool, bad, ks, None)

    if len(ks) > 1:  # several kernel calls: check all before the first
        segments(check_finite(pool, keep))
    sel = _run_each(pool, ks, factor, keep, rows=True, counts_check=segments)
    return _single(sel) if single else sel


def prune_nm_(
    weight: Tensor,
    curvature: Tensor,
    pattern: str = "2:4",
    *,
    mask: Optional[Tensor] = None,
    factor: Optional[float] = 0.0,
    nonfinite: str = "error",
    name: Optional[str] = None,
) -> Selection:
    """Keep the N most salient of every M consecutive entries along the input dimension.

    The input dimension is dim 1 of a Linear (out x in) or conv (out x in x
    kh x kw) weight, dim 0 of a vector; its size must be a multiple of M.

    Args:
        weight, curvature: as in :func:`prune_rows_`.
        pattern: ``"N:M"`` such as ``"2:4"`` (keep 2 of every 4; sparsity 1 - N/M).
        mask, factor, nonfinite, name: as in :func:`prune_rows_`.
    """
    return _prune_nm("obd_ext.prune_nm_", [weight], [curvature], pattern, None if mask is None else [mask], factor,
                     nonfinite, None if name is None else [name], True)


def _prune_nm(where, weights, curvature, pattern, masks, factor, nonfinite, names, single) -> Selection:
    nm = _nm_of(pattern, where)
    factor, keep = check_factor(factor), check_nonfinite(nonfinite)
    pool = _pool(where, weights, curvature, masks, names, factor, single)
    _check_nm_shape(pool, nm, pattern)

    def segments(bad):
        _check_segments(pool, bad, [nm[1] - nm[0]] * len(bad), nm)

    if len(pool.weights) > 1:  # several kernel calls: check all before the first
        segments(check_finite(pool, keep))
    sel = _run_each(pool, [], factor, keep, rows=False, nm=nm, counts_check=segments)
    return _single(sel) if single else sel


def _pool(where, weights, curvature, masks, names, factor, single) -> Pool:
    if single:
        return check_pool(where, weights[0], curvature[0], None if masks is None else masks[0],
                          names=None if names is None else names[0], writes_weights=factor is not None, single=True)
    return check_pool(where, weights, curvature, masks, names=names, writes_weights=factor is not None)


def _single(sel: Selection) -> Selection:
    """A one-tensor call's result, without the redundant per-tensor list."""
    sel.per_tensor = []
    return sel


def prune_groups_(
    weights: Sequence[Tensor],
    curvature: Sequence[Tensor],
    *,
    k: Optional[int] = None,
    sparsity: Optional[float] = None,
    dim: int = 0,
    masks: Optional[Sequence[Tensor]] = None,
    factor: Optional[float] = 0.0,
    per_tensor: bool = False,
    nonfinite: str = "error",
    names: Optional[Sequence[str]] = None,
) -> Selection:
    """Structured pruning: delete whole slices along ``dim`` by their summed saliency.

    ``dim=0`` removes units of a Linear (their incoming weights) or output
    channels of a convolution. Groups compete globally unless ``per_tensor``.
    ``k`` / ``sparsity`` count groups, not entries. The returned masks are
    per entry (a deleted group is False everywhere). A group's saliency is
    summed in float64 when the float32 sum overflows, so finite inputs never
    give a non-finite group score.
    """
    return _prune_groups("obd_ext.prune_groups_", weights, curvature, k, sparsity, dim, masks, factor, per_tensor,
                         nonfinite, names)


def _prune_groups(where, weights, curvature, k, sparsity, dim, masks, factor, per_tensor, nonfinite, names):
    factor, keep = check_factor(factor), check_nonfinite(nonfinite)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{where}: dim must be an int, got {dim!r}")
    pool = check_pool(where, weights, curvature, masks, names=names, writes_weights=factor is not None)
    for i, w in enumerate(pool.weights):
        if not -w.dim() <= dim < w.dim():
            raise ValueError(f"{where}: dim={dim} is out of range for {pool.label(pool.weights_arg, i)} of shape "
                             f"{tuple(w.shape)}")
    with torch.no_grad():
        scores = [_group_scores(w, h, dim) for w, h in zip(pool.weights, pool.curvature)]
        # A group is deleted already when every one of its entries is.
        group_masks = [_any_except(m, dim) for m in pool.masks]
        bad = [int((g & ~torch.isfinite(s)).sum()) for s, g in zip(scores, group_masks)]
    if not keep and any(bad):
        check_finite(pool, keep)  # names a non-finite entry of the inputs, if there is one
        i = next(i for i, nbad in enumerate(bad) if nbad)
        raise ValueError(f"{where}: the summed saliency of {bad[i]} group(s) of {pool.label(pool.weights_arg, i)} "
                         f"along dim {dim} is not finite (a deleted entry is non-finite, or the float64 sum "
                         "overflows); pass nonfinite='keep' to keep such groups")
    if per_tensor:
        ks = _counts(pool, k, sparsity, [s.numel() for s in scores], "groups of", bad)
    else:
        ks = [_k(pool, k, sparsity, sum(s.numel() for s in scores), "groups in all", sum(bad))]
    # Everything is checked: from here on the call writes.
    sel = Selection(pool.masks)
    with torch.no_grad():
        if per_tensor:
            for s, g, kk in zip(scores, group_masks, ks):
                sel._add(ops.global_select_([], [s], [g], kk, None, keep))
        elif scores:
            sel._add(ops.global_select_([], scores, group_masks, ks[0], None, keep))
        for w, m, g in zip(pool.weights, pool.masks, group_masks):
            newly = m & ~_expand(g, m, dim)
            m.logical_and_(_expand(g, m, dim))
            if factor is not None:
                _scale_(w, newly, factor)
    return sel


def _group_scores(w: Tensor, h: Tensor, dim: int) -> Tensor:
    s = ops.group_saliency(w, h, dim)
    if s.dtype != torch.float64 and not bool(torch.isfinite(s).all()):
        # A float32 sum of finite saliencies overflowed: sum in float64 (exact order, finite).
        finite_inputs = torch.isfinite(w).all() & torch.isfinite(h).all()
        if bool(finite_inputs):
            s = ops.group_saliency(w.double(), h.double(), dim)
    return s


def _scale_(weight: Tensor, where: Tensor, factor: float) -> None:
    """Deleted weights multiplied by ``factor`` in float64 (exact zero for 0), as the kernels do."""
    if factor == 0.0:
        weight.masked_fill_(where, 0)
    else:
        weight.copy_(torch.where(where, (weight.double() * factor).to(weight.dtype), weight))


def _any_except(mask: Tensor, dim: int) -> Tensor:
    others = [d for d in range(mask.dim()) if d != dim % mask.dim()]
    return mask.any(dim=others) if others else mask.clone()


def _expand(group_mask: Tensor, like: Tensor, dim: int) -> Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return group_mask.reshape(shape).expand_as(like)


def prune_(
    weights: Sequence[Tensor],
    curvature: Sequence[Tensor],
    *,
    sparsity: Optional[float] = None,
    scope: Optional[str] = None,
    pattern: str = "unstructured",
    masks: Optional[Sequence[Tensor]] = None,
    factor: Optional[float] = 0.0,
    dim: int = 0,
    nonfinite: str = "error",
    names: Optional[Sequence[str]] = None,
) -> Selection:
    """One entry point for every scope and pattern (see the module docstring).

    Args:
        weights: the tensors to prune (each passed once).
        curvature: one curvature tensor per weight.
        sparsity: fraction of entries (of groups, for ``scope="group"``) to
            have deleted, in [0, 1]. Implied by an N:M pattern, where it may
            be left out or given as 1 - N/M; any other value is an error.
        scope: "global", "layer", "row" or "group"; None means the default,
            "global" (:func:`obd_ext.vocabulary.default_scope`). An N:M
            pattern works within rows: scope None or "row".
        pattern: "unstructured" (default) or "N:M" such as "2:4".
        masks: current keep-masks (updated in place); all-kept if None.
        factor: multiply deleted weights by this (0 deletes); None only writes masks.
        dim: the group dimension for ``scope="group"``.
        nonfinite: "error" or "keep" (see :func:`prune_global_`).
        names: tensor names for error messages.

    Returns:
        A :class:`Selection`; for the per-tensor scopes ("layer", "row", N:M)
        its ``per_tensor`` holds one Selection per tensor.
    """
    return prune_as("obd_ext.prune_", weights, curvature, sparsity=sparsity, scope=scope, pattern=pattern,
                    masks=masks, factor=factor, dim=dim, nonfinite=nonfinite, names=names)


def prune_as(where: str, weights, curvature, *, sparsity=None, scope=None, pattern="unstructured", masks=None,
             factor=0.0, dim=0, nonfinite="error", names=None) -> Selection:
    """:func:`prune_`, with errors and warnings naming ``where`` (the public call the user made)."""
    nm = parse_pattern(pattern)
    sparsity = check_pattern_sparsity(pattern, sparsity)
    if nm is not None:
        if scope not in (None, "row"):
            raise ValueError(f"{where}: pattern={pattern!r} selects within rows; scope must be None or 'row', "
                             f"got {scope!r}")
        return _prune_nm(where, weights, curvature, pattern, masks, factor, nonfinite, names, False)
    scope = check_scope(scope, SCOPES)
    if sparsity is None:
        raise ValueError(f"{where}: sparsity is required with pattern='unstructured' (scope={scope!r})")
    if scope == "global":
        return _prune_global(where, weights, curvature, None, sparsity, masks, factor, nonfinite, names)
    if scope == "layer":
        return _prune_layers(where, weights, curvature, sparsity, masks, factor, nonfinite, names)
    if scope == "row":
        return _prune_rows(where, weights, curvature, None, sparsity, masks, factor, nonfinite, names, False)
    return _prune_groups(where, weights, curvature, None, sparsity, dim, masks, factor, False, nonfinite, names)
