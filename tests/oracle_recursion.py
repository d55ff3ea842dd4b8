"""Independent oracle for the OBD diagonal second-derivative recursion.

Written from the paper's eq. 5-8 (restated in docs/math.md, "The network and
its second derivatives" to "The same rules for whole tensors") without looking at ``obd_ext.curvature``. Plain PyTorch: the
forward pass runs the modules themselves, while the backward passes (the
first-order gradient G and the second-order recursion H) are written by hand,
with closed-form f' and f'' for every activation.

Conventions (per pattern, summed over the batch rows):

* Linear ``Y = X W^T + b``: ``h_W = H_y^T (X*X)``, ``h_b = sum_rows H_y``,
  ``H_x = H_y (W*W)``; ``G_x = G_y W``.
* Conv2d: ``h_W`` is the weight-gradient convolution of ``X*X`` with ``H_y``,
  ``H_x`` the input-gradient convolution of ``H_y`` with ``W*W``.
* Activation ``x = f(a)``: ``H_a = f'(a)^2 H_x + f''(a) G_x`` (second term
  dropped when ``lm``), ``G_a = f'(a) G_x``.
* MaxPool2d routes H and G to the argmax (like the gradient).
* AvgPool2d is a linear layer with fixed weights ``1/d`` (``d`` the divisor
  of the window): ``G_x`` gets ``G_y/d`` and, by the squared-weight rule of
  eq. 7, ``H_x`` gets ``H_y/d^2``, summed over the windows containing it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

_ELEMENTWISE = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.SiLU, nn.GELU, nn.Hardtanh)


def _act_derivs(m: nn.Module, a: Tensor) -> Tuple[Tensor, Tensor]:
    """Closed-form (f'(a), f''(a)) of an elementwise activation module."""
    zero = torch.zeros_like(a)
    one = torch.ones_like(a)
    if isinstance(m, nn.Tanh):
        t = torch.tanh(a)
        d1 = 1.0 - t * t
        return d1, -2.0 * t * d1
    if isinstance(m, nn.Sigmoid):
        s = torch.sigmoid(a)
        d1 = s * (1.0 - s)
        return d1, d1 * (1.0 - 2.0 * s)
    if isinstance(m, nn.ReLU):
        # PyTorch's gradient at 0 is 0.
        return (a > 0).to(a.dtype), zero
    if isinstance(m, nn.LeakyReLU):
        return torch.where(a > 0, one, one * m.negative_slope), zero
    if isinstance(m, nn.ELU):
        # a <= 0: alpha (e^a - 1), f' = f'' = alpha e^a.
        e = m.alpha * torch.exp(torch.clamp(a, max=0.0))
        return torch.where(a > 0, one, e), torch.where(a > 0, zero, e)
    if isinstance(m, nn.Softplus):
        # f = log(1 + e^{beta a}) / beta, linear where beta a > threshold.
        z = a * m.beta
        s = torch.sigmoid(z)
        lin = z > m.threshold
        return torch.where(lin, one, s), torch.where(lin, zero, m.beta * s * (1.0 - s))
    if isinstance(m, nn.SiLU):
        # f = a s, f' = s (1 + a (1 - s)), f'' = s (1 - s) (2 + a (1 - 2 s)).
        s = torch.sigmoid(a)
        return s * (1.0 + a * (1.0 - s)), s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s))
    if isinstance(m, nn.GELU):
        if m.approximate == "none":
            # f = a Phi(a), f' = Phi + a phi, f'' = phi (2 - a^2).
            phi = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
            cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
            return cdf + a * phi, phi * (2.0 - a * a)
        if m.approximate == "tanh":
            # f = a (1 + tanh u) / 2, u = k (a + c a^3).
            k, c = math.sqrt(2.0 / math.pi), 0.044715
            t = torch.tanh(k * (a + c * a * a * a))
            sech2 = 1.0 - t * t
            du = k * (1.0 + 3.0 * c * a * a)
            ddu = k * 6.0 * c * a
            d1 = 0.5 * (1.0 + t) + 0.5 * a * sech2 * du
            d2 = sech2 * du + 0.5 * a * sech2 * (ddu - 2.0 * t * du * du)
            return d1, d2
        raise NotImplementedError(f"GELU approximate={m.approximate!r}")
    if isinstance(m, nn.Hardtanh):
        # PyTorch's gradient is 0 at the clipping points.
        return ((a > m.min_val) & (a < m.max_val)).to(a.dtype), zero
    raise NotImplementedError(f"unsupported activation {type(m).__name__}")


def _flatten_layers(model: nn.Module) -> List[nn.Module]:
    """The leaf layers of a (possibly nested) nn.Sequential, in order."""
    if isinstance(model, nn.Sequential):
        out: List[nn.Module] = []
        for child in model:
            out.extend(_flatten_layers(child))
        return out
    return [model]


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_padding(m: nn.Conv2d) -> Tuple[int, int]:
    """Symmetric zero padding of a Conv2d as an int pair."""
    if m.padding_mode != "zeros":
        raise NotImplementedError(f"Conv2d padding_mode={m.padding_mode!r}")
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(_pair(m.dilation), _pair(m.kernel_size))]
        if any(t % 2 for t in total):
            raise NotImplementedError("Conv2d padding='same' with asymmetric padding")
        return (total[0] // 2, total[1] // 2)
    return _pair(m.padding)


def _sum_pool_backward(v: Tensor, in_hw: Tuple[int, int], k: Tuple[int, int], s: Tuple[int, int]) -> Tensor:
    """Adjoint of an unpadded sum-pool: scatter every window value onto its inputs."""
    oh, ow = v.shape[-2:]
    bh = max(in_hw[0], (oh - 1) * s[0] + k[0])
    bw = max(in_hw[1], (ow - 1) * s[1] + k[1])
    buf = v.new_zeros(*v.shape[:-2], bh, bw)
    for i in range(k[0]):
        for j in range(k[1]):
            buf[..., i:i + (oh - 1) * s[0] + 1:s[0], j:j + (ow - 1) * s[1] + 1:s[1]] += v
    return buf[..., :in_hw[0], :in_hw[1]]


def _avg_divisor(m: nn.AvgPool2d, in_hw: Tuple[int, int], out_hw: Tuple[int, int], like: Tensor) -> Tensor:
    """Divisor of every output window (out_h x out_w) of an unpadded AvgPool2d."""
    if m.divisor_override:
        return like.new_full(out_hw, float(m.divisor_override))
    k = _pair(m.kernel_size)
    s = _pair(m.stride if m.stride is not None else m.kernel_size)
    counts = []
    for dim in range(2):
        start = torch.arange(out_hw[dim], dtype=like.dtype, device=like.device) * s[dim]
        end = torch.clamp(start + k[dim], max=in_hw[dim])
        counts.append(end - start)
    return counts[0][:, None] * counts[1][None, :]


def _boundary(y: Tensor, target: Tensor, loss: str, reduction: str) -> Tuple[Tensor, Tensor]:
    """(H_y, G_y): diagonal Hessian and gradient of the loss at the model output."""
    if reduction not in ("sum", "mean"):
        raise NotImplementedError(f"reduction={reduction!r}")
    if loss == "mse":
        c = 1.0 if reduction == "sum" else 1.0 / y.numel()
        return torch.full_like(y, 2.0 * c), 2.0 * c * (y - target.to(y.dtype))
    if loss == "ce":
        if y.dim() != 2:
            raise NotImplementedError("ce expects logits of shape (N, C)")
        c = 1.0 if reduction == "sum" else 1.0 / y.shape[0]
        p = torch.softmax(y, dim=1)
        onehot = F.one_hot(target.long(), y.shape[1]).to(y.dtype)
        return c * p * (1.0 - p), c * (p - onehot)
    raise NotImplementedError(f"loss={loss!r}")


def _recursion(model: nn.Sequential, x: Tensor, target: Tensor, loss: str, reduction: str,
               lm: bool) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Tensor, Tensor]:
    """Run the recursion; return (h per parameter, gradient per parameter, H at input, G at input)."""
    dtype = x.dtype
    layers = _flatten_layers(model)
    h: Dict[int, Tensor] = {}
    g: Dict[int, Tensor] = {}

    def add(p: Tensor, hv: Tensor, gv: Tensor) -> None:
        key = id(p)
        hv, gv = hv.reshape(p.shape), gv.reshape(p.shape)
        h[key] = h[key] + hv if key in h else hv
        g[key] = g[key] + gv if key in g else gv

    # Forward: keep every layer's input.
    inputs: List[Tensor] = []
    cur = x
    with torch.no_grad():
        for m in layers:
            if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d) + _ELEMENTWISE):
                raise NotImplementedError(f"unsupported layer {type(m).__name__}")
            inputs.append(cur)
            if isinstance(m, nn.Linear):
                cur = F.linear(cur, m.weight.to(dtype), None if m.bias is None else m.bias.to(dtype))
            elif isinstance(m, nn.Conv2d):
                if m.groups != 1:
                    raise NotImplementedError("Conv2d with groups != 1")
                cur = F.conv2d(cur, m.weight.to(dtype), None if m.bias is None else m.bias.to(dtype),
                               _pair(m.stride), _conv_padding(m), _pair(m.dilation), 1)
            elif isinstance(m, nn.AvgPool2d) and _pair(m.padding) != (0, 0):
                raise NotImplementedError("AvgPool2d with padding")
            else:
                cur = m(cur)
        y = cur

    H, G = _boundary(y, target, loss, reduction)

    # Backward: second-order recursion and ordinary gradient side by side.
    with torch.no_grad():
        for m, a in zip(reversed(layers), reversed(inputs)):
            if isinstance(m, nn.Linear):
                W = m.weight.to(dtype)
                X2 = a.reshape(-1, a.shape[-1])
                Hr, Gr = H.reshape(-1, H.shape[-1]), G.reshape(-1, G.shape[-1])
                add(m.weight, Hr.t() @ (X2 * X2), Gr.t() @ X2)
                if m.bias is not None:
                    add(m.bias, Hr.sum(0), Gr.sum(0))
                H, G = (Hr @ (W * W)).reshape(a.shape), (Gr @ W).reshape(a.shape)
            elif isinstance(m, nn.Conv2d):
                W = m.weight.to(dtype)
                st, pad, dil = _pair(m.stride), _conv_padding(m), _pair(m.dilation)
                add(m.weight,
                    torch.nn.grad.conv2d_weight(a * a, W.shape, H, st, pad, dil, 1),
                    torch.nn.grad.conv2d_weight(a, W.shape, G, st, pad, dil, 1))
                if m.bias is not None:
                    add(m.bias, H.sum((0, 2, 3)), G.sum((0, 2, 3)))
                H, G = (torch.nn.grad.conv2d_input(a.shape, W * W, H, st, pad, dil, 1),
                        torch.nn.grad.conv2d_input(a.shape, W, G, st, pad, dil, 1))
            elif isinstance(m, _ELEMENTWISE):
                d1, d2 = _act_derivs(m, a)
                Hn = d1 * d1 * H
                if not lm:
                    Hn = Hn + d2 * G
                H, G = Hn, d1 * G
            elif isinstance(m, nn.Flatten):
                H, G = H.reshape(a.shape), G.reshape(a.shape)
            elif isinstance(m, nn.MaxPool2d):
                _, idx = F.max_pool2d(a, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                      return_indices=True)
                lead = a.shape[:-2]
                idx = idx.reshape(*lead, -1)

                def route(v: Tensor) -> Tensor:
                    out = v.new_zeros(*lead, a.shape[-2] * a.shape[-1])
                    return out.scatter_add_(-1, idx, v.reshape(*lead, -1)).reshape(a.shape)

                H, G = route(H), route(G)
            elif isinstance(m, nn.AvgPool2d):
                k = _pair(m.kernel_size)
                s = _pair(m.stride if m.stride is not None else m.kernel_size)
                in_hw = (a.shape[-2], a.shape[-1])
                d = _avg_divisor(m, in_hw, (H.shape[-2], H.shape[-1]), H)
                H = _sum_pool_backward(H / (d * d), in_hw, k, s)
                G = _sum_pool_backward(G / d, in_hw, k, s)
            else:  # pragma: no cover - rejected in the forward pass
                raise NotImplementedError(type(m).__name__)

    diag = {n: h[id(p)] if id(p) in h else torch.zeros(p.shape, dtype=dtype, device=x.device)
            for n, p in model.named_parameters()}
    grad = {n: g[id(p)] if id(p) in g else torch.zeros(p.shape, dtype=dtype, device=x.device)
            for n, p in model.named_parameters()}
    return diag, grad, H, G


def recursion_diag(model: torch.nn.Sequential, x: torch.Tensor, target: torch.Tensor,
                   loss: str, reduction: str, lm: bool) -> dict[str, torch.Tensor]:
    """OBD diagonal second derivatives (eq. 5-8), summed over the batch, per named parameter.

    ``loss`` is "mse" (``c * sum (y - target)^2``) or "ce" (softmax
    cross-entropy on logits of shape (N, C), integer targets); ``reduction``
    is "sum" or "mean"; ``lm=True`` drops every f'' term. Values are in the
    dtype of ``x``. Unsupported layers raise NotImplementedError.
    """
    return _recursion(model, x, target, loss, reduction, lm)[0]
