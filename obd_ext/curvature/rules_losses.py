"""Rules for ``log_softmax`` and the losses' own autograd nodes: entries of the
one registry (rules.py), which imports ``LOSS_RULES`` from here.

The sweep starts at the scalar loss (losses.py, ``loss_sweep``) and goes through
the loss's nodes with the same rules as the model's: a loss node maps the
gradient ``g`` and curvature ``H`` reaching its (scalar, or per-entry) output to
its inputs. Losses PyTorch runs as one node (MSE, Huber, SmoothL1, BCE with
logits, BCE, soft margin) have closed forms below; the others run as ops that
have rules already (cross-entropy with probabilities or label smoothing is
``log_softmax`` then sums and products, NLL is a one-to-one linear map, KLDiv a
product and a sum).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .rules import Ctx, Grads, Rule, _call, _constant_partials, _needs, _signed, _unary_partials, unary

__all__ = ["LOSS_RULES"]


def log_softmax(node, g: Grads, h: Grads, ctx: Ctx):
    """y = x - logsumexp(x) along ``dim``; with p = exp(y), dy_i/dx_j = [i = j] - p_j and
    d2y_i/dx_j^2 = -p_j (1 - p_j), so

        H_x = (1 - 2p) H + p^2 sum_i H_i  [- p (1 - p) sum_i g_i],   g_x = g - p sum_i g_i.

    Exact: the diagonal of J^T diag(H) J plus the f'' term, per row."""
    y, dim = node._saved_result, _signed(node._saved_dim)
    p = y.exp()
    hh = h[0].to(y.dtype)
    h_in = hh * (1.0 - 2.0 * p) + p * p * hh.sum(dim, keepdim=True)
    g_in = None
    if g[0] is not None and not ctx.lm:
        gg = g[0].to(y.dtype)
        total = gg.sum(dim, keepdim=True)
        h_in = h_in - p * (1.0 - p) * total
        g_in = gg - p * total if ctx.wants(0) else None
    return (g_in,), (h_in,)


def logsumexp(node, g: Grads, h: Grads, ctx: Ctx):
    """y = log sum_dims exp(x) (a cross-entropy written by hand): with p = exp(x - y),
    dy/dx_j = p_j and d2y/dx_j^2 = p_j (1 - p_j), so H_x = p^2 H [+ p (1 - p) g]."""
    x, y = node._saved_self, node._saved_result
    dims = sorted(_signed(d) % max(x.dim(), 1) for d in node._saved_dim) if x.dim() else []
    hh = h[0].to(x.dtype)
    gg = g[0].to(x.dtype) if g[0] is not None and not ctx.lm else None
    if not node._saved_keepdim:
        for d in dims:  # back to x's rank, to broadcast
            y, hh = y.unsqueeze(d), hh.unsqueeze(d)
            gg = gg.unsqueeze(d) if gg is not None else None
    p = (x - y).exp()
    h_in = p * p * hh
    g_in = None
    if gg is not None:
        h_in = h_in + p * (1.0 - p) * gg
        g_in = p * gg if ctx.wants(0) else None
    return (g_in,), (h_in,)


def one_to_one_linear(node, g: Grads, h: Grads, ctx: Ctx):
    """A linear node in which each input entry reaches at most one output entry, with
    any coefficient a (nll_loss: -w_t / total weight at the target's entry, 0
    elsewhere). With B the node's own backward, B(1) = a and B(H) = a H, so
    H_in = B(1) * B(H) = a^2 H."""
    ones = [None if x is None else torch.ones_like(x) for x in h]
    coef, h_b = _call(node, ones), _call(node, h)
    h_in = tuple(None if c is None or v is None else c * v for c, v in zip(coef, h_b))
    g_in = _call(node, g) if ctx.need_g and any(x is not None for x in g) else (None,) * len(h_in)
    return g_in, h_in


def _reduction_factor(node) -> float:
    """1/n for reduction "mean" (n entries), 1 for "sum" and "none" (at::Reduction: 0 none, 1 mean, 2 sum)."""
    return 1.0 / max(node._saved_self.numel(), 1) if int(node._saved_reduction) == 1 else 1.0


def pointwise_loss(derivs: Callable) -> Callable:
    """A loss node ``c * reduce(l(x, t))`` with l elementwise (c = 1/n for "mean"):
    ``derivs(node) -> (l_x, l_xx, l_t, l_tt)``, l's partials per entry (a second
    partial may be None: zero). Per input: H = c^2 l'^2 H_out [+ c l'' g_out],
    g = c l' g_out; for reduction "none" H_out and g_out are per entry and c = 1.
    The target's terms are used only where the target requires grad."""
    def rule(node, g: Grads, h: Grads, ctx: Ctx):
        c = _reduction_factor(node)
        f = derivs(node)
        g_out = g[0] if g[0] is not None and not ctx.lm else None
        g_in, h_in = [], []
        for slot, need in enumerate(_needs(node)):
            d1, d2 = f[2 * slot], f[2 * slot + 1]
            if not need:
                g_in.append(None)
                h_in.append(None)
                continue
            hx = (c * c) * d1 * d1 * h[0]
            if g_out is not None and d2 is not None:
                hx = hx + (c * d2) * g_out
            h_in.append(hx)
            g_in.append(c * d1 * g_out if g_out is not None and ctx.wants(slot) else None)
        return tuple(g_in), tuple(h_in)
    return rule


def _mse_derivs(node):
    d = node._saved_self - node._saved_target
    return 2.0 * d, 2.0, -2.0 * d, 2.0


def _huber_derivs(node):
    """l = d^2 / 2 for |d| < delta, else delta (|d| - delta / 2)."""
    d, delta = node._saved_self - node._saved_target, float(node._saved_delta)
    inside = (d.abs() < delta).to(d.dtype)
    d1 = d.clamp(-delta, delta)
    return d1, inside, -d1, inside


def _smooth_l1_derivs(node):
    """l = d^2 / (2 beta) for |d| < beta, else |d| - beta / 2 (beta = 0 is recorded as abs)."""
    d, beta = node._saved_self - node._saved_target, float(node._saved_beta)
    if beta == 0.0:
        return d.sign(), None, -d.sign(), None
    inside = (d.abs() < beta).to(d.dtype)
    d1 = (d / beta).clamp(-1.0, 1.0)
    return d1, inside / beta, -d1, inside / beta


def _bce_logits_derivs(node):
    """l = w [(1 - t) x + (1 - t + pw t) softplus(-x)] (weight w, pos_weight pw)."""
    x, t = node._saved_self, node._saved_target
    w, pw = node._saved_weight, node._saved_pos_weight
    k = torch.ones_like(t) if pw is None else 1.0 - t + pw * t
    s_neg = torch.sigmoid(-x)
    d1 = (1.0 - t) - k * s_neg
    d2 = k * s_neg * (1.0 - s_neg)
    d1t = -x if pw is None else -x + (pw - 1.0) * F.softplus(-x)
    if w is not None:
        d1, d2, d1t = d1 * w, d2 * w, d1t * w
    return d1, d2, d1t, None


def _bce_derivs(node):
    """l = -w [t log x + (1 - t) log(1 - x)] on probabilities x (nn.BCELoss)."""
    x, t, w = node._saved_self, node._saved_target, node._saved_weight
    d1 = (x - t) / (x * (1.0 - x)).clamp_min(1e-12)  # PyTorch's own gradient, its clamp included
    d2 = t / (x * x) + (1.0 - t) / ((1.0 - x) * (1.0 - x))
    d1t = torch.log1p(-x).clamp_min(-100.0) - torch.log(x).clamp_min(-100.0)
    if w is not None:
        d1, d2, d1t = d1 * w, d2 * w, d1t * w
    return d1, d2, d1t, None


def _soft_margin_derivs(node):
    """l = log(1 + exp(-t x))."""
    x, t = node._saved_self, node._saved_target
    s = torch.sigmoid(-t * x)
    return -t * s, t * t * s * (1.0 - s), -x * s, x * x * s * (1.0 - s)


def div_scalar(node, g: Grads, h: Grads, ctx: Ctx):
    """y = x / c for a Python number c (cross-entropy's mean over rows)."""
    c = float(node._saved_other)
    return (g[0] / c if ctx.wants(0) and g[0] is not None else None,), (h[0] / (c * c),)


def _log1p(node):
    inv = 1.0 / (1.0 + node._saved_self)
    return inv, -inv * inv


def _abs(node):
    return node._saved_self.sign(), None  # |x|'' = 0 away from 0, as autograd has it


LOSS_RULES: Dict[str, Rule] = {
    "LogSoftmaxBackward0": Rule(log_softmax, second_order=True),
    "LogsumexpBackward0": Rule(logsumexp, second_order=True),
    "NllLossBackward0": Rule(one_to_one_linear),
    "NllLoss2DBackward0": Rule(one_to_one_linear),
    "MseLossBackward0": Rule(pointwise_loss(_mse_derivs), second_order=True),
    "HuberLossBackward0": Rule(pointwise_loss(_huber_derivs), second_order=True),
    "SmoothL1LossBackward0": Rule(pointwise_loss(_smooth_l1_derivs), second_order=True),
    "BinaryCrossEntropyWithLogitsBackward0": Rule(pointwise_loss(_bce_logits_derivs), second_order=True),
    "BinaryCrossEntropyBackward0": Rule(pointwise_loss(_bce_derivs), second_order=True),
    "SoftMarginLossBackward0": Rule(pointwise_loss(_soft_margin_derivs), second_order=True),
    "DivBackward1": Rule(div_scalar, partials=_constant_partials(lambda n: 1.0 / float(n._saved_other))),
    "Log1PBackward0": Rule(unary(_log1p), second_order=True, partials=_unary_partials(_log1p)),
    "AbsBackward0": Rule(unary(_abs), partials=_unary_partials(_abs)),
}
