"""Pure-PyTorch versions of every obd_ext op: the oracle for tests and benchmarks.

These are written for clarity, not speed or memory: they concatenate, sort and
materialise everything the kernels avoid. Each function has the signature and
the semantics of the op of the same name in ``torch.ops.obd_ext``, including
the tie rule (equal saliencies are deleted in order of tensor index, then flat
row-major index) and the in-place updates of masks and weights.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "saliency_dtype",
    "saliency",
    "group_saliency",
    "global_select_",
    "row_select_",
    "nm_select_",
    "NUM_STATS",
    "ACT_KINDS",
    "activation_derivatives",
    "activation_hessian",
    "cross_entropy_boundary",
    "softmax_hessian",
    "layer_norm_hessian",
    "squared_mm",
    "column_sq_sum",
    "squared_conv",
    "obs_prune",
]

# The shared facts live in obd_ext.constants (production code never imports this oracle).
from .constants import (ACT_KINDS, NUM_STATS, STAT_DELETED_BEFORE, STAT_DELETED_NOW, STAT_MAX_DELETED,  # noqa: F401
                        STAT_SALIENCY_SUM, STAT_SKIPPED, saliency_dtype)


def saliency(weight: Tensor, hessian_diag: Tensor) -> Tensor:
    """``h * w^2 / 2`` evaluated as ``(h * w) * w * 0.5`` (the kernels' exact order).

    That order never gives NaN for finite ``w`` and ``h`` (``w * w`` first would:
    ``w = 1e30`` in float32 squares to inf, and ``0 * inf`` is NaN); see
    docs/math.md and csrc/kernels/common.h.
    """
    dt = saliency_dtype(weight, hessian_diag)
    w = weight.to(dt)
    h = hessian_diag.to(dt)
    return (h * w) * w * 0.5


def group_saliency(weight: Tensor, hessian_diag: Tensor, dim: int) -> Tensor:
    """Sum of saliencies over every dimension but ``dim``, terms and sum in float64.

    Each term is ``(h * w) * w * 0.5`` in float64, which cannot overflow for
    float32, float16 and bfloat16 inputs. Float64 inputs can overflow a term;
    a group whose sum is then not finite is summed again from the terms'
    mantissa/exponent pairs scaled by the group's largest exponent, so that
    +inf and -inf terms never give NaN.
    """
    dt = saliency_dtype(weight, hessian_diag)
    dim = dim % weight.dim()
    groups = weight.shape[dim]
    per_group = weight.numel() // groups if groups else 0
    w = weight.double().movedim(dim, 0).reshape(groups, per_group)
    h = hessian_diag.double().movedim(dim, 0).reshape(groups, per_group)
    total = ((h * w) * w * 0.5).sum(dim=1)
    bad = ~torch.isfinite(total)
    if bad.any():
        mh, eh = torch.frexp(h[bad])
        mw, ew = torch.frexp(w[bad])
        m = (mh * mw) * mw * 0.5
        e = (eh + 2 * ew).long()
        top = torch.where(m != 0, e, torch.iinfo(torch.int64).min).amax(dim=1, keepdim=True)
        scaled = torch.ldexp(m, torch.where(m != 0, e - top, 0)).sum(dim=1)
        total[bad] = torch.ldexp(scaled, top.reshape(-1))
    return total.to(dt)


def _stats(device, now, before, skipped, deleted_values: Tensor) -> Tensor:
    st = torch.zeros(NUM_STATS, dtype=torch.float64, device=device)
    st[STAT_DELETED_NOW] = now
    st[STAT_DELETED_BEFORE] = before
    st[STAT_SKIPPED] = skipped
    st[STAT_MAX_DELETED] = deleted_values.max().double() if deleted_values.numel() else math.nan
    st[STAT_SALIENCY_SUM] = deleted_values.double().sum()
    return st


def _finite(weight: Optional[Tensor], curvature: Tensor) -> Tensor:
    ok = torch.isfinite(curvature)
    if weight is not None:
        ok = ok & torch.isfinite(weight)
    return ok


def _scale_(weight: Tensor, where: Tensor, factor: float) -> None:
    """Deleted weights are multiplied by ``factor`` in float64 (exact zero for 0)."""
    flat = weight.view(-1) if weight.is_contiguous() else None
    new = torch.zeros_like(weight) if factor == 0.0 else (weight.double() * factor).to(weight.dtype)
    if flat is not None:
        flat[where.reshape(-1)] = new.reshape(-1)[where.reshape(-1)]
    else:
        weight.copy_(torch.where(where, new, weight))


def global_select_(
    weights: Sequence[Tensor],
    curvatures: Sequence[Tensor],
    masks: Sequence[Tensor],
    k: int,
    factor: Optional[float],
    skip_nonfinite: bool,
) -> Tensor:
    """Delete the lowest saliencies of one pool until ``k`` entries are deleted."""
    score_mode = len(weights) == 0
    ws = [None] * len(curvatures) if score_mode else list(weights)
    if not curvatures:
        if k != 0:
            raise ValueError(f"k must be 0 for an empty pool, got {k}")
        return _stats("cpu", 0, 0, 0, torch.zeros(0))
    device = curvatures[0].device
    scores = [
        (h.to(saliency_dtype(h)) if w is None else saliency(w, h)).reshape(-1) for w, h in zip(ws, curvatures)
    ]
    pool_dt = saliency_dtype(*scores)
    flat = torch.cat([s.to(pool_dt) for s in scores])
    alive = torch.cat([m.reshape(-1) for m in masks])
    finite = torch.cat([_finite(w, h).reshape(-1) for w, h in zip(ws, curvatures)])
    bad = alive & ~finite
    if bad.any() and not skip_nonfinite:
        raise ValueError(f"non-finite entry at flat pool index {int(bad.nonzero()[0])}")
    before = int((~alive).sum())
    prunable = flat.numel() - int(bad.sum())
    if not 0 <= k <= prunable:
        raise ValueError(f"k must be in [0, {prunable}], got {k}")
    want = max(k - before, 0)
    cand = (alive & finite).nonzero().reshape(-1)
    order = torch.sort(flat[cand], stable=True).indices
    chosen = cand[order[:want]]
    new_alive = alive.clone()
    new_alive[chosen] = False
    deleted = flat[chosen]
    offset = 0
    for w, m in zip(ws, masks):
        n = m.numel()
        newly = (alive[offset : offset + n] & ~new_alive[offset : offset + n]).reshape(m.shape)
        m.copy_(new_alive[offset : offset + n].reshape(m.shape))
        if factor is not None and w is not None:
            _scale_(w, newly, factor)
        offset += n
    return _stats(device, want, before, int(bad.sum()) if skip_nonfinite else 0, deleted)


def _segment_select_(
    scores: Tensor, alive: Tensor, finite: Tensor, target: int, skip_nonfinite: bool
) -> tuple[Tensor, Tensor, int, int, int]:
    """Per-row selection on 2-D (segments x entries) views; returns (new_alive, deleted values, now, before, skipped)."""
    bad = alive & ~finite
    if bad.any() and not skip_nonfinite:
        raise ValueError("non-finite entry")
    cand = alive & finite
    before = (~alive).sum(dim=1)
    want = (target - before).clamp(min=0)
    if bool((want > cand.sum(dim=1)).any()):
        raise ValueError("a segment has too few deletable entries")
    # Rank the candidates of each row by (value, index): a stable sort by value,
    # then a stable sort that moves non-candidates to the end.
    order = torch.sort(scores, dim=1, stable=True).indices
    order = order.gather(1, torch.sort((~cand).gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    newly = cand & (rank < want[:, None])
    new_alive = alive & ~newly
    return new_alive, scores[newly], int(newly.sum()), int(before.sum()), int(bad.sum()) if skip_nonfinite else 0


def _apply_segments(weight, curvature, mask, to2d, from2d, target, factor, skip_nonfinite) -> Tensor:
    scores = to2d(saliency(weight, curvature))
    new_alive, deleted, now, before, skipped = _segment_select_(
        scores, to2d(mask), to2d(_finite(weight, curvature)), target, skip_nonfinite
    )
    newly = mask & ~from2d(new_alive)
    mask.copy_(from2d(new_alive))
    if factor is not None:
        _scale_(weight, newly, factor)
    # Per-segment sums in segment order match the kernels' accumulation order.
    return _stats(weight.device, now, before, skipped, deleted)


def row_select_(
    weight: Tensor, curvature: Tensor, mask: Tensor, k: int, factor: Optional[float], skip_nonfinite: bool
) -> Tensor:
    """Each output row (dim 0) its own pool, ``k`` deleted entries wanted per row."""
    rows = weight.shape[0] if weight.dim() else 1
    cols = math.prod(weight.shape[1:])
    if not 0 <= k <= cols:
        raise ValueError(f"k must be in [0, {cols}], got {k}")
    shape = weight.shape
    return _apply_segments(
        weight, curvature, mask, lambda t: t.reshape(rows, cols), lambda t: t.reshape(shape), k, factor, skip_nonfinite
    )


def nm_select_(
    weight: Tensor,
    curvature: Tensor,
    mask: Tensor,
    n: int,
    m: int,
    factor: Optional[float],
    skip_nonfinite: bool,
) -> Tensor:
    """Keep the ``n`` most salient of every ``m`` consecutive entries along the input dimension."""
    if not (1 <= m and 0 <= n <= m):
        raise ValueError(f"need 0 <= n <= m and m >= 1, got n={n}, m={m}")
    d = 1 if weight.dim() >= 2 else 0
    c = weight.shape[d]
    if c % m:
        raise ValueError(f"input dimension {c} is not a multiple of m={m}")
    outer = math.prod(weight.shape[:d])
    inner = math.prod(weight.shape[d + 1 :])
    shape = weight.shape

    def to2d(t: Tensor) -> Tensor:  # (outer, C/m, m, inner) -> segments of m
        return t.reshape(outer, c // m, m, inner).permute(0, 1, 3, 2).reshape(-1, m)

    def from2d(t: Tensor) -> Tensor:
        return t.reshape(outer, c // m, inner, m).permute(0, 1, 3, 2).reshape(shape)

    return _apply_segments(weight, curvature, mask, to2d, from2d, m - n, factor, skip_nonfinite)


# ---------------------------------------------------------------------------
# Curvature sweep: the activation rule (OBD eq. 7)
# ---------------------------------------------------------------------------

# Activation kinds, numbered as ActKind in csrc/kernels/common.h. The saved
# tensor is the activation's output for tanh, sigmoid and relu, its input
# otherwise; p0..p2 are its parameters.
def activation_derivatives(kind: int, v: Tensor, p0: float = 0.0, p1: float = 0.0, p2: float = 0.0):
    """(f', f'') of activation ``kind`` from its saved tensor ``v`` (closed forms)."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if kind == 0:  # tanh, v = output
        d1 = 1 - v * v
        return d1, -2 * v * d1
    if kind == 1:  # sigmoid, v = output
        d1 = v * (1 - v)
        return d1, d1 * (1 - 2 * v)
    if kind == 2:  # relu, v = output
        return torch.where(v > 0, one, zero), zero
    if kind == 3:  # leaky relu
        return torch.where(v > 0, one, torch.full_like(v, p0)), zero
    if kind == 4:  # elu: alpha, scale, input scale
        neg = p1 * p0 * p2 * torch.exp(v * p2)
        return torch.where(v > 0, torch.full_like(v, p1), neg), torch.where(v > 0, zero, neg * p2)
    if kind == 5:  # gelu (erf)
        pdf = torch.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(v / math.sqrt(2)))
        return cdf + v * pdf, pdf * (2 - v * v)
    if kind == 6:  # gelu, tanh approximation
        k, c = math.sqrt(2 / math.pi), 0.044715
        u, du, ddu = k * (v + c * v ** 3), k * (1 + 3 * c * v * v), k * 6 * c * v
        t = torch.tanh(u)
        sech2 = 1 - t * t
        return 0.5 * (1 + t) + 0.5 * v * sech2 * du, sech2 * du + 0.5 * v * (-2 * t * sech2 * du * du + sech2 * ddu)
    if kind == 7:  # silu
        s = torch.sigmoid(v)
        return s * (1 + v * (1 - s)), s * (1 - s) * (2 + v * (1 - 2 * s))
    if kind == 8:  # softplus: beta, threshold
        s = torch.sigmoid(p0 * v)
        lin = p0 * v > p1
        return torch.where(lin, one, s), torch.where(lin, zero, p0 * s * (1 - s))
    if kind == 9:  # hardtanh: min, max
        return torch.where((v > p0) & (v < p1), one, zero), zero
    raise ValueError(f"unknown activation kind {kind}")


def activation_hessian(saved: Tensor, h: Tensor, g: Optional[Tensor], kind: int, p0: float, p1: float, p2: float,
                       lm: bool, want_g: bool) -> tuple[Tensor, Tensor]:
    """``h_in = f'^2 h + f'' g`` (lm: without the f'' term), ``g_in = f' g``, computed in fp32/fp64."""
    acc = torch.float64 if saved.dtype == torch.float64 else torch.float32
    d1, d2 = activation_derivatives(kind, saved.to(acc), p0, p1, p2)
    hh = h.to(acc)
    h_in = d1 * d1 * hh
    if g is not None and not lm:
        h_in = h_in + d2 * g.to(acc)
    g_in = (d1 * g.to(acc)).to(h.dtype) if want_g and g is not None else (
        torch.zeros_like(h) if want_g else h.new_empty(0))
    return h_in.to(h.dtype), g_in


def softmax_hessian(y: Tensor, h: Tensor, g: Optional[Tensor], lm: bool, want_g: bool) -> tuple[Tensor, Tensor]:
    """The softmax rule over the last dimension, computed in fp32/fp64:
    ``h_in = y^2 ((1 - 2y) h + s) + y (2y - 1)(t - g)`` (lm: without the last term) and
    ``g_in = y (g - t)``, with per-row ``s = sum y^2 h`` and ``t = sum g y``."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    yy, hh = y.to(acc), h.to(acc)
    s = (yy * yy * hh).sum(-1, keepdim=True)
    h_in = yy * yy * ((1 - 2 * yy) * hh + s)
    g_in = h.new_empty(0)
    if g is not None and (want_g or not lm):
        gg = g.to(acc)
        d = (gg * yy).sum(-1, keepdim=True) - gg  # t - g
        if not lm:
            h_in = h_in + yy * (2 * yy - 1) * d
        if want_g:
            g_in = (-yy * d).to(h.dtype)
    return h_in.to(h.dtype), g_in


def layer_norm_hessian(x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], h: Tensor,
                       g: Optional[Tensor], lm: bool, want_g: bool) -> tuple[Tensor, Tensor]:
    """The layer-norm rule for the input over the last dimension (n entries), in
    fp32/fp64. With xh = (x - mean) rstd, A = gamma^2 h, a = gamma g and per-row
    sums S0 = sum A, S1 = sum A xh, S2 = sum A xh^2, Sa = sum a, B = sum a xh:
    ``h_x = rstd^2 (S0/n^2 + A (1 - 2/n) + 2 xh S1/n^2 + xh^2 S2/n^2 - 2 xh^2 A/n)``
    plus, unless lm, ``rstd^2 (-2 a xh/n + 2 Sa xh/n^2 - B (1 - 1/n)/n + 3 B xh^2/n^2)``;
    ``g_x = rstd (a - Sa/n - xh B/n)``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[-1]
    rows = x.shape[:-1] + (1,)
    xx, hh = x.to(acc), h.to(acc)
    mu, rs = mean.to(acc).reshape(rows), rstd.to(acc).reshape(rows)
    gamma = weight.to(acc) if weight is not None else torch.ones(n, dtype=acc, device=x.device)
    xh = (xx - mu) * rs
    r2 = rs * rs
    A = gamma * gamma * hh
    S0, S1, S2 = A.sum(-1, keepdim=True), (A * xh).sum(-1, keepdim=True), (A * xh * xh).sum(-1, keepdim=True)
    h_x = r2 * (S0 / n**2 + A * (1 - 2 / n) + 2 * xh * S1 / n**2 + xh * xh * S2 / n**2 - 2 * xh * xh * A / n)
    g_x = h.new_empty(0)
    if g is not None and (want_g or not lm):
        a = gamma * g.to(acc)
        Sa, B = a.sum(-1, keepdim=True), (a * xh).sum(-1, keepdim=True)
        if not lm:
            h_x = h_x + r2 * (-2 * a * xh / n + 2 * Sa * xh / n**2 - B * (1 - 1 / n) / n + 3 * B * xh * xh / n**2)
        if want_g:
            g_x = (rs * (a - Sa / n - xh * B / n)).to(h.dtype)
    return h_x.to(h.dtype), g_x


def cross_entropy_boundary(logits: Tensor, target: Tensor, ignore_index: int, scale: float, want_g: bool = True):
    """(loss, g, h) of softmax cross-entropy at N x C logits: ``c (p - onehot)`` (empty unless
    ``want_g``), ``c p (1 - p)``."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    logp = torch.log_softmax(x, dim=1)
    p = logp.exp()
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    w = (valid.to(acc) * scale).unsqueeze(1)
    onehot = torch.zeros_like(p).scatter_(1, safe.unsqueeze(1), 1.0)
    loss = -(logp.gather(1, safe.unsqueeze(1)).squeeze(1).double() * valid).sum() * scale
    g = (w * (p - onehot)).to(logits.dtype) if want_g else logits.new_empty(0)
    return loss, g, (w * p * (1 - p)).to(logits.dtype)


def squared_mm(a: Tensor, b: Tensor, square_a: bool, square_b: bool) -> Tensor:
    """``(a*a if square_a else a) @ (b*b if square_b else b)``."""
    return (a * a if square_a else a) @ (b * b if square_b else b)


def column_sq_sum(x: Tensor, acc_dtype: torch.dtype = torch.float32) -> Tensor:
    """``sum_r x[r, j]^2`` over every row of ``x`` (last dimension = features), in float64, cast to ``acc_dtype``.

    The layer-wise OBD statistics: for ``y = x W^T`` the reconstruction loss
    ``sum ||y - y'||^2`` has Hessian ``2 X^T X``, whose diagonal is twice this.
    """
    xs = x.reshape(-1, x.shape[-1]).double()
    return (xs * xs).sum(0).to(acc_dtype)


def squared_conv(h: Tensor, input: Tensor, weight: Tensor, bias_sizes, stride, padding, dilation, transposed: bool,
                 output_padding, groups: int, output_mask) -> tuple:
    """The convolution rule's products from their definition, by autograd of ``sum(conv(., .) * h)``.

    ``H_x = conv^T(h, W*W)`` is the input gradient of ``<conv(x, W*W), h>``,
    ``h_W`` the weight gradient of ``<conv(X*X, W), h>``, ``h_b`` the sum of
    ``h`` over every dimension but the channels.
    """
    def conv(x, w):
        f = torch.nn.functional
        if transposed:
            fn = {3: f.conv_transpose1d, 4: f.conv_transpose2d, 5: f.conv_transpose3d}[x.dim()]
            return fn(x, w, None, stride, padding, output_padding, groups, dilation)
        fn = {3: f.conv1d, 4: f.conv2d, 5: f.conv3d}[x.dim()]
        return fn(x, w, None, stride, padding, dilation, groups)

    out = [None, None, None]
    if output_mask[0]:
        x = input.detach().clone().requires_grad_(True)
        out[0] = torch.autograd.grad((conv(x, weight * weight) * h).sum(), x)[0]
    if output_mask[1]:
        w = weight.detach().clone().requires_grad_(True)
        out[1] = torch.autograd.grad((conv(input * input, w) * h).sum(), w)[0]
    if output_mask[2] and bias_sizes is not None:
        out[2] = h.sum(dim=[d for d in range(h.dim()) if d != 1])
    return tuple(out)


def obs_prune(weight: Tensor, gram: Tensor, *, sparsity: Optional[float] = None, pattern: str = "unstructured",
              scope: str = "row", blocksize: int = 128, damp: float = 0.01) -> tuple:
    """Layer-wise Optimal Brain Surgeon, one column at a time from the textbook formula, in float64.

    The oracle of ``obd_ext.layerwise.surgeon.obs_prune_`` (same arguments,
    same deletion rules; see that module). No Cholesky factor and no lazy
    updates: at column ``i`` the free set is ``F = {i, ..., n-1}``, ``H_F^-1``
    is computed by inverting ``H[F, F]``, the saliency of column ``j`` is
    ``w_j^2 / [H_{F_j}^-1]_jj``, and settling column ``i`` to ``q`` moves the
    row's free weights by ``-(w_i - q) / [H_F^-1]_ii * H_F^-1 e_i`` at once.

    Returns:
        (new weight [float64], keep mask, predicted increase: the sum of
        ``(w_i - q)^2 / (2 [H_F^-1]_ii)`` over live inputs).
    """
    w = weight.detach().double().clone()
    rows, n = w.shape
    h = 2 * gram.double()
    dead = h.diagonal() == 0
    lam = damp * float(h.diagonal()[~dead].mean()) if bool((~dead).any()) else 0.0
    h = h + lam * torch.eye(n, dtype=torch.float64)
    h[dead, dead] = max(lam, 1.0)
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    if nm is not None:
        sparsity = 1 - nm[0] / nm[1]
    inv_diag = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(n)]) if n else h.new_zeros(0)

    def saliency(cols: slice) -> Tensor:
        s = w[:, cols].square() / inv_diag[cols]
        return torch.where(dead[cols], torch.zeros_like(s), s)

    def due(k: int, end: int) -> int:  # round(k * end / n), halves up
        return math.floor(k * end / n + 0.5)

    keep = torch.ones_like(w, dtype=torch.bool)
    k_row = round(sparsity * n) if nm is None else 0
    k_layer = round(sparsity * rows * n) if nm is None else 0
    loss = 0.0
    for i in range(n):
        if nm is None and i % blocksize == 0:
            end = min(i + blocksize, n)
            s = saliency(slice(i, end))
            if scope == "row":
                kb = due(k_row, end) - due(k_row, i)
                for r in range(rows):
                    order = sorted(range(end - i), key=lambda j: (float(s[r, j]), j))
                    for j in order[:kb]:
                        keep[r, i + j] = False
            else:
                kb = due(k_layer, end) - due(k_layer, i)
                flat = [(float(s[r, j]), r * (end - i) + j, r, j) for r in range(rows) for j in range(end - i)]
                for _, _, r, j in sorted(flat)[:kb]:
                    keep[r, i + j] = False
        if nm is not None and i % nm[1] == 0:
            s = saliency(slice(i, i + nm[1]))
            for r in range(rows):
                order = sorted(range(nm[1]), key=lambda j: (float(s[r, j]), j))
                for j in order[:nm[1] - nm[0]]:
                    keep[r, i + j] = False
        hinv = torch.linalg.inv(h[i:, i:])
        q = torch.where(keep[:, i], w[:, i], torch.zeros_like(w[:, i]))
        step = (w[:, i] - q) / hinv[0, 0]
        if not bool(dead[i]):
            loss += float(((w[:, i] - q).square() / (2 * hinv[0, 0])).sum())
        w[:, i:] -= step[:, None] * hinv[0][None, :]
        w[:, i] = q
    return w, keep, loss
