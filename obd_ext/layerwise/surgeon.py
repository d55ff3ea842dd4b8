"""The Optimal Brain Surgeon step of one linear layer, in SparseGPT's blocked column sweep.

For a linear layer ``y = x W^T`` and calibration inputs ``X`` (``[tokens, inputs]``),
the reconstruction error ``E(W') = ||X (W' - W)^T||_F^2`` is a sum over output
rows of one quadratic with the same Hessian ``H = 2 X^T X`` for every row
(docs/math.md, "Layer-wise Optimal Brain Surgeon"). Deleting weight ``q`` of a
row and re-fitting the row's other free weights costs ``w_q^2 / (2 [H_F^-1]_qq)``
and moves them by ``-w_q / [H_F^-1]_qq * H_F^-1 e_q``, where ``F`` is the set of
weights still free to move.

:func:`obs_prune_` sweeps the columns (inputs) left to right. Column ``j`` is
settled (kept or zeroed) and its error is spread over the columns right of it
only, so the free set of column ``j`` is ``{j, ..., n-1}`` for every row alike.
With ``U`` the upper Cholesky factor of ``H^-1``, row ``j`` of ``U`` divided by
``U_jj`` is exactly ``[H_F^-1] e_j / [H_F^-1]_jj`` for that free set, and
``U_jj^2 = [H_F^-1]_jj``: one factorisation gives every step's update (``U``
is the inverse of the reverse Cholesky factor ``R`` of ``H``, and each block
solves for its own rows of it). The updates of the columns right of a block of
``blocksize`` columns are applied lazily, as one matrix product per block;
within a block on CPU, the column steps update a sub-block small enough to stay
in cache and on one thread, and one product per sub-block spreads them over
the rest of the block (the same arithmetic, grouped differently).

Which weights are deleted is decided as the sweep reaches them, from the
surgeon's saliency ``w_j^2 / U_jj^2`` of the current (already updated) weights:

- ``scope="row"``: at the start of each column block, each row deletes its
  share of the block (the cumulative count through the block's last column
  is ``round(k_row * end / n)``, so each row deletes exactly
  ``k_row = round(sparsity * n)`` in all);
- ``scope="layer"``: SparseGPT's adaptive mask; each column block deletes its
  share over all rows together (cumulatively ``round(k * end / n)`` of
  ``k = round(sparsity * rows * n)``);
- ``"N:M"``: at the first column of each group of M, each row deletes the M-N
  lowest of the group.

Equal saliencies are deleted in order of index (row-major), as everywhere in
obd_ext. Inputs whose calibration activations are all zero (``H_jj = 0``,
"dead") have saliency 0 and are deleted first; their weights affect nothing
the calibration data sees, so deleting them moves no other weight.

The arithmetic runs in float32 (or float64) on a copy; the weight is written
once at the end, in its own dtype, and not at all if anything fails.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..selection_checks import check_sparsity, count_for_sparsity
from ..vocabulary import parse_pattern

__all__ = ["DEFAULT_BLOCKSIZE", "DEFAULT_DAMP", "SurgeonResult", "obs_prune_", "check_surgeon_args",
           "damped_hessian", "inverse_hessian_factor", "reverse_cholesky"]

DEFAULT_BLOCKSIZE = 128
"""Columns per lazy-update block (SparseGPT's choice)."""

DEFAULT_DAMP = 0.01
"""Damping added to ``H``'s diagonal, as a fraction of the mean diagonal of the live inputs."""

_RETRIES = 4  # more damping, 10x each time, after a failed factorisation


@dataclass
class SurgeonResult:
    """What :func:`obs_prune_` did to one layer.

    Attributes:
        mask: True where a weight is kept, ``[outputs, inputs]``.
        deleted: entries set to zero.
        predicted_increase: the sum of the deletions' surgeon saliencies
            ``w^2 / (2 U_jj^2)`` over live inputs: in exact arithmetic, the
            damped objective ``||X dW^T||^2 + lam/2 ||dW_live||^2`` of the final
            weights (an upper bound of the reconstruction error).
        row_increase: the same per output row, float64 ``[outputs]`` (rows
            are independent: the sum over a subset of rows is that subset's).
        damp: the relative damping actually used (larger than asked if the
            factorisation needed more).
        dead_inputs: inputs whose calibration activations are all zero.
    """

    mask: Tensor
    deleted: int
    predicted_increase: float
    row_increase: Tensor
    damp: float
    dead_inputs: int

    def __repr__(self) -> str:
        # a summary: the mask of a large layer would print pages
        return (f"SurgeonResult(shape={list(self.mask.shape)}, deleted={self.deleted}, "
                f"predicted_increase={self.predicted_increase:.6g}, damp={self.damp:g}, "
                f"dead_inputs={self.dead_inputs})")


def check_surgeon_args(weight: Tensor, gram: Tensor, sparsity: Optional[float], pattern: str, scope: str,
                       blocksize: int, damp: float, dtype: torch.dtype, name: str) -> Tuple[float, Optional[tuple]]:
    """Everything :func:`obs_prune_` will touch, checked; returns (sparsity, N:M or None).

    Raises:
        ValueError / TypeError naming ``name`` and the argument.
    """
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and not math.isclose(float(sparsity), implied, rel_tol=0, abs_tol=1e-9):
            raise ValueError(f"{name}: pattern={pattern!r} implies sparsity {implied:g}, got sparsity={sparsity!r}")
        sparsity = implied
    elif sparsity is None:
        raise ValueError(f"{name}: an unstructured pattern needs a sparsity")
    try:
        sparsity = check_sparsity(sparsity)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if scope not in ("row", "layer"):
        raise ValueError(f"{name}: the surgeon selects per 'row' or per 'layer', got scope={scope!r}")
    if nm is not None and scope != "row":
        raise ValueError(f"{name}: pattern={pattern!r} selects within rows; scope must be 'row', got {scope!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{name}: blocksize must be an integer >= 1, got {blocksize!r}")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"{name}: damp must be a finite number >= 0, got {damp!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: dtype must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        what = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{name}: the weight must be a 2-D floating tensor [outputs, inputs], got {what}")
    cols = weight.shape[1]
    if not isinstance(gram, Tensor) or tuple(gram.shape) != (cols, cols) or not gram.is_floating_point():
        what = f"{tuple(gram.shape)} {gram.dtype}" if isinstance(gram, Tensor) else type(gram).__name__
        raise ValueError(f"{name}: the Gram matrix X^T X must be a floating [{cols}, {cols}] tensor (inputs x "
                         f"inputs of the weight {tuple(weight.shape)}), got {what}")
    if gram.device != weight.device:
        raise ValueError(f"{name}: the Gram matrix is on {gram.device}, the weight on {weight.device}")
    if nm is not None:
        if cols % nm[1]:
            raise ValueError(f"{name}: pattern {pattern!r} needs the number of inputs to be a multiple of {nm[1]}, "
                             f"got weight shape {tuple(weight.shape)}")
        if blocksize % nm[1]:
            raise ValueError(f"{name}: pattern {pattern!r} needs blocksize to be a multiple of {nm[1]}, "
                             f"got {blocksize}")
    bad = ~torch.isfinite(gram)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name}: the calibration Gram matrix X^T X is not finite at [{i}, {j}] (value "
                         f"{float(gram[i, j])}): the calibration activations hold NaN/Inf or overflow")
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name}: the weight is not finite at [{i}, {j}] (value {float(weight[i, j])})")
    diag = gram.diagonal()
    if bool((diag < 0).any()):
        j = int((diag < 0).nonzero()[0])
        raise ValueError(f"{name}: the Gram matrix has a negative diagonal entry [{j}, {j}] = {float(diag[j])}; "
                         "X^T X cannot")
    return sparsity, nm


def damped_hessian(gram: Tensor, damp: float, dtype: torch.dtype) -> Tuple[Tensor, Tensor, float]:
    """``H = 2 gram + lam I`` with ``lam = damp * mean(live diagonal)``; (H, dead, lam).

    A dead input (zero diagonal) has a zero row and column in a true Gram
    matrix: it is decoupled, and its diagonal is set to ``max(lam, 1)`` only to
    keep ``H`` invertible (its saliency is forced to 0 elsewhere).
    """
    h = gram.to(dtype=dtype, copy=True).mul_(2)
    d = h.diagonal()
    dead = d == 0
    live = d[~dead]
    lam = float(damp * live.mean()) if live.numel() else 0.0
    d.add_(lam)
    d.masked_fill_(dead, max(lam, 1.0))
    return h, dead, lam


def inverse_hessian_factor(h: Tensor) -> Optional[Tensor]:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), or None if ``H`` is not numerically PD.

    With ``P`` the order-reversing permutation and ``P H P = L L^T`` (lower
    Cholesky), ``H = R R^T`` with ``R = P L P`` upper triangular, so
    ``H^-1 = (R^-1)^T R^-1`` and ``U = R^-1 = P L^-1 P``: one factorisation and
    one triangular inverse, instead of SparseGPT's factorisation, inverse and
    second factorisation of ``H^-1`` (measured as accurate in float32 against
    float64).
    """
    chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info):
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
    if not bool(torch.isfinite(u.diagonal()).all()) or not bool((u.diagonal() > 0).all()):
        return None
    return u


def reverse_cholesky(h: Tensor) -> Optional[Tensor]:
    """Upper triangular ``R`` with ``H = R R^T`` (so ``U = R^-1``), or None if ``H`` is not numerically PD.

    :func:`obs_prune_` needs ``U`` one block of rows at a time: ``U[i1:i2, i1:]`` solves
    ``X R[i1:, i1:] = [I 0]`` (``U`` is upper triangular), one triangular solve per block. Over all blocks
    that is about a third of the arithmetic of the whole inverse (:func:`inverse_hessian_factor`), which
    measured as the sweep's largest single cost. ``U_jj = 1 / R_jj``.
    """
    chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info):
        return None
    r = chol.flip(0, 1)
    d = r.diagonal()
    if not bool(torch.isfinite(d.reciprocal()).all()) or not bool((d > 0).all()):
        return None
    return r


def _cum(k: int, end: int, n: int) -> int:
    """``round(k * end / n)`` in integers (half up): the deletions due through column ``end``."""
    return (2 * k * end + n) // (2 * n)


_TILE_ELEMENTS = 1 << 15
"""Entries of the tile a column step updates on CPU: below ATen's grain size (32768), so each of the sweep's
many small ops runs on one thread, cache-resident, with no parallel region to enter. Measured on a shared
2-core machine: a parallel region per column step cost milliseconds each under load, up to 45x the whole
1-thread sweep."""


def _sub_block(rows: int, blocksize: int, m: int, device: torch.device) -> int:
    """Columns whose rank-1 updates are applied one by one before one ``addmm`` spreads them over the block.

    On CPU, as many as keep ``columns x rows`` within :data:`_TILE_ELEMENTS` (at least 8, a multiple of the
    N:M group size ``m`` so that a group's selection sees its columns up to date); elsewhere (CUDA) the whole
    block: there the cost is one kernel launch per step whatever the tile.
    """
    if device.type != "cpu":
        return blocksize
    sub = min(blocksize, max(8, _TILE_ELEMENTS // max(rows, 1)))
    return max(m, sub - sub % m)


def _mark_lowest_(scores: Tensor, k: int, out: Tensor, index: Tensor) -> None:
    """``out[j, r] = True`` for the ``k`` lowest ``scores[:, r]`` of every column ``r``, equal values in order of ``j``.

    ``scores`` (``[count, rows]``) are >= +0 (saliencies). ``index`` is ``arange(count)[:, None]`` (int64).
    float32: the bits of a non-negative float order as the float does, so ``bits * count + j`` is a unique
    integer key in the same order with ties broken by ``j``, and the largest of its k smallest is the threshold
    (``topk``: measured 2-4x faster than a stable sort of the scores, and faster than ``kthvalue``). float64
    bits do not fit that key: a stable sort.
    """
    count = scores.shape[0]
    if k == count:
        out.fill_(True)
    elif scores.dtype == torch.float32:
        key = torch.add(index, scores.view(torch.int32), alpha=count)
        torch.le(key, torch.topk(key, k, dim=0, largest=False, sorted=False).values.amax(0), out=out)
    else:
        out.zero_().scatter_(0, torch.sort(scores, dim=0, stable=True).indices[:k], True)


@torch.no_grad()
def obs_prune_(weight: Tensor, gram: Tensor, *, sparsity: Optional[float] = None, pattern: str = "unstructured",
               scope: str = "row", blocksize: int = DEFAULT_BLOCKSIZE, damp: float = DEFAULT_DAMP,
               dtype: torch.dtype = torch.float32, name: str = "weight") -> SurgeonResult:
    """Prune one layer in place by the Optimal Brain Surgeon, updating the weights it keeps.

    Args:
        weight: ``[outputs, inputs]`` (a view such as ``weight_rows(layer)`` is
            written through); any floating dtype (bf16 included). Written once,
            at the end, in its own dtype.
        gram: ``X^T X`` of the layer's calibration inputs, ``[inputs, inputs]``,
            summed over tokens (any floating dtype; not modified).
        sparsity: fraction deleted (of each row for ``scope="row"``, of the
            layer for ``"layer"``); None for N:M, which implies ``1 - N/M``.
        pattern: "unstructured" or "N:M" (keep N of every M consecutive inputs).
        scope: "row" or "layer" (see the module docstring); "row" for N:M.
        blocksize: columns per lazy-update block; also the block over which
            "row" and "layer" choose their deletions. A multiple of M for N:M.
        damp: ``lam = damp * mean(diag H)`` over live inputs is added to the
            diagonal; if the factorisation still fails, it is retried with 10x
            the damping (up to 4 times), then a RuntimeError names the layer.
        dtype: precision of the arithmetic, float32 or float64.
        name: the layer's name, for errors.

    Returns:
        A :class:`SurgeonResult`.

    Raises:
        ValueError: any argument malformed or not finite (nothing is changed).
        RuntimeError: ``H`` could not be factorised even with more damping, or
            the sweep produced non-finite weights (nothing is changed).
    """
    sparsity, nm = check_surgeon_args(weight, gram, sparsity, pattern, scope, blocksize, damp, dtype, name)
    rows, cols = weight.shape
    device = weight.device
    r, used, tried = None, damp, []
    for _ in range(_RETRIES + 1):
        h, dead, lam = damped_hessian(gram.to(device), used, dtype)
        r = reverse_cholesky(h)
        tried.append(used)
        if r is not None:
            break
        used = max(used * 10, 1e-4)
    del h
    if r is None:
        raise RuntimeError(f"{name}: the layer's Hessian 2 X^T X could not be factorised with damp in "
                           f"{[float(f'{t:.3g}') for t in tried]}; the calibration inputs may be degenerate or "
                           "overflow")
    if used != damp:
        warnings.warn(f"{name}: the layer's Hessian needed damp={used:g} (asked: {damp:g}) to be factorised",
                      RuntimeWarning, stacklevel=2)
    # The weight is held transposed, [inputs, outputs]: a column of the weight is a contiguous row here, so a
    # column step's update is a contiguous rank-1 update (addr_) and a block is a contiguous slice.
    wt = torch.empty((cols, rows), dtype=dtype, device=device)
    wt.copy_(weight.detach().t())
    deleted = torch.zeros((cols, rows), dtype=torch.bool, device=device)
    inv_u = r.diagonal()  # 1 / U_jj
    # saliency w^2 / U_jj^2, and 0 for a dead input
    inv_d2 = torch.where(dead, torch.zeros((), dtype=dtype, device=device), inv_u.square())
    live = (~dead).double()
    k_row = count_for_sparsity(sparsity, cols) if nm is None else 0
    k_layer = count_for_sparsity(sparsity, rows * cols) if nm is None else 0
    m = nm[1] if nm is not None else 1
    sub = _sub_block(rows, blocksize, m, device)
    index = torch.arange(max(blocksize, m), device=device)[:, None]
    loss = torch.zeros(rows, dtype=torch.float64, device=device)
    err = torch.empty((min(blocksize, cols), rows), dtype=dtype, device=device)  # reused by every block
    scale = torch.empty_like(err)
    eye = torch.eye(min(blocksize, cols), cols, dtype=dtype, device=device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        # this block's rows of U: U[i1:i2, i1:] R[i1:, i1:] = [I 0]
        ub = torch.linalg.solve_triangular(r[i1:, i1:], eye[:count, :cols - i1], upper=True, left=False)
        w1, d1, u1 = wt[i1:i2], deleted[i1:i2], ub[:, :count]
        e1, s1, iu1, id1 = err[:count], scale[:count], inv_u[i1:i2, None], inv_d2[i1:i2, None]
        if nm is None:
            scores = w1.square().mul_(id1)
            if scope == "row":
                kb = _cum(k_row, i2, cols) - _cum(k_row, i1, cols)
                if kb:
                    _mark_lowest_(scores, kb, d1, index[:count])
            else:
                kb = _cum(k_layer, i2, cols) - _cum(k_layer, i1, cols)
                if kb:  # ties in row-major order of the [rows, columns] weight: one pool, keyed like a row's
                    flat = torch.empty((rows * count, 1), dtype=torch.bool, device=device)
                    _mark_lowest_(scores.t().reshape(-1, 1), kb, flat,
                                  torch.arange(rows * count, device=device)[:, None])
                    d1.copy_(flat.view(rows, count).t())
            # e_i = (w_i - q_i) / U_ii, nonzero where deleted
            torch.mul(d1, iu1, out=s1)
        for j1 in range(0, count, sub):
            j2 = min(j1 + sub, count)
            for i in range(j1, j2):
                if nm is not None and i % m == 0:
                    g = slice(i, i + m)
                    _mark_lowest_(w1[g].square().mul_(id1[g]), m - nm[0], d1[g], index[:m])
                    torch.mul(d1[g], iu1[g], out=s1[g])
                torch.mul(w1[i], s1[i], out=e1[i])
                if i + 1 < j2:  # the rows' free weights re-fit (column i itself is settled by the mask below)
                    w1[i + 1:j2].addr_(u1[i, i + 1:j2], e1[i], alpha=-1)
            if j2 < count:  # the sub-block's updates of the block's later columns at once
                w1[j2:].addmm_(u1[j1:j2, j2:].t(), e1[j1:j2], alpha=-1)
        loss.addmv_(e1.t().double().square(), live[i1:i2], alpha=0.5)
        if i2 < cols:
            wt[i2:].addmm_(ub[:, count:].t(), e1, alpha=-1)  # the block's updates of every later column at once
        w1.masked_fill_(d1, 0)  # deleted weights exactly 0 (the updates leave rounding there); kept ones untouched
    # one check at the end (each large op is a parallel region: measured costly on a loaded machine); a
    # non-finite error reaches the later columns or, for the last block, the loss
    if not bool(torch.isfinite(wt).all()) or not math.isfinite(float(loss.sum())):
        raise RuntimeError(f"{name}: the surgeon's update produced non-finite weights (the layer's Hessian is too "
                           f"ill-conditioned at damp={used:g}; try a larger damp)")
    weight.copy_(wt.t())
    keep = torch.logical_not(deleted.t()).contiguous()
    return SurgeonResult(keep, int((~keep).sum()), float(loss.sum()), loss, used, int(dead.sum()))
