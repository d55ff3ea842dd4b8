"""Rules for common layers beyond the core set of rules.py: normalisations with
statistics of the input, resampling, index maps, reductions with ties and
embedding bags. Each entry joins the one registry (``rules.RULES``); see
rules.py for what a rule computes.

Where each is exact (the sweep rule's own result, against autograd in float64):
every rule here gives diag(J^T diag(H) J) (+ the f'' term for OBD) for its
node exactly; the sweep's approximation lies only in what reaches the node
(H carried as a diagonal).

- GroupNorm, BatchNorm with batch statistics (training mode, or
  ``track_running_stats=False``) and InstanceNorm (a batch norm over a reshaped
  input): the layer-norm closed form per row of normalised entries (a group of
  channels of one sample, or one channel over the batch), with the affine weight
  folded into H and g.
- Linear resampling (``F.interpolate`` linear, bilinear, bicubic, trilinear,
  antialiased or not): separable maps ``J = A_1 x A_2 x ...``, so the squared
  Jacobian is the product of the squared 1-d matrices, which are read off the
  same ATen operation applied to an identity along one axis.
- Index maps (0/1 Jacobians: nearest upsampling, pixel (un)shuffle, gather,
  index_select, as_strided, unsafe_split, where): the node's own backward
  applied to H.
- Reductions that share the gradient between tied entries (``amax``, ``amin``,
  ``max()``/``min()`` over all entries): entry j of a group of k ties has the
  Jacobian entry 1/k, so H_j = B(H)_j * B(1)_j with B the node's backward.
- EmbeddingBag: sum (with per-sample weights), mean (1/bag size per entry,
  padding excluded) and max modes.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from .. import ops
from .rules import (Ctx, Grads, Rule, UnsupportedOpError, _call, _needs, _signed, _unary_partials, batch_norm,
                    index_map, unary)

__all__ = ["LAYER_RULES"]


# ---------------------------------------------------------------------------
# Normalisations with statistics of the input
# ---------------------------------------------------------------------------


def _row_norm(x_rows: Tensor, mean: Tensor, rstd: Tensor, h_rows: Tensor, g_rows: Optional[Tensor], ctx: Ctx,
              want_g: bool):
    """The layer-norm closed form over the last dimension of ``x_rows`` (R x m), weight
    already folded into ``h_rows`` / ``g_rows``: (h_x, g_x or None)."""
    use_g = g_rows is not None and not ctx.lm
    want_g = want_g and use_g
    r = x_rows.shape[0]
    h_x, g_x = ops.layer_norm_hessian(x_rows, mean.reshape(r, 1), rstd.reshape(r, 1), None, h_rows,
                                      g_rows if use_g else None, not use_g, want_g)
    return h_x, (g_x if want_g else None)


def group_norm(node, g: Grads, h: Grads, ctx: Ctx):
    """GroupNorm: rows are (sample, group) with C/G channels x spatial entries; the
    per-channel weight folds into H (w^2) and g (w) before the closed form."""
    x = node._saved_input
    weight = node._saved_weight
    n, c, groups = int(node._saved_N), int(node._saved_C), int(node._saved_group)
    mean, rstd = node._saved_result1, node._saved_result2  # N x G
    n_x, n_w, n_b = _needs(node)
    hh = h[0].to(x.dtype)
    gg = g[0].to(x.dtype) if g[0] is not None else None
    shape_c = (1, c) + (1,) * (x.dim() - 2)
    rows = (n * groups, -1)
    h_x = g_x = None
    if n_x:
        w = weight.reshape(shape_c) if weight is not None else None
        hx_in = hh * (w * w) if w is not None else hh
        gx_in = (gg * w if w is not None else gg) if gg is not None and not ctx.lm else None
        h_x, g_x = _row_norm(x.reshape(rows), mean, rstd, hx_in.reshape(rows),
                             gx_in.reshape(rows) if gx_in is not None else None, ctx, ctx.wants(0))
        h_x = h_x.reshape(x.shape)
        g_x = g_x.reshape(x.shape) if g_x is not None else None
    red = [0] + list(range(2, x.dim()))
    h_w = h_b = None
    if n_w and weight is not None:
        xh = (x.reshape(n, groups, -1) - mean.reshape(n, groups, 1)) * rstd.reshape(n, groups, 1)
        h_w = (xh.reshape(x.shape).square_() * hh).sum(red)
    if n_b:
        h_b = hh.sum(red)
    return (g_x, None, None), (h_x, h_w, h_b)


def batch_norm_any(node, g: Grads, h: Grads, ctx: Ctx):
    """BatchNorm: eval mode is an affine map (rules.batch_norm); with batch statistics
    (training mode, InstanceNorm) each channel is one row of N x spatial entries."""
    if not node._saved_training:
        return batch_norm(node, g, h, ctx)
    x, weight = node._saved_input, node._saved_weight
    mean, rstd = node._saved_result1, node._saved_result2  # C: the batch's mean and 1/std
    c = x.shape[1]
    n_x, n_w, n_b = _needs(node)
    hh = h[0].to(x.dtype)
    gg = g[0].to(x.dtype) if g[0] is not None else None
    shape_c = (1, c) + (1,) * (x.dim() - 2)

    def rows(t: Tensor) -> Tensor:  # channel-major: C x (N * spatial)
        return t.transpose(0, 1).reshape(c, -1)

    def unrows(t: Tensor) -> Tensor:
        return t.reshape((c, x.shape[0]) + tuple(x.shape[2:])).transpose(0, 1)

    h_x = g_x = None
    if n_x:
        w = weight.reshape(shape_c) if weight is not None else None
        hx_in = hh * (w * w) if w is not None else hh
        gx_in = (gg * w if w is not None else gg) if gg is not None and not ctx.lm else None
        h_x, g_x = _row_norm(rows(x), mean, rstd, rows(hx_in), rows(gx_in) if gx_in is not None else None, ctx,
                             ctx.wants(0))
        h_x = unrows(h_x)
        g_x = unrows(g_x) if g_x is not None else None
    red = [0] + list(range(2, x.dim()))
    h_w = h_b = None
    if n_w and weight is not None:
        xh = (x - mean.reshape(shape_c)) * rstd.reshape(shape_c)
        h_w = (xh.square_() * hh).sum(red)
    if n_b:
        h_b = hh.sum(red)
    return (g_x, None, None), (h_x, h_w, h_b)


# ---------------------------------------------------------------------------
# Linear resampling: separable, squared 1-d matrices
# ---------------------------------------------------------------------------

# node type -> (ATen op, spatial dims, names of the saved per-axis scales)
_RESAMPLE = {
    "UpsampleLinear1DBackward0": ("upsample_linear1d", 1, ("_saved_scales",)),
    "UpsampleBilinear2DBackward0": ("upsample_bilinear2d", 2, ("_saved_scales_h", "_saved_scales_w")),
    "UpsampleBicubic2DBackward0": ("upsample_bicubic2d", 2, ("_saved_scales_h", "_saved_scales_w")),
    "UpsampleBilinear2DAaBackward0": ("_upsample_bilinear2d_aa", 2, ("_saved_scales_h", "_saved_scales_w")),
    "UpsampleBicubic2DAaBackward0": ("_upsample_bicubic2d_aa", 2, ("_saved_scales_h", "_saved_scales_w")),
    "UpsampleTrilinear3DBackward0": ("upsample_trilinear3d", 3, ("_saved_scales_d", "_saved_scales_h",
                                                                  "_saved_scales_w")),
}


def _axis_matrix(op, axis: int, sizes_in, sizes_out, align: bool, scales, like: Tensor) -> Tensor:
    """The op's 1-d interpolation matrix along ``axis`` (out x in): the op, with the
    node's own sizes and scales, applied to one-hot inputs along that axis that are
    constant along the others (interpolation weights sum to 1 along every axis, so
    any position on the other axes reads the matrix)."""
    nd = len(sizes_in)
    n = sizes_in[axis]
    onehot = torch.eye(n, dtype=like.dtype, device=like.device)
    shape = [n, 1] + [1] * nd
    shape[2 + axis] = n
    x = onehot.reshape(shape).expand([n, 1] + list(sizes_in)).contiguous()
    res = op(x, list(sizes_out), align, *scales)  # n x 1 x out
    pick = [slice(None), 0] + [0] * nd
    pick[2 + axis] = slice(None)
    return res[tuple(pick)].t()


def resample(name: str) -> Callable:
    op_name, nd, scale_names = _RESAMPLE[name]

    def rule(node, g: Grads, h: Grads, ctx: Ctx):
        op = getattr(torch.ops.aten, op_name)
        sizes_in = [int(s) for s in node._saved_self_sym_sizes][-nd:]
        sizes_out = [int(s) for s in node._saved_output_size]
        align = bool(node._saved_align_corners)
        hh = h[0]
        scales = [getattr(node, name) for name in scale_names]
        for k in range(nd):
            # the weights in float32 at least (half-precision interpolation kernels are not everywhere)
            like = hh if hh.dtype in (torch.float32, torch.float64) else hh.float()
            a = _axis_matrix(op, k, sizes_in, sizes_out, align, scales, like)
            dim = hh.dim() - nd + k
            hh = (hh.movedim(dim, -1) @ (a * a).to(hh.dtype)).movedim(-1, dim)
        g_in = _call(node, g)[0] if ctx.need_g and g[0] is not None else None
        return (g_in,), (hh,)

    return rule


# ---------------------------------------------------------------------------
# Reductions sharing the gradient between ties; embedding bags
# ---------------------------------------------------------------------------


def shared_ties(node, g: Grads, h: Grads, ctx: Ctx):
    """Each input entry reaches at most one output, with Jacobian entry w_j (1/k for
    k ties, 0 elsewhere): H_j = w_j^2 H = B(H)_j B(1)_j."""
    h_in = _call(node, h)[0] * _call(node, [torch.ones_like(h[0])])[0]
    g_in = _call(node, g)[0] if ctx.need_g and g[0] is not None else None
    return (g_in,), (h_in,)


def embedding_bag(node, g: Grads, h: Grads, ctx: Ctx):
    """Bag b = sum (or mean, or max) of rows W[i] (times a per-sample weight p_i):
    H_W[r] = sum over entries i with index r of c_i^2 H_b(i), c_i = p_i (sum) or
    1/|bag| (mean); the per-sample weights get sum_d W[i, d]^2 H_b(i), d."""
    mode = int(node._saved_mode)  # 0 sum, 1 mean, 2 max
    n_w = _needs(node)[0]
    n_p = len(node.next_functions) > 1 and node.next_functions[1][0] is not None
    g_in = _call(node, g) if ctx.need_g and g[0] is not None else (None, None)
    if mode == 2:
        h_in = _call(node, h)
        return tuple(g_in), tuple(h_in)
    if node._saved_scale_grad_by_freq:
        raise UnsupportedOpError("obd_ext curvature: embedding_bag with scale_grad_by_freq=True has no rule here "
                                 "(its gradient is not the derivative of the forward); use method='hutchinson' or "
                                 "'exact'", type(node).__name__)
    idx, bag = node._saved_indices, node._saved_result1
    hh = h[0]
    keep = idx != _signed(node._saved_padding_idx)
    psw = node._saved_per_sample_weights
    h_rows = hh.index_select(0, bag)  # one row of H per entry
    coef = None
    if psw is not None:
        coef = psw.to(hh.dtype) * psw.to(hh.dtype)
    if mode == 1:
        size = node._saved_result2.clamp(min=1).to(hh.dtype)
        inv = 1.0 / (size * size)
        coef = inv.index_select(0, bag) if coef is None else coef * inv.index_select(0, bag)
    coef = keep.to(hh.dtype) if coef is None else coef * keep
    h_w = h_p = None
    if n_w:
        rows = int(node._saved_weight_sym_argsize_0)
        h_w = hh.new_zeros((rows, hh.shape[1])).index_add_(0, idx, h_rows * coef.unsqueeze(1))
    if n_p:
        wsel = node._saved_weight.index_select(0, idx)
        h_p = (wsel * wsel * h_rows).sum(1) * keep
    return tuple(g_in), (h_w, h_p)


# ---------------------------------------------------------------------------
# Elementwise partials of where (regions: where(x > 0, x, a * x) is one function)
# ---------------------------------------------------------------------------


def _where_partials(node, live, second):
    cond = node._saved_condition
    dtype = node._input_metadata[0].dtype
    return [cond.to(dtype) if live[0] else None, (~cond).to(dtype) if len(live) > 1 and live[1] else None], {}


# ---------------------------------------------------------------------------
# More elementwise functions: closed-form f', f'' (rules.unary; partials for regions)
# ---------------------------------------------------------------------------


def _mish(node):
    x = node._saved_self
    s = torch.sigmoid(x)
    t = torch.tanh(torch.nn.functional.softplus(x))
    u = (1 - t * t) * s  # d tanh(softplus(x)) / dx
    return t + x * u, 2 * u + x * u * (1 - s - 2 * t * s)


def _hardswish(node):
    # PyTorch's gradient: 0 below -3, x/3 + 1/2 up to 3 (inclusive), 1 above
    x = node._saved_self
    inside = (x >= -3) & (x <= 3)
    d1 = torch.where(x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x)))
    return d1, inside.to(x.dtype) / 3


def _hardsigmoid(node):
    x = node._saved_self
    return ((x > -3) & (x < 3)).to(x.dtype) / 6, None


def _clamp(node):
    # PyTorch's gradient passes where min <= x <= max (bounds included)
    x = node._saved_self
    keep = torch.ones_like(x, dtype=torch.bool)
    if node._saved_min is not None:
        keep &= x >= float(node._saved_min)
    if node._saved_max is not None:
        keep &= x <= float(node._saved_max)
    return keep.to(x.dtype), None


def _logsigmoid(node):
    s = torch.sigmoid(node._saved_self)
    return 1 - s, -s * (1 - s)


def _erf(node):
    x = node._saved_self
    d1 = (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x)
    return d1, -2.0 * x * d1


MORE_UNARY: Dict[str, Callable] = {
    "MishBackward0": _mish,
    "HardswishBackward0": _hardswish,
    "HardsigmoidBackward0": _hardsigmoid,
    "ClampBackward1": _clamp,
    "LogSigmoidBackward0": _logsigmoid,
    "ErfBackward0": _erf,
    "SinBackward0": lambda n: (torch.cos(n._saved_self), -torch.sin(n._saved_self)),
    "CosBackward0": lambda n: (-torch.sin(n._saved_self), -torch.cos(n._saved_self)),
}
_FIRST_ORDER_ONLY = ("HardsigmoidBackward0", "ClampBackward1")


def _select_partials(larger: bool) -> Callable:
    """maximum / minimum: the gradient goes to the selected input, half to each at a tie."""
    def partials(node, live, second):
        a, b = node._saved_self, node._saved_other
        pick = (a > b) if larger else (a < b)
        tie = (a == b).to(a.dtype) * 0.5
        return [pick.to(a.dtype) + tie if live[0] else None, (~pick & (a != b)).to(a.dtype) + tie
                if len(live) > 1 and live[1] else None], {}
    return partials


def two_inputs(partials: Callable) -> Callable:
    """An elementwise function of two tensors with f'' = 0: H_i = p_i^2 H, g_i = p_i g."""
    def rule(node, g: Grads, h: Grads, ctx: Ctx):
        live = _needs(node)
        p = partials(node, live, False)[0]
        h_in = tuple(h[0] * (q * q) if q is not None else None for q in p)
        g_in = tuple(g[0] * q if q is not None and ctx.wants(i) and g[0] is not None else None
                     for i, q in enumerate(p))
        return g_in, h_in
    return rule


_INDEX_MAPS = [
    "UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0", "UpsampleNearest3DBackward0",
    "UpsampleNearestExact1DBackward0", "UpsampleNearestExact2DBackward0", "UpsampleNearestExact3DBackward0",
    "PixelShuffleBackward0", "PixelUnshuffleBackward0", "GatherBackward0", "IndexSelectBackward0",
    "AsStridedBackward0", "AsStridedBackward1", "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0", "MinBackward0",
    "TakeAlongDimBackward0", "NarrowBackward0", "RollBackward0", "FlipBackward0", "UnfoldBackward0",
    "ChannelShuffleBackward0", "Col2ImBackward0", "Im2ColBackward0",
    # in-place views (transpose_, t_, unsqueeze_, squeeze_: GRU and RNN use them)
    # selections routing each output to one saved index
    "TopkBackward0", "SortBackward0", "KthvalueBackward0", "MedianBackward1", "NanmedianBackward1",
    "ModeBackward0", "TransposeBackward1", "TBackward1", "UnsqueezeBackward1", "SqueezeBackward3",
    "SqueezeBackward4", "SqueezeBackward5",
]


def _layer_rules() -> Dict[str, Rule]:
    from .rules import _batch_norm_use, _group_norm_use

    out: Dict[str, Rule] = {name: Rule(index_map) for name in _INDEX_MAPS}
    out.update({name: Rule(resample(name)) for name in _RESAMPLE})
    out.update({name: Rule(shared_ties) for name in ("AmaxBackward0", "AminBackward0", "MaxBackward1",
                                                     "MinBackward1", "MedianBackward0", "NanmedianBackward0")})
    out.update({name: Rule(unary(d), second_order=name not in _FIRST_ORDER_ONLY, partials=_unary_partials(d))
                for name, d in MORE_UNARY.items()})
    out["WhereBackward0"] = Rule(index_map, partials=_where_partials)
    for name, larger in (("MaximumBackward0", True), ("MinimumBackward0", False)):
        out[name] = Rule(two_inputs(_select_partials(larger)), partials=_select_partials(larger))
    out["EmbeddingBagBackward0"] = Rule(embedding_bag)
    out["NativeGroupNormBackward0"] = Rule(group_norm, second_order=True, param_use=_group_norm_use)
    # eval mode is affine (no f'' term): only batch statistics need the gradient
    out["NativeBatchNormBackward0"] = Rule(batch_norm_any, second_order=lambda n: bool(n._saved_training),
                                           param_use=_batch_norm_use)
    return out


LAYER_RULES: Dict[str, Rule] = _layer_rules()
