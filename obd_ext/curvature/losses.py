"""Boundary conditions of the curvature sweep: the loss's gradient and the
diagonal of its Hessian with respect to the model output (docs/math.md,
"Back-propagating second derivatives": the boundary condition).

Each rule returns ``(loss, g, h_obd, h_lm)`` for a model output ``y``:
``g = dL/dy`` (None where the caller needs no gradient and it would cost a
logits-sized pass: cross-entropy under ``lm``), ``h_obd`` the diagonal of
``d2L/dy2`` and ``h_lm`` its Gauss-Newton counterpart (the same for the losses
below, whose Hessian with respect to the output is PSD). Every quantity is
computed elementwise or per row, so the cost never grows beyond that of the
loss itself (no C x C matrices, whatever the vocabulary).

A squashing function before the loss (eq. 8: tanh then MSE) needs no rule of
its own: the sweep's elementwise rule adds its ``f''`` term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops

__all__ = ["Boundary", "boundary_for", "SUPPORTED_LOSSES", "PER_SAMPLE_LOSSES", "per_sample_scale", "sampled_targets",
           "categorical_draw"]

# Losses that fisher / ggn-mc take: each is c * (sum of per-sample losses), c known.
PER_SAMPLE_LOSSES = ("nn.MSELoss", "nn.CrossEntropyLoss (class indices or probabilities, weight, ignore_index, "
                     "label_smoothing)", "nn.NLLLoss", "nn.BCEWithLogitsLoss (weight, pos_weight)", "F.mse_loss",
                     "F.cross_entropy", "F.binary_cross_entropy_with_logits")

SUPPORTED_LOSSES = ("nn.MSELoss", "nn.CrossEntropyLoss", "nn.BCEWithLogitsLoss", "F.mse_loss", "F.cross_entropy",
                    "F.binary_cross_entropy_with_logits")


@dataclass
class Boundary:
    loss: Tensor
    g: Optional[Tensor]
    h_obd: Tensor
    h_lm: Tensor
    scale: float = 1.0  # the loss's reduction factor (1/count for "mean")


def _reduction_scale(reduction: str, count: int) -> float:
    if reduction == "mean":
        return 1.0 / max(count, 1)
    if reduction == "sum":
        return 1.0
    raise ValueError(f"loss reduction must be 'mean' or 'sum' for curvature, got {reduction!r}")


def mse(y: Tensor, target: Tensor, reduction: str = "mean") -> Boundary:
    """``sum (y - t)^2`` (or its mean): gradient ``2 (y - t)``, curvature 2 per output."""
    if target.shape != y.shape:
        raise ValueError(f"MSE target must have the output's shape {tuple(y.shape)}, got {tuple(target.shape)}")
    c = _reduction_scale(reduction, y.numel())
    y = y.detach()
    diff = y - target.to(y.dtype)
    loss = (diff * diff).sum() * c
    h = torch.full_like(y, 2.0 * c)
    return Boundary(loss, 2.0 * c * diff, h, h, c)


def cross_entropy(y: Tensor, target: Tensor, reduction: str = "mean", ignore_index: int = -100,
                  need_g: bool = True) -> Boundary:
    """Softmax cross-entropy on logits (class dim 1): diagonal ``p (1 - p)`` at the logits.

    One fused kernel (obd_ext.ops.cross_entropy_boundary) over N x C rows: its
    cost is that of the loss and its gradient, whatever the vocabulary.
    ``need_g=False`` (the Gauss-Newton sweep) skips the gradient, a logits-sized
    tensor: 128 MiB for the benchmark GPT at vocabulary 32k.
    """
    if target.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise ValueError(f"cross-entropy curvature needs class-index targets, got dtype {target.dtype}")
    y = y.detach()
    rows = y.movedim(1, -1).reshape(-1, y.shape[1]) if y.dim() != 2 else y
    t = target.long().reshape(-1)
    count = int((t != ignore_index).sum())
    c = _reduction_scale(reduction, count)
    loss, g, h = ops.cross_entropy_boundary(rows, t, ignore_index, c, need_g)
    if y.dim() != 2:  # back to (N, C, d...)
        shape = y.movedim(1, -1).shape
        h = h.reshape(shape).movedim(-1, 1)
        g = g.reshape(shape).movedim(-1, 1) if need_g else g
    return Boundary(loss, g if need_g else None, h, h, c)


def bce_with_logits(y: Tensor, target: Tensor, reduction: str = "mean") -> Boundary:
    """Binary cross-entropy on logits: gradient ``s - t``, curvature ``s (1 - s)``."""
    if target.shape != y.shape:
        raise ValueError(f"BCE target must have the output's shape {tuple(y.shape)}, got {tuple(target.shape)}")
    y = y.detach()
    c = _reduction_scale(reduction, y.numel())
    t = target.to(y.dtype)
    s = torch.sigmoid(y)
    loss = F.binary_cross_entropy_with_logits(y, t, reduction="sum") * c
    h = s * (1.0 - s) * c
    return Boundary(loss, (s - t) * c, h, h, c)


def boundary_for(loss_fn) -> Callable[..., Boundary]:
    """The boundary rule for a loss module or functional, called as ``rule(y, target,
    need_g=True)``; a clear error otherwise."""
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        red = getattr(loss_fn, "reduction", "mean")
        return lambda y, t, need_g=True: mse(y, t, red)
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            if loss_fn.weight is not None or loss_fn.label_smoothing:
                raise NotImplementedError(
                    "obd_ext curvature: CrossEntropyLoss with class weights or label smoothing is not supported; "
                    "use method='hutchinson' or 'exact'"
                )
            red, ign = loss_fn.reduction, loss_fn.ignore_index
        else:
            red, ign = "mean", -100
        return lambda y, t, need_g=True: cross_entropy(y, t, red, ign, need_g)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (loss_fn.weight is not None or loss_fn.pos_weight is not None):
            raise NotImplementedError(
                "obd_ext curvature: BCEWithLogitsLoss with weight or pos_weight is not supported; "
                "use method='hutchinson' or 'exact'"
            )
        red = getattr(loss_fn, "reduction", "mean")
        return lambda y, t, need_g=True: bce_with_logits(y, t, red)
    name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", repr(loss_fn))
    raise NotImplementedError(
        f"obd_ext curvature: no second-order rule for the loss {name}; supported: {', '.join(SUPPORTED_LOSSES)}. "
        "method='hutchinson' or 'exact' work with any loss."
    )


def _loss_name(loss_fn) -> str:
    return type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", repr(loss_fn))


def _per_sample_kind(loss_fn) -> str:
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        return "mse"
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        return "ce"
    if isinstance(loss_fn, nn.NLLLoss) or loss_fn is F.nll_loss:
        return "nll"
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        return "bce"
    raise NotImplementedError(
        f"obd_ext curvature: fisher and ggn-mc need a loss that is a known multiple of a sum over samples; "
        f"{_loss_name(loss_fn)} is not one of {', '.join(PER_SAMPLE_LOSSES)}. "
        "method='hutchinson' or 'exact' work with any loss."
    )


def per_sample_scale(loss_fn, out: Tensor, target: Tensor) -> float:
    """The factor c with ``loss_fn(out, target) = c * sum_n loss_n`` (loss_n: sample n's
    loss under reduction "sum"); a clear error for a loss fisher / ggn-mc cannot split.

    "mean" divides by what PyTorch divides by: the number of entries (MSE, BCE), the
    non-ignored class-index targets or their class weights' sum (cross-entropy, NLL),
    and the rows for class-probability targets (N times the spatial size: never N x C).
    """
    kind = _per_sample_kind(loss_fn)
    red = getattr(loss_fn, "reduction", "mean")
    if red == "sum":
        return 1.0
    if red != "mean":
        raise ValueError(f"loss reduction must be 'mean' or 'sum' for curvature, got {red!r} ({_loss_name(loss_fn)})")
    if kind in ("mse", "bce"):
        return 1.0 / max(out.numel(), 1)
    if target.is_floating_point():  # class probabilities (cross-entropy only): mean over rows
        rows = out.numel() // out.shape[1] if out.dim() >= 2 else 1
        return 1.0 / max(rows, 1)
    kept = target != getattr(loss_fn, "ignore_index", -100)
    weight = getattr(loss_fn, "weight", None)
    if weight is None:
        return 1.0 / max(int(kept.sum()), 1)
    total = float(weight.detach()[target[kept].long()].sum())
    return 1.0 / total if total != 0 else 1.0


def categorical_draw(probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One class per row of ``probs`` (N x C, rows summing to 1) by inverse CDF:
    a cumulative sum and one uniform per row.

    Why not torch.multinomial: on the CPU it draws an exponential variate per
    entry on one thread, 0.8 s for 1024 x 32768 logits (a language model's
    vocabulary); this is a cumulative sum and a binary search per row. A class of
    probability 0 (a -inf logit) is never drawn: its CDF step is empty, and a
    uniform rounding up to the row's total is sent to the last class of positive
    probability.
    """
    cdf = probs.cumsum(dim=1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(total.shape, generator=generator, dtype=cdf.dtype, device=cdf.device) * total
    draw = torch.searchsorted(cdf, u, right=True)
    last = torch.searchsorted(cdf, total, right=False)  # the last class of positive probability
    return torch.minimum(draw, last).reshape(-1)


def sampled_targets(y: Tensor, loss_fn, generator: Optional[torch.Generator] = None,
                    target: Optional[Tensor] = None) -> Tensor:
    """Targets drawn from the model's own predictive distribution (for ggn-mc).

    With class-index ``target`` given, its ignored positions (``ignore_index``) stay
    ignored: the loss leaves them out, so must its curvature.
    """
    y = y.detach()
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        if isinstance(loss_fn, nn.CrossEntropyLoss) and (loss_fn.weight is not None or loss_fn.label_smoothing):
            raise NotImplementedError(
                "obd_ext curvature: ggn-mc draws class targets from the model, which estimates the Gauss-Newton "
                "matrix of the plain cross-entropy only; CrossEntropyLoss with class weights or label smoothing "
                "is not supported by ggn-mc. Use method='fisher', 'hutchinson' or 'exact'."
            )
        probs = F.softmax(y, dim=1).movedim(1, -1).reshape(-1, y.shape[1])
        drawn = categorical_draw(probs, generator).reshape(y.movedim(1, -1).shape[:-1])
        ign = getattr(loss_fn, "ignore_index", -100)
        if 0 <= ign < y.shape[1]:
            raise NotImplementedError(
                f"obd_ext curvature: ggn-mc with ignore_index={ign}, a class the model can draw, would drop the "
                "draws of that class; use a negative ignore_index or method='fisher'."
            )
        if target is not None and not target.is_floating_point() and target.shape == drawn.shape:
            drawn = torch.where(target == ign, torch.full_like(drawn, ign), drawn)
        return drawn
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (loss_fn.weight is not None or loss_fn.pos_weight is not None):
            raise NotImplementedError(
                "obd_ext curvature: ggn-mc with BCEWithLogitsLoss(weight / pos_weight) is not supported; "
                "use method='fisher', 'hutchinson' or 'exact'."
            )
        return torch.bernoulli(torch.sigmoid(y), generator=generator)
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        # sum (y - t)^2 is the negative log-likelihood of N(y, 1/2) up to constants
        return y + torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device) * (0.5 ** 0.5)
    _per_sample_kind(loss_fn)  # the clear error for a loss fisher cannot split
    raise NotImplementedError(f"obd_ext curvature: ggn-mc has no predictive distribution for {_loss_name(loss_fn)}; "
                              "use method='fisher', 'hutchinson' or 'exact'.")
