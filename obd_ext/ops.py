"""Thin wrappers over ``torch.ops.obd_ext``, with their fake kernels and autograd.

This is the only module that talks to ``torch.ops.obd_ext``. The schemas live
in ``csrc/ops.cpp``; the CPU and CUDA kernels register themselves when
``obd_ext._C`` loads. Fake kernels make every op traceable by
``torch.compile``; ``saliency`` and ``group_saliency`` are differentiable.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the kernels)
from .constants import NUM_STATS, saliency_dtype

__all__ = ["saliency", "group_saliency", "global_select_", "row_select_", "nm_select_", "activation_hessian",
           "softmax_hessian", "layer_norm_hessian", "cross_entropy_boundary", "squared_mm", "squared_conv",
           "column_sq_sum_", "MUTATING_OPS"]

_ops = torch.ops.obd_ext


def saliency(weight: Tensor, hessian_diag: Tensor) -> Tensor:
    """``h * w^2 / 2`` in float32 (float64 if an operand is float64)."""
    return _ops.saliency.default(weight, hessian_diag)


def group_saliency(weight: Tensor, hessian_diag: Tensor, dim: int = 0) -> Tensor:
    """Sum of saliencies over every dimension but ``dim`` (one value per unit/channel)."""
    return _ops.group_saliency.default(weight, hessian_diag, dim)


def global_select_(
    weights: Sequence[Tensor],
    curvatures: Sequence[Tensor],
    masks: Sequence[Tensor],
    k: int,
    factor: Optional[float],
    skip_nonfinite: bool,
) -> Tensor:
    """Exact global selection in place; see the schema in csrc/ops.cpp."""
    return _ops.global_select_.default(list(weights), list(curvatures), list(masks), k, factor, skip_nonfinite)


def row_select_(
    weight: Tensor, curvature: Tensor, mask: Tensor, k: int, factor: Optional[float], skip_nonfinite: bool
) -> Tensor:
    """Per-output-row selection in place; see the schema in csrc/ops.cpp."""
    return _ops.row_select_.default(weight, curvature, mask, k, factor, skip_nonfinite)


def nm_select_(
    weight: Tensor, curvature: Tensor, mask: Tensor, n: int, m: int, factor: Optional[float], skip_nonfinite: bool
) -> Tensor:
    """N:M selection in place; see the schema in csrc/ops.cpp."""
    return _ops.nm_select_.default(weight, curvature, mask, n, m, factor, skip_nonfinite)


def activation_hessian(saved: Tensor, h: Tensor, g: Optional[Tensor], kind: int, p0: float = 0.0, p1: float = 0.0,
                       p2: float = 0.0, lm: bool = False, want_g: bool = False) -> tuple:
    """The curvature sweep's activation rule in one pass; see the schema in csrc/ops.cpp."""
    return _ops.activation_hessian.default(saved, h, g, kind, p0, p1, p2, lm, want_g)


def softmax_hessian(y: Tensor, h: Tensor, g: Optional[Tensor], lm: bool, want_g: bool) -> tuple:
    """(h_in, g_in) of the softmax rule over the last dimension; see the schema in csrc/ops.cpp."""
    return _ops.softmax_hessian.default(y, h, g, lm, want_g)


def layer_norm_hessian(x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], h: Tensor,
                       g: Optional[Tensor], lm: bool, want_g: bool) -> tuple:
    """(h_x, g_x) of the layer-norm rule for the input; see the schema in csrc/ops.cpp."""
    return _ops.layer_norm_hessian.default(x, mean, rstd, weight, h, g, lm, want_g)


def cross_entropy_boundary(logits: Tensor, target: Tensor, ignore_index: int, scale: float,
                           want_g: bool = True) -> tuple:
    """(loss, g, h) of cross-entropy at N x C logits; see the schema in csrc/ops.cpp."""
    return _ops.cross_entropy_boundary.default(logits, target, ignore_index, scale, want_g)


def squared_mm(a: Tensor, b: Tensor, square_a: bool, square_b: bool) -> Tensor:
    """``(a*a if square_a else a) @ (b*b if square_b else b)``; see the schema in csrc/ops.cpp."""
    return _ops.squared_mm.default(a, b, square_a, square_b)


def squared_conv(h: Tensor, input: Tensor, weight: Tensor, bias_sizes, stride, padding, dilation, transposed: bool,
                 output_padding, groups: int, output_mask) -> tuple:
    """(H_x, h_W, h_b) of the convolution rule; see the schema in csrc/ops.cpp."""
    return _ops.squared_conv.default(h, input, weight, bias_sizes, stride, padding, dilation, transposed,
                                     output_padding, groups, output_mask)


def column_sq_sum_(acc: Tensor, x: Tensor) -> Tensor:
    """``acc[j] += sum_r x[r, j]^2`` in place (x: ``[..., acc.numel()]``); returns ``acc``."""
    _ops.column_sq_sum_.default(acc, x)
    return acc


# ---------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and devices only.
# ---------------------------------------------------------------------------


def _check_one_device(op: str, *tensors) -> None:
    """The C++ rule "all tensors on one device", for traced calls (and meta/CPU mixes)."""
    flat = [t for x in tensors for t in (x if isinstance(x, (list, tuple)) else [x]) if t is not None]
    devices = sorted({str(t.device) for t in flat})
    torch._check(len(devices) <= 1, lambda: f"obd_ext.{op}: all tensors must be on one device, got {devices}")


@torch.library.register_fake("obd_ext::saliency")
def _saliency_fake(weight: Tensor, hessian_diag: Tensor) -> Tensor:
    _check_one_device("saliency", weight, hessian_diag)
    torch._check(weight.shape == hessian_diag.shape, lambda: "obd_ext.saliency: shapes differ")
    return weight.new_empty(weight.shape, dtype=saliency_dtype(weight, hessian_diag))


@torch.library.register_fake("obd_ext::group_saliency")
def _group_saliency_fake(weight: Tensor, hessian_diag: Tensor, dim: int) -> Tensor:
    _check_one_device("group_saliency", weight, hessian_diag)
    torch._check(weight.shape == hessian_diag.shape, lambda: "obd_ext.group_saliency: shapes differ")
    return weight.new_empty((weight.shape[dim],), dtype=saliency_dtype(weight, hessian_diag))


def _stats_fake(like: Optional[Tensor]) -> Tensor:
    device = like.device if like is not None else torch.device("cpu")
    return torch.empty(NUM_STATS, dtype=torch.float64, device=device)


@torch.library.register_fake("obd_ext::global_select_")
def _global_select_fake(weights, curvatures, masks, k, factor, skip_nonfinite) -> Tensor:
    _check_one_device("global_select_", weights, curvatures, masks)
    return _stats_fake(curvatures[0] if len(curvatures) else None)


@torch.library.register_fake("obd_ext::row_select_")
def _row_select_fake(weight, curvature, mask, k, factor, skip_nonfinite) -> Tensor:
    _check_one_device("row_select_", weight, curvature, mask)
    return _stats_fake(weight)


@torch.library.register_fake("obd_ext::nm_select_")
def _nm_select_fake(weight, curvature, mask, n, m, factor, skip_nonfinite) -> Tensor:
    _check_one_device("nm_select_", weight, curvature, mask)
    return _stats_fake(weight)


@torch.library.register_fake("obd_ext::activation_hessian")
def _activation_hessian_fake(saved, h, g, kind, p0, p1, p2, lm, want_g):
    _check_one_device("activation_hessian", saved, h, g)
    torch._check(saved.shape == h.shape, lambda: "obd_ext.activation_hessian: saved and h shapes differ")
    return torch.empty_like(h), (torch.empty_like(h) if want_g else h.new_empty(0))


@torch.library.register_fake("obd_ext::softmax_hessian")
def _softmax_hessian_fake(y, h, g, lm, want_g):
    _check_one_device("softmax_hessian", y, h, g)
    torch._check(y.dim() >= 1, lambda: "obd_ext.softmax_hessian: y must have at least one dimension")
    torch._check(y.shape == h.shape, lambda: "obd_ext.softmax_hessian: y and h shapes differ")
    return torch.empty_like(h, memory_format=torch.contiguous_format), (
        torch.empty_like(h, memory_format=torch.contiguous_format) if want_g else h.new_empty(0))


@torch.library.register_fake("obd_ext::layer_norm_hessian")
def _layer_norm_hessian_fake(x, mean, rstd, weight, h, g, lm, want_g):
    _check_one_device("layer_norm_hessian", x, mean, rstd, weight, h, g)
    torch._check(x.dim() >= 1, lambda: "obd_ext.layer_norm_hessian: x must have at least one dimension")
    torch._check(x.shape == h.shape, lambda: "obd_ext.layer_norm_hessian: x and h shapes differ")
    return torch.empty_like(h, memory_format=torch.contiguous_format), (
        torch.empty_like(h, memory_format=torch.contiguous_format) if want_g else h.new_empty(0))


@torch.library.register_fake("obd_ext::cross_entropy_boundary")
def _cross_entropy_boundary_fake(logits, target, ignore_index, scale, want_g=True):
    _check_one_device("cross_entropy_boundary", logits, target)
    torch._check(logits.dim() == 2, lambda: "obd_ext.cross_entropy_boundary: logits must be N x C")
    g = torch.empty_like(logits) if want_g else logits.new_empty(0)
    return logits.new_empty((), dtype=torch.float64), g, torch.empty_like(logits)


@torch.library.register_fake("obd_ext::squared_mm")
def _squared_mm_fake(a, b, square_a, square_b):
    _check_one_device("squared_mm", a, b)
    torch._check(a.shape[-1] == b.shape[-2], lambda: "obd_ext.squared_mm: shapes cannot be multiplied")
    return a.new_empty(a.shape[:-1] + b.shape[-1:])


@torch.library.register_fake("obd_ext::squared_conv")
def _squared_conv_fake(h, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                       output_mask):
    _check_one_device("squared_conv", h, input, weight)
    return (torch.empty_like(input) if output_mask[0] else None,
            torch.empty_like(weight) if output_mask[1] else None,
            h.new_empty(bias_sizes) if output_mask[2] and bias_sizes is not None else None)


@torch.library.register_fake("obd_ext::column_sq_sum_")
def _column_sq_sum_fake(acc, x):
    _check_one_device("column_sq_sum_", acc, x)
    torch._check(x.shape[-1] == acc.shape[0], lambda: "obd_ext.column_sq_sum_: x's last dimension must match acc")


@torch.library.register_fake("obd_ext::_squared_mm_direct")
def _squared_mm_direct_fake(a, b, square_a, square_b):
    return _squared_mm_fake(a, b, square_a, square_b)


# ---------------------------------------------------------------------------
# Autograd: ds/dw = h w, ds/dh = w^2 / 2 (the forward's math, in torch ops).
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# In-place semantics of the mutating ops: version counters and autograd.
# ---------------------------------------------------------------------------

MUTATING_OPS = ("global_select_", "row_select_", "nm_select_", "column_sq_sum_")
"""The ops with ``Tensor(a!)`` arguments: they behave like torch's own in-place ops."""

# Why a Python registration: a TORCH_LIBRARY op's mutable arguments get no
# version-counter bump by themselves (torch's generated ADInplaceOrView kernels
# exist only for aten ops), so a graph that saved a weight would silently
# back-propagate through the pruned values. These kernels do what torch's own
# in-place ops do, at the same dispatch keys: ADInplaceOrView bumps the version
# of every written tensor after the kernel succeeded (a failed call changes
# nothing, so it bumps nothing), and Autograd refuses, in grad mode, to write a
# tensor that requires grad (the ops have no derivative). Traced calls
# (torch.compile's functionalization, opcheck) pass through the same keys.
# There is no public API to redispatch below a key; torch.library.custom_op
# uses the same keyset (torch/_library/custom_ops.py).
_impl_lib = torch.library.Library("obd_ext", "IMPL")  # noqa: TOR901 - lives as long as the module


def _writer(schema):
    """A function giving the tensors an op call writes (its ``Tensor(a!)`` and ``Tensor(a!)[]`` arguments).

    Built once per op, so a call pays for a few index lookups only. The
    selection ops write their weights only when ``factor`` is given (see
    csrc/ops.cpp); with ``factor=None`` the weights are read, not written, and
    keep their version (``select_global`` must not break a graph that saved them).
    """
    names = [a.name for a in schema.arguments]
    mutable = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    factor = names.index("factor") if "factor" in names else None
    weights = [i for i in mutable if names[i] in ("weights", "weight")]
    always = [i for i in mutable if i not in weights]

    def written(args) -> list:
        idx = always if (factor is not None and args[factor] is None) else mutable
        out = []
        for i in idx:
            v = args[i]
            if isinstance(v, (list, tuple)):
                out.extend(v)
            elif v is not None:
                out.append(v)
        return out

    return written


def _register_inplace(name: str) -> None:
    op = getattr(_ops, name).default
    written = _writer(op._schema)
    below_inplace = torch._C._after_ADInplaceOrView_keyset
    below_autograd = torch._C._after_autograd_keyset
    bump = torch.autograd.graph.increment_version

    def inplace_or_view(keyset, *args):
        ts = written(args)
        if not torch.is_inference_mode_enabled():
            for t in ts:
                if t.is_inference():
                    raise RuntimeError(f"obd_ext.{name}: Inplace update to inference tensor outside InferenceMode is "
                                       "not allowed (as for torch's own in-place ops)")
        out = op.redispatch(keyset & below_inplace, *args)
        for t in ts:
            bump(t)
        return out

    def autograd(keyset, *args):
        if torch.is_grad_enabled():
            for t in written(args):
                if t.requires_grad:
                    raise RuntimeError(
                        f"obd_ext.{name} writes a tensor that requires grad in place and has no derivative; call "
                        "it under torch.no_grad() (obd_ext's prune_* functions do), as for torch's own in-place ops "
                        "on leaves that require grad")
        return op.redispatch(keyset & below_autograd, *args)

    _impl_lib.impl(name, inplace_or_view, "ADInplaceOrView", with_keyset=True)
    _impl_lib.impl(name, autograd, "Autograd", with_keyset=True)


for _name in MUTATING_OPS:
    _register_inplace(_name)


def _saliency_setup(ctx, inputs, output) -> None:
    weight, hessian_diag = inputs[0], inputs[1]
    ctx.save_for_backward(weight, hessian_diag)
    ctx.dim = inputs[2] if len(inputs) > 2 else None


def _saliency_grads(ctx, grad: Tensor):
    weight, hessian_diag = ctx.saved_tensors
    if ctx.dim is not None:  # group_saliency: broadcast the per-group grad back
        shape = [1] * weight.dim()
        shape[ctx.dim] = -1
        grad = grad.reshape(shape)
    dt = grad.dtype
    w = weight.to(dt)
    h = hessian_diag.to(dt)
    grad_w = (grad * h * w).to(weight.dtype) if ctx.needs_input_grad[0] else None
    grad_h = (grad * (w * w) * 0.5).to(hessian_diag.dtype) if ctx.needs_input_grad[1] else None
    return grad_w, grad_h


def _group_saliency_backward(ctx, grad: Tensor):
    return (*_saliency_grads(ctx, grad), None)


torch.library.register_autograd("obd_ext::saliency", _saliency_grads, setup_context=_saliency_setup)
torch.library.register_autograd(
    "obd_ext::group_saliency", _group_saliency_backward, setup_context=_saliency_setup
)
