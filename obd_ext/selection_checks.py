"""The argument rules of the selection entry points, checked once at the door.

Every public selection function (:mod:`obd_ext.selection`,
:mod:`obd_ext.distributed`) checks *everything* it will touch with these
helpers before it writes anything, so that a call either succeeds or raises
with every weight and mask unchanged (version counters included). The inner
functions that run the kernels trust their arguments.

Errors name the function, the argument and the tensor the way the user
passed it: ``weights[1] ('conv.weight')`` when ``names=`` was given,
``weights[1]`` otherwise, ``weight ('fc')`` for the one-tensor functions.
Wrong types and dtypes raise ``TypeError``; wrong values, counts, shapes,
devices, aliasing and non-finite entries raise ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "Pool",
    "check_sparsity",
    "count_for_sparsity",
    "resolve_k",
    "resolve_counts",
    "check_nonfinite",
    "check_factor",
    "check_pool",
    "check_finite",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""The dtypes the selection kernels read for weights, curvature and scores."""


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Raise ValueError unless ``sparsity`` is a real number in [0, 1]; return it as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def count_for_sparsity(sparsity: float, n: int) -> int:
    """Entries deleted at ``sparsity`` out of ``n`` (rounded like torch.nn.utils.prune)."""
    return int(round(check_sparsity(sparsity) * n))


def resolve_k(k: Optional[int], sparsity: Optional[float], n: int, what: str, unavailable: int = 0) -> int:
    """The number of deleted entries wanted, from exactly one of ``k`` and ``sparsity``.

    Args:
        k: an integer in [0, n - unavailable], or None.
        sparsity: a number in [0, 1], or None; ``round(sparsity * n)`` entries.
        n: entries in the pool (or in one row, or groups: see ``what``).
        what: what ``n`` counts, for the error message.
        unavailable: entries that can never be deleted (non-finite ones kept
            with ``nonfinite="keep"``).

    Raises:
        ValueError: both or neither given, a non-integer k, or a count out of range.
    """
    return resolve_counts(k, sparsity, [n], [what], [unavailable])[0]


def resolve_counts(k: Optional[int], sparsity: Optional[float], ns: Sequence[int], whats: Sequence[str],
                   unavailable: Optional[Sequence[int]] = None) -> List[int]:
    """:func:`resolve_k` for several pools at once (layers, rows of several weights): one check of k/sparsity."""
    if (k is None) == (sparsity is None):
        raise ValueError(f"give exactly one of k and sparsity, got k={k!r}, sparsity={sparsity!r}")
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    elif isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an integer, got {k!r}")
    counts = []
    for i, (n, what) in enumerate(zip(ns, whats)):
        off = unavailable[i] if unavailable else 0
        if sparsity is not None:
            count = int(round(sparsity * n))  # rounded like torch.nn.utils.prune
        else:
            count = int(k)
            if not 0 <= count <= n:
                raise ValueError(f"k must be in [0, {n}] ({what}), got {count}")
        if count > n - off:
            given = f"sparsity={sparsity!r} means {count} deleted" if sparsity is not None else f"k={count}"
            raise ValueError(f"{given}, but only {n - off} of {n} ({what}) can be deleted: "
                             f"{off} are non-finite and kept (nonfinite='keep')")
        counts.append(count)
    return counts


def check_nonfinite(nonfinite: str) -> bool:
    """``nonfinite`` must be "error" or "keep"; returns True for "keep" (skip non-finite entries)."""
    if nonfinite not in ("error", "keep"):
        raise ValueError(f"nonfinite must be 'error' or 'keep', got {nonfinite!r}")
    return nonfinite == "keep"


def check_factor(factor: Optional[float]) -> Optional[float]:
    """``factor`` must be None (write masks only) or a finite real number; returns it as a float."""
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number (or None to leave the weights untouched), got {factor!r}")
    return float(factor)


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------


@dataclass
class Pool:
    """Checked tensors of one selection call, with the labels its errors use.

    Attributes:
        where: the public function, e.g. ``"obd_ext.prune_global_"``.
        weights: one per entry, or empty for precomputed scores.
        curvature: one per entry (the scores in score mode).
        masks: one bool keep-mask per entry: the caller's, or fresh all-True ones.
        names: the user's names, or None.
        single: a one-tensor function (labels without an index).
        weights_arg: the weights' argument name in messages ("weights" or "weight").
        curvature_arg: the curvature's argument name in messages ("curvature" or "scores").
    """

    where: str
    weights: List[Tensor]
    curvature: List[Tensor]
    masks: List[Tensor]
    names: Optional[List[str]]
    single: bool = False
    weights_arg: str = "weights"
    curvature_arg: str = "curvature"

    def label(self, arg: str, i: int) -> str:
        """``weights[1] ('conv.weight')``, or ``weight ('fc')`` for a one-tensor function."""
        base = arg if self.single else f"{arg}[{i}]"
        return f"{base} ({self.names[i]!r})" if self.names else base

    @property
    def numel(self) -> int:
        return sum(h.numel() for h in self.curvature)


def _as_list(x, arg: str, where: str, of: str = "tensors") -> list:
    if isinstance(x, Tensor):
        raise TypeError(f"{where}: {arg} must be a list of {of}, got a single Tensor (wrap it in a list)")
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        raise TypeError(f"{where}: {arg} must be a list of {of}, got {type(x).__name__}")
    return list(x)


def check_pool(
    where: str,
    weights: Optional[Sequence[Tensor]],
    curvature: Sequence[Tensor],
    masks: Optional[Sequence[Tensor]],
    *,
    names: Optional[Sequence[str]] = None,
    writes_weights: bool,
    single: bool = False,
    curvature_arg: str = "curvature",
) -> Pool:
    """Check the tensors of a selection call; return them as a :class:`Pool`.

    Checks, in order: the lists (types, lengths, pairing, names), each
    tensor's type, dtype, layout, shape and device, then aliasing: no tensor
    the call writes (every mask; every weight when ``writes_weights``) may
    share memory with any other argument, and no two weights may overlap (the
    same tensor twice in a pool is a mistake, e.g. a tied weight). Read-only
    curvature tensors may share memory with each other.

    Args:
        where: the public function, for messages.
        weights: the weights, or None for precomputed scores (score mode).
        curvature: one curvature (or score) tensor per weight.
        masks: one bool keep-mask per weight, or None for fresh all-True ones.
        names: one name per weight for messages, or None.
        writes_weights: whether the call writes the weights (factor is not None).
        single: labels without an index (``prune_rows_``, ``prune_nm_``).
        curvature_arg: the argument's name ("curvature", or "scores").

    Raises:
        TypeError: a non-tensor, or a tensor of the wrong dtype or layout.
        ValueError: unequal lengths, duplicate names, shape or device
            mismatches, overlapping memory.
    """
    w_arg = "weight" if single else "weights"
    c_arg = curvature_arg
    m_arg = "mask" if single else "masks"
    score_mode = weights is None
    curv = [curvature] if single else _as_list(curvature, c_arg, where)
    ws = [] if score_mode else ([weights] if single else _as_list(weights, w_arg, where))
    if not score_mode and len(ws) != len(curv):
        raise ValueError(f"{where}: {w_arg} and {c_arg} must pair up one to one, got {len(ws)} {w_arg} and "
                         f"{len(curv)} {c_arg} tensors")
    if names is not None:
        names = [names] if single else _as_list(names, "names", where, of="str")
        if len(names) != len(curv):
            raise ValueError(f"{where}: names must have one name per tensor, got {len(names)} names for {len(curv)} "
                             "tensors")
        seen: Dict[str, int] = {}
        for i, n in enumerate(names):
            if not isinstance(n, str):
                raise TypeError(f"{where}: {'name' if single else f'names[{i}]'} must be a str, got {type(n).__name__}")
            if n in seen:
                raise ValueError(f"{where}: names[{seen[n]}] and names[{i}] are both {n!r}; each tensor needs its "
                                 "own name")
            seen[n] = i
    user_masks = masks is not None
    if user_masks:
        ms = [masks] if single else _as_list(masks, m_arg, where)
        if len(ms) != len(curv):
            raise ValueError(f"{where}: {m_arg} must have one tensor per {'weight' if ws else 'score tensor'}: got "
                             f"{len(ms)} masks for {len(curv)} tensors")
    pool = Pool(where, ws, curv, [], names, single, w_arg, c_arg)
    for i in range(len(curv)):
        for arg, t, kind in ((w_arg, ws[i] if ws else None, "float"), (c_arg, curv[i], "float"),
                             (m_arg, ms[i] if user_masks else None, "bool")):
            if t is None:
                continue
            label = pool.label(arg, i)
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: {label} must be a Tensor, got {type(t).__name__}")
            if t.layout != torch.strided:
                raise TypeError(f"{where}: {label} must be a dense (strided) tensor, got layout {t.layout}")
            if kind == "float" and t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{where}: {label} must be float32, float64, float16 or bfloat16, got {t.dtype}")
            if kind == "bool" and t.dtype != torch.bool:
                raise TypeError(f"{where}: {label} must be a bool keep-mask (True = kept), got {t.dtype}")
        ref_arg, ref = (w_arg, ws[i]) if ws else (c_arg, curv[i])
        others = [(c_arg, curv[i])] if ws else []
        if user_masks:
            others.append((m_arg, ms[i]))
        for arg, t in others:
            if t.shape != ref.shape:
                raise ValueError(f"{where}: {pool.label(arg, i)} must have the shape of {pool.label(ref_arg, i)} "
                                 f"{tuple(ref.shape)}, got {tuple(t.shape)}")
    first = ws[0] if ws else (curv[0] if curv else None)
    if first is not None:
        first_label = pool.label(w_arg if ws else c_arg, 0)
        for i in range(len(curv)):
            for arg, t in ((w_arg, ws[i] if ws else None), (c_arg, curv[i]), (m_arg, ms[i] if user_masks else None)):
                if t is not None and t.device != first.device:
                    raise ValueError(f"{where}: every tensor must be on one device: {first_label} is on "
                                     f"{first.device}, {pool.label(arg, i)} on {t.device}")
    pool.masks = ms if user_masks else [torch.ones(h.shape, dtype=torch.bool, device=h.device) for h in curv]
    # Aliasing: (label, tensor, exclusive) with exclusive = "may not overlap anything".
    members = [(pool.label(w_arg, i), w, True) for i, w in enumerate(ws)]
    members += [(pool.label(c_arg, i), h, False) for i, h in enumerate(curv)]
    if user_masks:
        members += [(pool.label(m_arg, i), m, True) for i, m in enumerate(ms)]
    _check_aliasing(where, members, writes_weights, len(ws))
    return pool


# ---------------------------------------------------------------------------
# Aliasing
# ---------------------------------------------------------------------------


def _byte_range(t: Tensor) -> Tuple[int, int]:
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (span + 1) * t.element_size()


def _offsets(t: Tensor) -> Tensor:
    """Byte offsets of every element of ``t`` in its storage (only for the rare overlapping-range case)."""
    off = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        off = off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return (off.reshape(-1) + t.storage_offset()) * t.element_size()


def _internal_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an expanded or strided-over-itself view)."""
    dims = sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1)
    need = 1
    for st, s in dims:
        if st < need:
            break
        need = st * s
    else:
        return False
    off = _offsets(t)
    return torch.unique(off).numel() < off.numel()


def _overlap(a: Tensor, b: Tensor) -> bool:
    if a.element_size() != b.element_size():
        return True  # different element sizes over one range: treated as overlapping (never a real use)
    return bool(torch.isin(_offsets(a), _offsets(b)).any())


def _check_aliasing(where: str, members, writes_weights: bool, n_weights: int) -> None:
    """Raise if a written tensor shares memory with another argument, or two weights overlap."""
    by_storage: Dict[Tuple[str, int], list] = {}
    for idx, (label, t, exclusive) in enumerate(members):
        written = exclusive and (writes_weights or idx >= n_weights)
        if t.numel() == 0 or t.device.type == "meta":
            continue
        if written and _internal_overlap(t):
            raise ValueError(f"{where}: {label} has elements that share memory (an expanded or overlapping view); "
                             "a tensor this call writes must not (pass a .clone())")
        key = (str(t.device), t.untyped_storage().data_ptr())
        by_storage.setdefault(key, []).append((*_byte_range(t), idx, label, t, exclusive, written))
    for group in by_storage.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda r: (r[0], r[2]))
        active: list = []
        for rec in group:
            active = [a for a in active if a[1] > rec[0]]
            for other in active:
                first, second = sorted((other, rec), key=lambda r: r[2])
                conflict = first[6] or second[6] or (first[5] and second[5])
                if conflict and _overlap(first[4], second[4]):
                    a, b = first[4], second[4]
                    same = (a.data_ptr(), a.dtype, a.shape, a.stride()) == (b.data_ptr(), b.dtype, b.shape, b.stride())
                    how = "are the same tensor" if same else "share memory (overlapping views)"
                    raise ValueError(f"{where}: {first[3]} and {second[3]} {how}; each tensor the call writes, and "
                                     "each weight, must be passed once and not overlap another argument (pass a "
                                     ".clone() of one of them)")
            active.append(rec)


# ---------------------------------------------------------------------------
# Finiteness
# ---------------------------------------------------------------------------


def check_finite(pool: Pool, keep: bool) -> List[int]:
    """Non-finite entries that are still kept, per tensor of ``pool``.

    With ``keep=False`` (``nonfinite="error"``) raise a ValueError naming the
    first tensor (weight before curvature) and position holding a non-finite
    value in an entry whose mask is True; entries already deleted are never
    read, so their values do not matter (as in the kernels). With
    ``keep=True`` return their counts per tensor (they can never be deleted).

    Costs one reduction per tensor and one device synchronisation in all when
    every value is finite (the common case).
    """
    items = []  # (tensor index, arg, tensor)
    for i in range(len(pool.curvature)):
        if pool.weights:
            items.append((i, pool.weights_arg, pool.weights[i]))
        items.append((i, pool.curvature_arg, pool.curvature[i]))
    counts = [0] * len(pool.curvature)
    items = [it for it in items if it[2].numel()]
    if not items:
        return counts
    with torch.no_grad():
        # min and max propagate NaN, and are +-inf when an Inf is present: all finite iff both are.
        extremes = torch.stack([torch.stack(torch.aminmax(t.detach())).double() for _, _, t in items])
        finite = torch.isfinite(extremes).all(dim=1).tolist()
        for (i, arg, t), ok in zip(items, finite):
            if ok:
                continue
            bad = ~torch.isfinite(t.detach()) & pool.masks[i]
            if keep:
                if pool.weights and arg == pool.curvature_arg:
                    bad &= torch.isfinite(pool.weights[i].detach())  # counted once per entry
                counts[i] += int(bad.sum())
                continue
            where = bad.nonzero()
            if where.numel():
                pos = tuple(where[0].tolist())
                value = t.detach()[pos].item() if pos else t.detach().item()
                raise ValueError(f"{pool.where}: {pool.label(arg, i)} has a non-finite value ({value}) at position "
                                 f"{pos}; pass nonfinite='keep' to treat non-finite entries as never prunable")
    return counts
