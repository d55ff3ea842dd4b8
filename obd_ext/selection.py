"""Saliency-based selection for users: counts or sparsities, scopes, names.

Every function here takes weights and curvatures (the diagonal of the Hessian,
or any per-entry curvature estimate), computes OBD saliency ``s = h w^2 / 2``
inside the kernels, and deletes the lowest-saliency entries within a *scope*:

- ``global``: one pool over all tensors (the paper's rule; exact k, no concat);
- ``layer``: each tensor its own pool, same sparsity everywhere;
- ``row``: each output row its own pool (what works best for LLMs);
- ``nm``: N:M, keep ``n`` of every ``m`` consecutive inputs (2:4 for GPUs);
- ``group``: structured; whole units / conv channels by summed saliency.

Masks are bool *keep* masks (``True`` = kept), as in ``torch.nn.utils.prune``.
Entries already deleted count towards the target and stay deleted. Functions
ending in ``_`` also write the weights in place: deleted entries are zeroed,
or multiplied by ``factor`` (the paper's "decrease instead of delete").
Equal saliencies are deleted in order of tensor index, then flat index.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .constants import STAT_DELETED_BEFORE, STAT_DELETED_NOW, STAT_MAX_DELETED, STAT_SALIENCY_SUM, STAT_SKIPPED

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

SCOPES = ("global", "layer", "row", "nm", "group")


@dataclass
class Selection:
    """What a selection did.

    Attributes:
        masks: one bool keep-mask per tensor (``True`` = kept).
        deleted_now: entries deleted by this call.
        deleted_before: entries that were already deleted on entry.
        skipped_nonfinite: non-finite entries left alone (``nonfinite="keep"``).
        max_saliency: largest saliency deleted by this call (NaN if none).
        predicted_increase: sum of the deleted saliencies: OBD's prediction
            of the increase of the objective (EQUATIONS.md, eq. 3).
    """

    masks: List[Tensor]
    deleted_now: int = 0
    deleted_before: int = 0
    skipped_nonfinite: int = 0
    max_saliency: float = math.nan
    predicted_increase: float = 0.0
    per_tensor: List["Selection"] = field(default_factory=list, repr=False)

    def _add(self, stats: Tensor) -> None:
        """Accumulate the float64 statistics an op returned."""
        st = stats.tolist()
        _merge(self, Selection([], int(st[STAT_DELETED_NOW]), int(st[STAT_DELETED_BEFORE]), int(st[STAT_SKIPPED]),
                               st[STAT_MAX_DELETED], st[STAT_SALIENCY_SUM]))

    @property
    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks)
        return (self.deleted_now + self.deleted_before) / total if total else 0.0


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
# Argument rules (one place each)
# ---------------------------------------------------------------------------


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Raise ValueError unless ``sparsity`` is a real number in [0, 1]."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def count_for_sparsity(sparsity: float, n: int) -> int:
    """Entries deleted at ``sparsity`` out of ``n`` (rounded like torch.nn.utils.prune)."""
    return int(round(check_sparsity(sparsity) * n))


def _resolve_k(k: Optional[int], sparsity: Optional[float], n: int, what: str) -> int:
    if (k is None) == (sparsity is None):
        raise ValueError(f"give exactly one of k and sparsity, got k={k!r}, sparsity={sparsity!r}")
    if sparsity is not None:
        return count_for_sparsity(sparsity, n)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] ({what}), got {k}")
    return int(k)


def _skip(nonfinite: str) -> bool:
    if nonfinite not in ("error", "keep"):
        raise ValueError(f"nonfinite must be 'error' or 'keep', got {nonfinite!r}")
    return nonfinite == "keep"


def _factor(factor: Optional[float]) -> Optional[float]:
    if factor is None:
        return None
    if not isinstance(factor, numbers.Real) or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number, got {factor!r}")
    return float(factor)


def _masks(masks: Optional[Sequence[Tensor]], like: Sequence[Tensor]) -> List[Tensor]:
    if masks is None:
        return [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in like]
    masks = list(masks)
    if len(masks) != len(like):
        raise ValueError(f"masks must have one tensor per weight: got {len(masks)} masks for {len(like)} weights")
    return masks


def _named(fn, names, *args):
    """Call an op without autograd; on error, add the user's tensor names to the message.

    ``names`` is a list (pool ops: 'weights[i]' gains the i-th name), a single
    name (one-tensor ops: the message is prefixed with it), or None.
    """
    try:
        with torch.no_grad():
            return fn(*args)
    except RuntimeError as e:
        if not names:
            raise
        if isinstance(names, str):
            raise RuntimeError(f"{names}: {e}") from None
        msg = re.sub(
            r"\b(weights|curvatures|masks)\[(\d+)\]",
            lambda m: f"{m.group(0)} ('{names[int(m.group(2))]}')" if int(m.group(2)) < len(names) else m.group(0),
            str(e),
        )
        raise RuntimeError(msg) from None


# ---------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------


def prune_global_(
    weights: Sequence[Tensor],
    curvatures: Sequence[Tensor],
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
        weights: tensors of any shapes and float dtypes, on one device.
        curvatures: one curvature tensor per weight (same shape, any float dtype).
        k: number of deleted entries wanted in total (already deleted ones count).
        sparsity: or the fraction of all entries to have deleted, in [0, 1].
        masks: current keep-masks (updated in place); all-kept if None.
        factor: multiply deleted weights by this (0 deletes); None leaves the
            weights untouched and only writes masks.
        nonfinite: "error" (default) raises on NaN/Inf naming the tensor and
            position; "keep" treats such entries as never prunable.
        names: tensor names for error messages (e.g. parameter names).

    Returns:
        A :class:`Selection` with the masks and what was deleted.
    """
    weights, curvatures = list(weights), list(curvatures)
    if len(weights) != len(curvatures):
        raise ValueError(f"weights and curvatures must pair up, got {len(weights)} and {len(curvatures)}")
    masks = _masks(masks, curvatures)
    n = sum(h.numel() for h in curvatures)
    k = _resolve_k(k, sparsity, n, "the number of entries")
    sel = Selection(masks)
    if not curvatures:
        return sel
    sel._add(_named(ops.global_select_, names, weights, curvatures, masks, k, _factor(factor), _skip(nonfinite)))
    return sel


def select_global(
    weights: Sequence[Tensor],
    curvatures: Sequence[Tensor],
    *,
    k: Optional[int] = None,
    sparsity: Optional[float] = None,
    masks: Optional[Sequence[Tensor]] = None,
    nonfinite: str = "error",
    names: Optional[Sequence[str]] = None,
) -> Selection:
    """Like :func:`prune_global_` but leaves the weights untouched and the input masks too."""
    masks = None if masks is None else [m.clone() for m in masks]
    return prune_global_(
        weights, curvatures, k=k, sparsity=sparsity, masks=masks, factor=None, nonfinite=nonfinite, names=names
    )


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
    scores = list(scores)
    masks = _masks(masks, scores)
    k = _resolve_k(k, sparsity, sum(s.numel() for s in scores), "the number of entries")
    sel = Selection(masks)
    if scores:
        sel._add(_named(ops.global_select_, names, [], scores, masks, k, None, _skip(nonfinite)))
    return sel


def prune_layers_(
    weights: Sequence[Tensor],
    curvatures: Sequence[Tensor],
    *,
    sparsity: float,
    masks: Optional[Sequence[Tensor]] = None,
    factor: Optional[float] = 0.0,
    nonfinite: str = "error",
    names: Optional[Sequence[str]] = None,
) -> Selection:
    """Each tensor its own pool, every one pruned to ``sparsity``."""
    weights, curvatures = list(weights), list(curvatures)
    masks = _masks(masks, curvatures)
    sel = Selection(masks)
    for i, (w, h, m) in enumerate(zip(weights, curvatures, masks)):
        part = prune_global_(
            [w], [h], sparsity=sparsity, masks=[m], factor=factor, nonfinite=nonfinite,
            names=[names[i]] if names else None,
        )
        sel.per_tensor.append(part)
        _merge(sel, part)
    return sel


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
    """Each output row (dim 0; other dims flattened) its own pool, ``k`` deleted per row."""
    mask = _masks(None if mask is None else [mask], [curvature])[0]
    cols = weight.numel() // weight.shape[0] if weight.dim() and weight.shape[0] else max(weight.numel(), 1)
    k = _resolve_k(k, sparsity, cols, "entries per row")
    sel = Selection([mask])
    sel._add(_named(ops.row_select_, name, weight, curvature, mask, k, _factor(factor),
                    _skip(nonfinite)))
    return sel


def prune_nm_(
    weight: Tensor,
    curvature: Tensor,
    n: int = 2,
    m: int = 4,
    *,
    mask: Optional[Tensor] = None,
    factor: Optional[float] = 0.0,
    nonfinite: str = "error",
    name: Optional[str] = None,
) -> Selection:
    """Keep the ``n`` most salient of every ``m`` consecutive entries along the input dimension."""
    mask = _masks(None if mask is None else [mask], [curvature])[0]
    sel = Selection([mask])
    sel._add(_named(ops.nm_select_, name, weight, curvature, mask, n, m, _factor(factor),
                    _skip(nonfinite)))
    return sel


def prune_groups_(
    weights: Sequence[Tensor],
    curvatures: Sequence[Tensor],
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
    per entry (a deleted group is False everywhere).
    """
    weights, curvatures = list(weights), list(curvatures)
    masks = _masks(masks, curvatures)
    scores = [_named(ops.group_saliency, names[i] if names else None, w, h, dim)
              for i, (w, h) in enumerate(zip(weights, curvatures))]
    # A group is deleted already when every one of its entries is.
    group_masks = [_any_except(m, dim) for m in masks]
    if per_tensor:
        parts = [
            select_scores([s], k=k, sparsity=sparsity, masks=[g], nonfinite=nonfinite) for s, g in zip(scores, group_masks)
        ]
    else:
        parts = [select_scores(scores, k=k, sparsity=sparsity, masks=group_masks, nonfinite=nonfinite, names=names)]
    sel = Selection(masks)
    for p in parts:
        _merge(sel, p)
    for w, m, g in zip(weights, masks, group_masks):
        keep = _expand(g, m, dim)
        newly = m & ~keep
        m &= keep
        if factor is not None:
            with torch.no_grad():
                w.copy_(torch.where(newly, torch.zeros_like(w) if factor == 0.0 else w * factor, w))
    return sel


def _any_except(mask: Tensor, dim: int) -> Tensor:
    others = [d for d in range(mask.dim()) if d != dim % mask.dim()]
    return mask.any(dim=others) if others else mask.clone()


def _expand(group_mask: Tensor, like: Tensor, dim: int) -> Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return group_mask.reshape(shape).expand_as(like)


def prune_(
    weights: Sequence[Tensor],
    curvatures: Sequence[Tensor],
    *,
    sparsity: float,
    scope: str = "global",
    masks: Optional[Sequence[Tensor]] = None,
    factor: Optional[float] = 0.0,
    n: int = 2,
    m: int = 4,
    dim: int = 0,
    nonfinite: str = "error",
    names: Optional[Sequence[str]] = None,
) -> Selection:
    """One entry point for every scope (see the module docstring).

    For ``scope="nm"`` the sparsity is implied by ``n:m`` and ``sparsity`` must
    equal ``1 - n/m`` (or be given as that value) so that intent is explicit.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    check_sparsity(sparsity)
    weights, curvatures = list(weights), list(curvatures)
    if scope == "global":
        return prune_global_(weights, curvatures, sparsity=sparsity, masks=masks, factor=factor, nonfinite=nonfinite,
                             names=names)
    if scope == "layer":
        return prune_layers_(weights, curvatures, sparsity=sparsity, masks=masks, factor=factor, nonfinite=nonfinite,
                             names=names)
    if scope == "group":
        return prune_groups_(weights, curvatures, sparsity=sparsity, dim=dim, masks=masks, factor=factor,
                             nonfinite=nonfinite, names=names)
    if scope == "nm" and not math.isclose(sparsity, 1 - n / m):
        raise ValueError(f"scope='nm' with n={n}, m={m} means sparsity {1 - n / m:g}, got sparsity={sparsity}")
    masks = _masks(masks, curvatures)
    sel = Selection(masks)
    for i, (w, h, mk) in enumerate(zip(weights, curvatures, masks)):
        name = names[i] if names else None
        if scope == "row":
            part = prune_rows_(w, h, sparsity=sparsity, mask=mk, factor=factor, nonfinite=nonfinite, name=name)
        else:
            part = prune_nm_(w, h, n, m, mask=mk, factor=factor, nonfinite=nonfinite, name=name)
        sel.per_tensor.append(part)
        _merge(sel, part)
    return sel
