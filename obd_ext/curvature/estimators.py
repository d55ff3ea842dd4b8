"""Curvature estimators other than the back-propagated diagonal, for comparison.

- ``fisher``: empirical Fisher, ``c * sum_n (d l_n / d theta)^2`` with ``l_n``
  the per-sample loss and ``c`` the loss's reduction factor;
- ``ggn-mc``: the same with targets drawn from the model's own predictive
  distribution (an unbiased estimate of the GGN diagonal);
- ``hutchinson``: ``E[v * Hv]`` over Rademacher ``v`` (any model, any loss);
- ``exact``: the Hessian's diagonal by autograd (small models, validation).

``fisher`` and ``ggn-mc`` take per-sample gradients one parameter use at a
time (per_sample.py: memory of a chunk of samples times one parameter), and
per-sample gradients of the whole model from torch.func (``chunk x
parameters``) only for what that path does not handle.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call, grad, vmap

from .losses import per_sample_scale, sampled_targets
from .per_sample import layerwise_squared
from .rules import UnsupportedOpError

__all__ = ["per_sample_squared", "hutchinson", "exact"]


def _sum_loss(loss_fn) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample loss: the same loss with reduction 'sum' over one sample."""
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        import copy

        summed = copy.copy(loss_fn)
        summed.reduction = "sum"
        return summed
    return lambda y, t: loss_fn(y, t, reduction="sum")


def _rows_fast_path(model: nn.Module, loss_fn, x: Tensor, y: Tensor, params: Dict[str, Tensor], sample_targets: bool,
                    generator: Optional[torch.Generator], draws: int = 1
                    ) -> Tuple[Optional[Dict[str, Tensor]], Optional[List[Tensor]]]:
    """The layer-wise path (per_sample.py): per-sample gradients one parameter at a time.

    It began as a fast path for Linear chains with one row per sample (whose
    squared-operand form it keeps) and keeps the name for callers that switch
    it off. Returns (curvature of the parameters it handles, or None for none;
    the targets drawn, or None when none were).
    """
    result, targets = layerwise_squared(model, loss_fn, x, y, params, sample_targets, generator, draws)
    return result, (targets or None)


def _vmap_squared(model: nn.Module, loss_fn, x: Tensor, targets: Tensor, params: Dict[str, Tensor],
                  chunk: int) -> Dict[str, Tensor]:
    """``c * sum_n g_n^2`` from per-sample gradients of the whole model (torch.func), ``chunk`` samples at a time."""
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    loss_n = _sum_loss(loss_fn)
    with torch.no_grad():
        out = model(x)
    scale = per_sample_scale(loss_fn, out, targets)
    batch = x.shape[0]
    # A sample may own several output rows (a sequence model whose output is
    # (batch * tokens, vocab)): group the targets by sample.
    rows_per_sample = targets.shape[0] // batch if targets.shape[0] % batch == 0 else None
    if rows_per_sample is None:
        raise ValueError(f"per-sample curvature: {targets.shape[0]} target rows cannot be split over {batch} samples")
    grouped = targets.reshape((batch, rows_per_sample) + tuple(targets.shape[1:]))

    def one(p, xi, ti):
        yi = functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),))
        return loss_n(yi, ti)

    g_one = grad(one)
    g_fn = vmap(g_one, in_dims=(None, 0, 0))
    live = {k: v.detach() for k, v in params.items()}
    acc = {k: torch.zeros_like(v) for k, v in live.items()}
    batched = True
    for s in range(0, x.shape[0], chunk):
        if batched:
            try:
                gs = g_fn(live, x[s:s + chunk], grouped[s:s + chunk])
            except (RuntimeError, NotImplementedError):
                # a layer vmap cannot batch (nn.LSTM's hidden state): one sample at a time
                batched = False
        if not batched:
            per = [g_one(live, x[i], grouped[i]) for i in range(s, min(s + chunk, x.shape[0]))]
            gs = {k: torch.stack([p[k] for p in per]) for k in acc}
        for k in acc:
            acc[k] += (gs[k] * gs[k]).sum(0)
    return {k: v * scale for k, v in acc.items()}


def per_sample_squared(model: nn.Module, loss_fn, x: Tensor, y: Tensor, params: Dict[str, Tensor],
                       sample_targets: bool, generator: Optional[torch.Generator], chunk: int = 64,
                       samples: int = 1) -> Dict[str, Tensor]:
    """``c * sum_n g_n^2`` over the batch (empirical Fisher, or MC-GGN with sampled targets).

    The layer-wise path (per_sample.py) handles every parameter whose uses it
    knows (Linear and matmul, convolution, embedding, LayerNorm, GroupNorm,
    BatchNorm in eval mode, elementwise scales and biases); the rest, and
    models whose samples cannot be told apart in the graph, take per-sample
    gradients of the whole model (torch.func, ``chunk`` samples at a time)
    with the same targets. With ``samples`` > 1 (ggn-mc) the result is the
    mean over that many target draws.
    """
    done, drawn = _rows_fast_path(model, loss_fn, x, y, params, sample_targets, generator, samples)
    done = done or {}
    rest = {k: v for k, v in params.items() if k not in done}
    if not rest:
        return {k: done[k] for k in params}
    if drawn is None:  # the layer-wise path was switched off
        with torch.no_grad():
            out = model(x)
        drawn = [sampled_targets(out, loss_fn, generator, y) if sample_targets else y for _ in range(samples)]
    part: Dict[str, Tensor] = {}
    for t in drawn:
        more = _vmap_squared(model, loss_fn, x, t, rest, chunk)
        part = more if not part else {k: part[k] + more[k] for k in part}
    if len(drawn) > 1:
        part = {k: v / len(drawn) for k, v in part.items()}
    return {k: done[k] if k in done else part[k] for k in params}


def hutchinson(loss: Tensor, params: Dict[str, Tensor], samples: int, generator: Optional[torch.Generator]
               ) -> Dict[str, Tensor]:
    """``mean over v of v * (H v)``, Rademacher v, by double backward."""
    try:
        return _hutchinson(loss, params, samples, generator)
    except RuntimeError as e:  # NotImplementedError, or RuntimeError for some ops (hardsigmoid)
        raise _no_double_backward(e, "hutchinson") from None


def _hutchinson(loss: Tensor, params: Dict[str, Tensor], samples: int, generator: Optional[torch.Generator]
                ) -> Dict[str, Tensor]:
    names = list(params)
    tensors = [params[k] for k in names]
    grads = _first_order(loss, tensors)
    # unused tensors, and those the loss is linear in, have zero curvature; the draws
    # are made for every tensor all the same, so results do not depend on which are
    live = [i for i, g in enumerate(grads) if g is not None and g.grad_fn is not None]
    acc = [torch.zeros_like(t) for t in tensors]
    for _ in range(samples):
        vs = [torch.randint(0, 2, t.shape, generator=generator, device="cpu").to(t.device, t.dtype) * 2 - 1
              for t in tensors]
        if not live:
            continue
        hv = torch.autograd.grad([grads[i] for i in live], [tensors[i] for i in live], [vs[i] for i in live],
                                 retain_graph=True, allow_unused=True)
        for i, h in zip(live, hv):
            if h is not None:
                acc[i] += vs[i] * h
    return {k: a / samples for k, a in zip(names, acc)}


def _no_double_backward(err: Exception, method: str) -> Exception:
    """PyTorch's error for an operation without a second derivative, in the user's terms."""
    msg = str(err)
    if "derivative for" not in msg or "is not implemented" not in msg:
        return err
    op = msg.split("'")[1] if msg.count("'") >= 2 else msg.split("derivative for ")[1].split(" is not")[0]
    hint = (" (nn.EmbeddingBag / F.embedding_bag: nn.Embedding followed by a sum or mean has one)"
            if "embedding_bag" in op else "")
    return UnsupportedOpError(
        f"obd_ext curvature: method={method!r} needs second derivatives by double backward, and PyTorch has no "
        f"derivative for {op}{hint}; use method='obd' or 'lm' (their rules need no double backward) or 'fisher'")


def _first_order(loss: Tensor, tensors: List[Tensor]) -> List[Optional[Tensor]]:
    """d loss / d tensors with a graph; None for a tensor the loss does not use (an
    untied embedding outside the forward): its curvature is 0."""
    return list(torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True))


def _hessian_rows(gf: Tensor, p: Tensor, s: int, e: int) -> Tensor:
    """Rows s..e-1 of the Hessian block of p (flattened): one batched double backward,
    or one backward per row where an operation has no batching rule for its double
    backward (GroupNorm's)."""
    n = gf.numel()
    eye = torch.zeros(e - s, n, dtype=p.dtype, device=p.device)
    eye[torch.arange(e - s), torch.arange(s, e)] = 1
    try:
        return torch.autograd.grad(gf, p, eye, retain_graph=True, is_grads_batched=True)[0].reshape(e - s, n)
    except RuntimeError:
        return torch.stack([torch.autograd.grad(gf, p, row, retain_graph=True)[0].reshape(n) for row in eye])


def exact(loss: Tensor, params: Dict[str, Tensor], rows_per_pass: int = 256) -> Dict[str, Tensor]:
    """The Hessian's diagonal, row blocks of each parameter's Hessian at a time."""
    try:
        return _exact(loss, params, rows_per_pass)
    except RuntimeError as e:  # NotImplementedError, or RuntimeError for some ops (hardsigmoid)
        raise _no_double_backward(e, "exact") from None


def _exact(loss: Tensor, params: Dict[str, Tensor], rows_per_pass: int) -> Dict[str, Tensor]:
    names = list(params)
    tensors = [params[k] for k in names]
    grads = _first_order(loss, tensors)
    out = {}
    for name, p, g in zip(names, tensors, grads):
        if g is None or g.grad_fn is None:  # unused, or the loss is linear in p
            out[name] = torch.zeros_like(p)
            continue
        gf = g.reshape(-1)
        n = gf.numel()
        diag = torch.empty(n, dtype=p.dtype, device=p.device)
        for s in range(0, n, rows_per_pass):
            e = min(n, s + rows_per_pass)
            rows = _hessian_rows(gf, p, s, e)
            diag[s:e] = rows[torch.arange(e - s), torch.arange(s, e)]
        out[name] = diag.reshape(p.shape)
    return out
