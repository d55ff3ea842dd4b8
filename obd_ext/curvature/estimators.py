"""Curvature estimators other than the back-propagated diagonal, for comparison.

- ``fisher``: empirical Fisher, ``c * sum_n (d l_n / d theta)^2`` with ``l_n``
  the per-sample loss and ``c`` the loss's reduction factor;
- ``ggn-mc``: the same with targets drawn from the model's own predictive
  distribution (an unbiased estimate of the GGN diagonal);
- ``hutchinson``: ``E[v * Hv]`` over Rademacher ``v`` (any model, any loss);
- ``exact``: the Hessian's diagonal by autograd (small models, validation).

Per-sample gradients come from torch.func in chunks of samples, so memory is
bounded by ``chunk x parameters``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call, grad, vmap

from .. import ops
from .losses import boundary_for, sampled_targets

__all__ = ["per_sample_squared", "hutchinson", "exact"]


def _sum_loss(loss_fn) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample loss: the same loss with reduction 'sum' over one sample."""
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        import copy

        summed = copy.copy(loss_fn)
        summed.reduction = "sum"
        return summed
    return lambda y, t: loss_fn(y, t, reduction="sum")


# Modules whose per-sample gradients the squared-operand fast path handles: a
# chain of Linear layers and elementwise functions, one row per sample.
_ROWWISE = (nn.Sequential, nn.ModuleList, nn.Linear, nn.Identity, nn.Flatten, nn.Tanh, nn.Sigmoid, nn.ReLU,
            nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Hardtanh, nn.ReLU6, nn.Softmax, nn.LogSoftmax)


def _rows_fast_path(model: nn.Module, loss_fn, x: Tensor, y: Tensor, params: Dict[str, Tensor], sample_targets: bool,
                    generator: Optional[torch.Generator]) -> Tuple[Optional[Dict[str, Tensor]], Optional[Tensor]]:
    """``c * sum_n g_n^2`` without per-sample gradients, when every sample is one row.

    For a Linear layer whose input X has one row per sample, the per-sample
    weight gradient is the outer product g_n x_n^T, so the sum of its squares
    is the squared-operand product (G*G)^T (X*X) (the bias: the column sums of
    G*G). G, the gradient of the batch loss at the layer's output, is c times
    the per-sample one, hence the 1/c. Applies when the model is a chain of
    Linear layers and elementwise modules, each Linear is called once on a
    (batch x features) input, and only their weights and biases are asked
    for; otherwise returns (None, targets drawn so far) for the general path.
    """
    if not all(type(m) in _ROWWISE for m in model.modules()):
        return None, None
    owner = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            for pn in ("weight", "bias"):
                if getattr(mod, pn) is not None:
                    owner[f"{mname}.{pn}" if mname else pn] = (mod, pn)
    if not set(params) <= set(owner):
        return None, None
    seen: Dict[nn.Module, list] = {}
    hooks = []
    for mod in {m for m, _ in owner.values()}:
        hooks.append(mod.register_forward_hook(lambda m, inp, out: seen.setdefault(m, []).append([inp[0], None])))
        hooks.append(mod.register_full_backward_hook(lambda m, gin, gout: seen[m][-1].__setitem__(1, gout[0])))
    try:
        # The first layer's input needs no gradient, which makes full backward
        # hooks warn; its grad_output (all the fast path reads) is still there.
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = model(x)
            targets = sampled_targets(out, loss_fn, generator) if sample_targets else y
            scale = boundary_for(loss_fn)(out, targets).scale
            torch.autograd.grad(loss_fn(out, targets), list(params.values()), allow_unused=True)
    finally:
        for hk in hooks:
            hk.remove()
    result = {}
    for name in params:
        mod, pn = owner[name]
        calls = seen.get(mod, [])
        if len(calls) != 1 or calls[0][1] is None or calls[0][0].dim() != 2 or calls[0][0].shape[0] != x.shape[0]:
            return None, targets  # used twice, or not one row per sample: per-sample gradients needed
        xin, g = calls[0][0].detach(), calls[0][1].detach()
        result[name] = (ops.squared_mm(g.t(), xin, True, True) if pn == "weight" else (g * g).sum(0)) / scale
    return result, targets


def per_sample_squared(model: nn.Module, loss_fn, x: Tensor, y: Tensor, params: Dict[str, Tensor],
                       sample_targets: bool, generator: Optional[torch.Generator], chunk: int = 64
                       ) -> Dict[str, Tensor]:
    """``c * sum_n g_n^2`` over the batch (empirical Fisher, or MC-GGN with sampled targets)."""
    fast, drawn = _rows_fast_path(model, loss_fn, x, y, params, sample_targets, generator)
    if fast is not None:
        return fast
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    loss_n = _sum_loss(loss_fn)
    with torch.no_grad():
        out = model(x)
    targets = drawn if drawn is not None else (sampled_targets(out, loss_fn, generator) if sample_targets else y)
    scale = boundary_for(loss_fn)(out, targets).scale
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

    g_fn = vmap(grad(one), in_dims=(None, 0, 0))
    live = {k: v.detach() for k, v in params.items()}
    acc = {k: torch.zeros_like(v) for k, v in live.items()}
    for s in range(0, x.shape[0], chunk):
        gs = g_fn(live, x[s:s + chunk], grouped[s:s + chunk])
        for k in acc:
            acc[k] += (gs[k] * gs[k]).sum(0)
    return {k: v * scale for k, v in acc.items()}


def hutchinson(loss: Tensor, params: Dict[str, Tensor], samples: int, generator: Optional[torch.Generator]
               ) -> Dict[str, Tensor]:
    """``mean over v of v * (H v)``, Rademacher v, by double backward."""
    names = list(params)
    tensors = [params[k] for k in names]
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    acc = [torch.zeros_like(t) for t in tensors]
    for _ in range(samples):
        vs = [torch.randint(0, 2, t.shape, generator=generator, device="cpu").to(t.device, t.dtype) * 2 - 1
              for t in tensors]
        hv = torch.autograd.grad(grads, tensors, vs, retain_graph=True)
        for a, v, h in zip(acc, vs, hv):
            a += v * h
    return {k: a / samples for k, a in zip(names, acc)}


def exact(loss: Tensor, params: Dict[str, Tensor], rows_per_pass: int = 256) -> Dict[str, Tensor]:
    """The Hessian's diagonal, row blocks of each parameter's Hessian at a time."""
    names = list(params)
    tensors = [params[k] for k in names]
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    out = {}
    for name, p, g in zip(names, tensors, grads):
        gf = g.reshape(-1)
        n = gf.numel()
        diag = torch.empty(n, dtype=p.dtype, device=p.device)
        for s in range(0, n, rows_per_pass):
            e = min(n, s + rows_per_pass)
            eye = torch.zeros(e - s, n, dtype=p.dtype, device=p.device)
            eye[torch.arange(e - s), torch.arange(s, e)] = 1
            rows = torch.autograd.grad(gf, p, eye, retain_graph=True, is_grads_batched=True)[0].reshape(e - s, n)
            diag[s:e] = rows[torch.arange(e - s), torch.arange(s, e)]
        out[name] = diag.reshape(p.shape)
    return out
