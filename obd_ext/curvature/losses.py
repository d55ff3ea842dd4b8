"""Where the curvature sweep starts: at the scalar loss, or at the model output
with a closed-form boundary (docs/math.md, "Back-propagating second
derivatives": the boundary condition).

The loss is part of the graph. ``obd`` and ``lm`` compute ``loss_fn(output,
target)`` and start the sweep at the scalar loss with ``g = 1, H = 0``; the
loss's own autograd nodes are swept with the same registry as the model's
(rules_losses.py: log_softmax, nll_loss, mse/huber/smooth-l1/BCE nodes; sums,
products, logs and the rest as anywhere). So any loss built from supported ops
works: CrossEntropyLoss with class weights, label smoothing or probabilities,
BCEWithLogitsLoss with ``weight``/``pos_weight``, NLLLoss, HuberLoss,
SmoothL1Loss, KLDivLoss (``log_target`` either way), a loss plus a regulariser
term, and a user's own loss written from torch ops. A loss node without a rule
is an :class:`UnsupportedOpError` naming the loss.

What reaches the model output is exact (the loss's gradient and the diagonal of
its Hessian there) wherever the sweep through the loss's graph is: log_softmax,
logsumexp, the pick of the target's entry, the per-entry loss nodes, elementwise
terms and regions, sums and means (every loss above; tests/test_curvature_losses.py).
A loss whose paths leave the elementwise ops and rejoin (a product of two
different sums of the output) loses those cross terms, as the model's sweep does.

Fast paths (closed forms below, ``boundary_for``): plain nn.MSELoss,
nn.CrossEntropyLoss with class indices (no weight, no label smoothing) and
nn.BCEWithLogitsLoss without weights, and their functional forms with default
arguments, seed the sweep at the model output directly: one fused pass, never a
logits-sized graph of the loss (the benchmark GPT's vocabulary makes that
matter). They give the same numbers as the sweep through the loss's ops.

Where the model ends (what ``lm`` keeps):
    The model output is what is handed to ``loss_fn`` (a tensor, or each tensor of
    a tuple / dict such as a Hugging Face model's output). For ``obd`` this
    changes nothing (every node keeps its f'' term). For ``lm`` (Gauss-Newton),
    the loss's nodes keep their f'' terms and the model's drop them: what
    reaches the model output is the diagonal of the loss's own Hessian with
    respect to it, computed through the loss's ops, and it is carried down the
    model as ``J^T H J``. One exception: a model output made by ``log_softmax``
    counts as part of the loss (the boundary is at the logits). Losses on
    log-probabilities (NLLLoss, KLDivLoss, a likelihood written by hand) are
    linear in them, so their Gauss-Newton matrix there is zero; at the logits,
    ``log_softmax`` + NLL is cross-entropy, with its usual Gauss-Newton matrix.
    Anything else the loss reads directly, such as the parameters in a
    regulariser ``loss + 1e-3 * sum(w**2)``, is an output of the "model"
    ``identity``: ``lm`` (and ``obd``) add the regulariser's own Hessian
    diagonal (``2e-3`` per entry here). For a loss that is not convex in the
    output, ``lm``'s boundary can be negative (``Curvature.negative`` counts it).
    ``fisher`` and ``ggn-mc`` need per-sample losses: a regulariser term, or any
    loss not in PER_SAMPLE_LOSSES, is a clear error there.

Each closed-form rule returns ``(loss, g, h_obd, h_lm)`` for a model output ``y``:
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
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops

__all__ = ["Boundary", "boundary_for", "model_end", "output_tensors", "loss_sweep_seed", "SUPPORTED_LOSSES",
           "PER_SAMPLE_LOSSES", "per_sample_scale", "sampled_targets", "categorical_draw"]

# Losses that fisher / ggn-mc take: each is c * (sum of per-sample losses), c known.
PER_SAMPLE_LOSSES = ("nn.MSELoss", "nn.CrossEntropyLoss (class indices or probabilities, weight, ignore_index, "
                     "label_smoothing)", "nn.NLLLoss", "nn.BCEWithLogitsLoss (weight, pos_weight)", "nn.HuberLoss",
                     "nn.SmoothL1Loss", "nn.KLDivLoss (log_target either way)", "F.mse_loss", "F.cross_entropy",
                     "F.nll_loss", "F.binary_cross_entropy_with_logits", "F.huber_loss", "F.smooth_l1_loss",
                     "F.kl_div")

# Losses with a closed-form boundary (the fast path); any other loss built from
# supported ops is swept through its own ops.
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


def boundary_for(loss_fn) -> Optional[Callable[..., Optional[Boundary]]]:
    """The closed-form boundary of a loss module or functional (the fast path),
    called as ``rule(y, target, need_g=True)``; None where the sweep goes through
    the loss's own ops instead (any other loss; a rule returns None for targets it
    does not take, such as class probabilities)."""
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        red = getattr(loss_fn, "reduction", "mean")
        return lambda y, t, need_g=True: mse(y, t, red)
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            if loss_fn.weight is not None or loss_fn.label_smoothing:
                return None
            red, ign = loss_fn.reduction, loss_fn.ignore_index
        else:
            red, ign = "mean", -100
        return lambda y, t, need_g=True: None if t.is_floating_point() else cross_entropy(y, t, red, ign, need_g)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (loss_fn.weight is not None or loss_fn.pos_weight is not None):
            return None
        red = getattr(loss_fn, "reduction", "mean")
        return lambda y, t, need_g=True: bce_with_logits(y, t, red)
    return None


def model_end(output) -> List[object]:
    """The nodes where the model ends, for ``lm`` (module docstring, "Where the model
    ends"): each output tensor's ``grad_fn`` (a tuple or dict of tensors: each), or the
    input's of a trailing ``log_softmax``."""
    ends = []
    for t in output_tensors(output):
        node = t.grad_fn
        if type(node).__name__ == "LogSoftmaxBackward0" and node.next_functions[0][0] is not None:
            node = node.next_functions[0][0]
        ends.append(node)
    return ends


def output_tensors(output) -> List[Tensor]:
    """The tensors with a graph in a model output (a tensor, or a tuple / list / dict
    of them, as Hugging Face models return)."""
    from torch.utils._pytree import tree_leaves

    leaves = [output] if isinstance(output, Tensor) else tree_leaves(output)
    return [t for t in leaves if isinstance(t, Tensor) and t.grad_fn is not None]


def loss_sweep_seed(loss_fn, output: Tensor, target) -> Tuple[Tensor, str]:
    """``loss_fn(output, target)`` with its graph, checked to be a scalar that
    depends on the output; and the loss's name for errors."""
    name = _loss_name(loss_fn)
    with torch.enable_grad():
        loss = loss_fn(output, target)
    if not isinstance(loss, Tensor):
        raise TypeError(f"obd_ext curvature: the loss {name} returned {type(loss).__name__}, not a tensor")
    if loss.numel() != 1:
        raise ValueError(f"obd_ext curvature: the loss {name} returned a tensor of shape {tuple(loss.shape)}; obd and "
                         "lm need a scalar loss (reduction 'mean' or 'sum', not 'none')")
    if loss.grad_fn is None:
        raise ValueError(f"obd_ext curvature: the loss {name} has no autograd graph: it does not depend on the model "
                         "output (was the output detached?)")
    return loss, name


def _loss_name(loss_fn) -> str:
    if isinstance(loss_fn, nn.Module):
        return type(loss_fn).__name__
    return getattr(loss_fn, "__qualname__", None) or getattr(loss_fn, "__name__", None) or repr(loss_fn)


def _per_sample_kind(loss_fn) -> str:
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        return "mse"
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        return "ce"
    if isinstance(loss_fn, nn.NLLLoss) or loss_fn is F.nll_loss:
        return "nll"
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        return "bce"
    if isinstance(loss_fn, (nn.HuberLoss, nn.SmoothL1Loss)) or loss_fn in (F.huber_loss, F.smooth_l1_loss):
        return "huber"
    if isinstance(loss_fn, nn.KLDivLoss) or loss_fn is F.kl_div:
        return "kl"
    raise NotImplementedError(
        f"obd_ext curvature: fisher and ggn-mc need a loss that is a known multiple of a sum over samples; "
        f"{_loss_name(loss_fn)} is not one of {', '.join(PER_SAMPLE_LOSSES)} (a regulariser term added to a loss "
        "is not a sum over samples either: take fisher of the data loss and add the term's own curvature). "
        "method='obd', 'lm', 'hutchinson' or 'exact' work with any loss built from supported ops."
    )


def per_sample_scale(loss_fn, out: Tensor, target: Tensor) -> float:
    """The factor c with ``loss_fn(out, target) = c * sum_n loss_n`` (loss_n: sample n's
    loss under reduction "sum"); a clear error for a loss fisher / ggn-mc cannot split.

    "mean" divides by what PyTorch divides by: the number of entries (MSE, BCE, Huber,
    SmoothL1, KLDiv), the non-ignored class-index targets or their class weights' sum
    (cross-entropy, NLL), and the rows for class-probability targets (N times the
    spatial size: never N x C); KLDiv's "batchmean" by the batch size.
    """
    kind = _per_sample_kind(loss_fn)
    red = getattr(loss_fn, "reduction", "mean")
    if red == "sum":
        return 1.0
    if red == "batchmean" and kind == "kl":
        return 1.0 / max(out.shape[0] if out.dim() else 1, 1)
    if red != "mean":
        raise ValueError(f"loss reduction must be 'mean' or 'sum' for curvature, got {red!r} ({_loss_name(loss_fn)})")
    if kind in ("mse", "bce", "huber", "kl"):
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
    nll = isinstance(loss_fn, nn.NLLLoss) or loss_fn is F.nll_loss
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy or nll:
        if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and (
                loss_fn.weight is not None or getattr(loss_fn, "label_smoothing", 0.0)):
            raise NotImplementedError(
                "obd_ext curvature: ggn-mc draws class targets from the model, which estimates the Gauss-Newton "
                f"matrix of the plain cross-entropy only; {_loss_name(loss_fn)} with class weights or label "
                "smoothing is not supported by ggn-mc. Use method='fisher', 'hutchinson' or 'exact'."
            )
        # NLLLoss takes log-probabilities (a model ending in log_softmax): they are the draw's own
        probs = (y.exp() if nll else F.softmax(y, dim=1)).movedim(1, -1).reshape(-1, y.shape[1])
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
