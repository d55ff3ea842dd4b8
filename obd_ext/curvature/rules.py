"""One squared-Jacobian rule per autograd node type (docs/math.md,
"Back-propagating second derivatives" and "The same rules for whole tensors").

A rule maps what reaches a node's outputs, the gradient ``g`` and the diagonal
second derivative ``H``, to its inputs:

    H_in = sum over outputs of (d out / d in)^2 * H_out   [+ (d2 out / d in2) * g_out for OBD]
    g_in = the ordinary vector-Jacobian product            (only when OBD needs it)

and, for a node whose input is a parameter, the parameter's curvature is what
reaches it (summed over every use: eq. 5, tied weights included).

Rules read the tensors autograd saved for the backward pass (``node._saved_*``),
so they work on any model, whatever its module structure. Linear maps whose
Jacobian entries are 0 or 1 (views, permutes, slices, cat, split, expand,
sums, masked_fill, max pooling) apply the node's own backward to H as well as
to g. Rules return tensors of the node's output shape where an input was
broadcast; the sweep sums them to the input's shape, as autograd's engine
does. A node without a rule raises :class:`UnsupportedOpError`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import constants, ops
from .naming import op_name

__all__ = ["UnsupportedOpError", "Rule", "RULES", "SECOND_ORDER", "second_order", "Ctx", "rule_for",
           "registry_entry", "saved_or_none"]

Grads = List[Optional[Tensor]]


class UnsupportedOpError(NotImplementedError):
    """A node of the model's graph has no second-order rule (or a case of one).

    Attributes:
        node_type: the autograd node's type name, where one node is at fault
            (hessian_diag then names the user's modules that made it).
    """

    def __init__(self, message: str, node_type: Optional[str] = None):
        super().__init__(message)
        self.node_type = node_type


class Ctx:
    """What rules need to know about the sweep: OBD (with f'' terms) or LM,
    and which of the current node's inputs need the first-order gradient
    (only those with an f'' term somewhere below; never a parameter)."""

    def __init__(self, lm: bool):
        self.lm = lm
        self.g_wanted: Sequence[bool] = ()

    def wants(self, i: int) -> bool:
        return not self.lm and (i < len(self.g_wanted) and self.g_wanted[i])

    @property
    def need_g(self) -> bool:
        return not self.lm and any(self.g_wanted)


def _call(node, outs: Grads) -> Tuple[Optional[Tensor], ...]:
    res = node(*outs)
    return res if isinstance(res, tuple) else (res,)


def _signed(d: int) -> int:
    """Saved dims can come back as unsigned 64-bit values (-1 as 2^64 - 1)."""
    d = int(d)
    return d - (1 << 64) if d >= (1 << 63) else d


def index_map(node, g: Grads, h: Grads, ctx: Ctx):
    """Linear nodes with 0/1 Jacobian entries: squaring changes nothing."""
    h_in = _call(node, h)
    g_in = _call(node, g) if ctx.need_g and any(x is not None for x in g) else (None,) * len(h_in)
    return g_in, h_in


# ---------------------------------------------------------------------------
# Elementwise activations: H_a = f'(a)^2 H_x + f''(a) g_x (eq. 7)
# ---------------------------------------------------------------------------


K = constants.ACT_KINDS


def _params(*names):
    """Spec of an activation node: (saved tensor, kind, (p0, p1, p2)) for ops.activation_hessian."""
    def spec(kind_name: str, saved: str):
        def get(node):
            ps = [float(getattr(node, n)) for n in names] + [0.0] * (3 - len(names))
            return getattr(node, saved), K[kind_name], tuple(ps)
        return get
    return spec


ACTIVATIONS: Dict[str, Callable] = {
    "TanhBackward0": _params()("tanh", "_saved_result"),
    "SigmoidBackward0": _params()("sigmoid", "_saved_result"),
    "ReluBackward0": _params()("relu", "_saved_result"),
    "LeakyReluBackward0": _params("_saved_negative_slope")("leaky_relu", "_saved_self"),
    "EluBackward0": _params("_saved_alpha", "_saved_scale", "_saved_input_scale")("elu", "_saved_self"),
    "GeluBackward0": lambda node: (node._saved_self, K["gelu_tanh" if node._saved_approximate == "tanh" else "gelu"],
                                   (0.0, 0.0, 0.0)),
    "SiluBackward0": _params()("silu", "_saved_self"),
    "SoftplusBackward0": _params("_saved_beta", "_saved_threshold")("softplus", "_saved_self"),
    "HardtanhBackward0": _params("_saved_min_val", "_saved_max_val")("hardtanh", "_saved_self"),
}


def elementwise(spec: Callable) -> Callable:
    """H_a = f'(a)^2 H_x + f''(a) g_x in one fused pass (obd_ext.ops.activation_hessian)."""
    def rule(node, g: Grads, h: Grads, ctx: Ctx):
        v, kind, (p0, p1, p2) = spec(node)
        want_g = ctx.wants(0) and g[0] is not None
        g_use = None if ctx.lm or g[0] is None else g[0].to(v.dtype)
        h_in, g_in = ops.activation_hessian(v, h[0].to(v.dtype), g_use, kind, p0, p1, p2, ctx.lm or g_use is None,
                                            want_g)
        return (g_in if want_g else None,), (h_in,)

    return rule


def unary(derivs: Callable) -> Callable:
    """Other elementwise functions (RMSNorm's pow/rsqrt, exp, log, ...): closed-form f', f''."""
    def rule(node, g: Grads, h: Grads, ctx: Ctx):
        d1, d2 = derivs(node)
        h_in = d1 * d1 * h[0]
        if not ctx.lm and d2 is not None and g[0] is not None:
            h_in = h_in + d2 * g[0]
        return (d1 * g[0] if ctx.wants(0) and g[0] is not None else None,), (h_in,)

    return rule


def _d_pow(node):
    x, p = node._saved_self, float(node._saved_exponent)
    return p * x.pow(p - 1), (p * (p - 1) * x.pow(p - 2) if p not in (0.0, 1.0) else None)


UNARY: Dict[str, Callable] = {
    "PowBackward0": _d_pow,
    "RsqrtBackward0": lambda n: (-0.5 * n._saved_result ** 3, 0.75 * n._saved_result ** 5),
    "SqrtBackward0": lambda n: (0.5 / n._saved_result, -0.25 / n._saved_result ** 3),
    "ExpBackward0": lambda n: (n._saved_result, n._saved_result),
    "LogBackward0": lambda n: (1 / n._saved_self, -1 / n._saved_self ** 2),
    "ReciprocalBackward0": lambda n: (-n._saved_result ** 2, 2 * n._saved_result ** 3),
    "NativeDropoutBackward0": lambda n: (n._saved_result1.to(n._saved_result1.dtype if n._saved_result1.is_floating_point()
                                                              else torch.get_default_dtype()) * float(n._saved_scale),
                                          None),
}


def neg(node, g: Grads, h: Grads, ctx: Ctx):
    """y = -x: the Jacobian entry is -1, whose square is 1 (not an index map for H)."""
    return (-g[0] if ctx.wants(0) and g[0] is not None else None,), (h[0],)


def identity(node, g: Grads, h: Grads, ctx: Ctx):
    """y = x + c or x - c for a number c (RMSNorm's eps): g and H pass unchanged."""
    return (g[0] if ctx.wants(0) else None,), (h[0],)


def rsub(node, g: Grads, h: Grads, ctx: Ctx):
    """y = other - alpha * x (x a tensor, other a number)."""
    alpha = float(node._saved_alpha)
    return (-alpha * g[0] if ctx.wants(0) and g[0] is not None else None,), (h[0] * (alpha * alpha),)


# ---------------------------------------------------------------------------
# Linear algebra: square the other operand
# ---------------------------------------------------------------------------


def _mm_rule(a: Tensor, b: Tensor, g: Optional[Tensor], h: Tensor, need_a: bool, need_b: bool,
             g_a_wanted: bool, g_b_wanted: bool, scale: float = 1.0):
    """y = scale * a @ b (batched allowed): H_a = s^2 H (b*b)^T, H_b = s^2 (a*a)^T H."""
    s2 = scale * scale
    h_a = _scaled(ops.squared_mm(h, b.transpose(-1, -2), False, True), s2) if need_a else None
    h_b = _scaled(ops.squared_mm(a.transpose(-1, -2), h, True, False), s2) if need_b else None
    g_a = _scaled(g @ b.transpose(-1, -2), scale) if need_a and g_a_wanted and g is not None else None
    g_b = _scaled(a.transpose(-1, -2) @ g, scale) if need_b and g_b_wanted and g is not None else None
    return g_a, g_b, h_a, h_b


def _scaled(t: Tensor, c: float) -> Tensor:
    """t * c, without a pass over t for the usual c = 1 (rules never write into what they
    return or receive, so passing t on is safe)."""
    return t if c == 1.0 else t * c


def _needs(node) -> List[bool]:
    return [n is not None for n, _ in node.next_functions]


def mm(node, g: Grads, h: Grads, ctx: Ctx):
    na, nb = _needs(node)
    a, b = node._saved_self, node._saved_mat2
    g_a, g_b, h_a, h_b = _mm_rule(a, b, g[0], h[0], na, nb, ctx.wants(0), ctx.wants(1))
    return (g_a, g_b), (h_a, h_b)


def bmm(node, g: Grads, h: Grads, ctx: Ctx):
    na, nb = _needs(node)
    a, b = node._saved_self, node._saved_mat2
    g_a, g_b, h_a, h_b = _mm_rule(a, b, g[0], h[0], na, nb, ctx.wants(0), ctx.wants(1))
    return (g_a, g_b), (h_a, h_b)


def addmm(node, g: Grads, h: Grads, ctx: Ctx):
    """y = beta * bias + alpha * mat1 @ mat2 (nn.Linear)."""
    nbias, na, nb = _needs(node)
    alpha, beta = float(node._saved_alpha), float(node._saved_beta)
    a, b = node._saved_mat1, node._saved_mat2
    g_a, g_b, h_a, h_b = _mm_rule(a, b, g[0], h[0], na, nb, ctx.wants(1), ctx.wants(2), alpha)
    # The bias is broadcast over rows: the sweep sums its H over them.
    h_bias = _scaled(h[0], beta * beta) if nbias else None
    g_bias = g[0] * beta if nbias and ctx.wants(0) and g[0] is not None else None
    return (g_bias, g_a, g_b), (h_bias, h_a, h_b)


def convolution(node, g: Grads, h: Grads, ctx: Ctx):
    """Conv: H_x = conv^T(H, W*W), h_W = weight-grad conv of (X*X, H) (eq. 5-6 with sharing)."""
    n_in, n_w, n_b = (_needs(node) + [False])[:3]
    x, w = node._saved_input, node._saved_weight
    stride, padding, dilation = node._saved_stride, node._saved_padding, node._saved_dilation
    transposed, out_pad, groups = node._saved_transposed, node._saved_output_padding, node._saved_groups
    bias_sizes = node._saved_bias_sym_sizes_opt
    mask = [n_in, n_w, n_b and bias_sizes is not None]
    h_x, h_w, h_b = ops.squared_conv(h[0], x, w, bias_sizes, stride, padding, dilation, transposed, out_pad, groups,
                                     mask)
    g_x = None
    if ctx.wants(0) and n_in and g[0] is not None:
        g_x = torch.ops.aten.convolution_backward(
            g[0], x, w, None, stride, padding, dilation, transposed, out_pad, groups, [True, False, False])[0]
    return (g_x, None, None), (h_x, h_w, h_b)


# ---------------------------------------------------------------------------
# Sums and products of activations
# ---------------------------------------------------------------------------


def add(node, g: Grads, h: Grads, ctx: Ctx, sign: float = 1.0):
    """y = a + alpha * b (sign -1: a - alpha * b): H passes through, times alpha^2 for b."""
    alpha = float(getattr(node, "_saved_alpha", 1.0)) * sign
    h_in = (h[0], _scaled(h[0], alpha * alpha))
    g_in = (g[0] if ctx.wants(0) else None, _scaled(g[0], alpha) if ctx.wants(1) else None) if g[0] is not None \
        else (None, None)
    return g_in, h_in


def sub(node, g, h, ctx):
    return add(node, g, h, ctx, sign=-1.0)


def mul(node, g: Grads, h: Grads, ctx: Ctx):
    """y = a * b: H_a = b^2 H, H_b = a^2 H (d2y/da2 = 0; the mixed term is off-diagonal)."""
    a, b = node._saved_self, node._saved_other
    na, nb = _needs(node)
    h_a = h[0] * (b * b) if na else None  # b * b first: one pass when b is broadcast (a scale)
    h_b = h[0] * (a * a) if nb else None
    g_a = g[0] * b if na and ctx.wants(0) and g[0] is not None else None
    g_b = g[0] * a if nb and ctx.wants(1) and g[0] is not None else None
    return (g_a, g_b), (h_a, h_b)


def mul_scalar(node, g: Grads, h: Grads, ctx: Ctx):
    """y = c * x for a Python number c (attention's scale): H gets c^2."""
    c = float(node._saved_other)
    return (g[0] * c if ctx.wants(0) and g[0] is not None else None,), (h[0] * (c * c),)


def div(node, g: Grads, h: Grads, ctx: Ctx):
    """y = a / b: H_a = H / b^2; H_b = (a/b^2)^2 H + (2a/b^3) g."""
    a, b = node._saved_self, node._saved_other
    na, nb = _needs(node)
    h_a = h[0] / (b * b) if na else None
    h_b = None
    if nb:
        d1 = -a / (b * b)
        h_b = d1 * d1 * h[0]
        if not ctx.lm and g[0] is not None:
            h_b = h_b + (2 * a / (b * b * b)) * g[0]
    g_a = g[0] / b if na and ctx.wants(0) and g[0] is not None else None
    g_b = g[0] * (-a / (b * b)) if nb and ctx.wants(1) and g[0] is not None else None
    return (g_a, g_b), (h_a, h_b)


def _averaging(node, g: Grads, h: Grads, ctx: Ctx, d: float):
    """A linear map with entries 1/d (means, average pools): the node's own
    backward gives H/d, the squared entries need H/d^2."""
    h_in = _call(node, h)[0] / d
    g_in = _call(node, g)[0] if ctx.need_g and g[0] is not None else None
    return (g_in,), (h_in,)


def mean(node, g: Grads, h: Grads, ctx: Ctx):
    """Mean: Jacobian entries 1/n, so H gets 1/n^2 (the node's backward gives 1/n)."""
    sizes = node._saved_self_sym_sizes
    dims = node._saved_dim
    n = 1
    for d in (dims if dims else range(len(sizes))):
        n *= int(sizes[_signed(d)])
    return _averaging(node, g, h, ctx, n)


def mean_all(node, g: Grads, h: Grads, ctx: Ctx):
    n = int(node._saved_self_sym_numel)
    return _averaging(node, g, h, ctx, n)


# ---------------------------------------------------------------------------
# Softmax, layer norm, batch norm (eval), average pooling
# ---------------------------------------------------------------------------


def softmax(node, g: Grads, h: Grads, ctx: Ctx):
    """Per row: H_x = y^2 ((1 - 2y) H + sum_j y_j^2 H_j) [+ y (2y - 1)(sum_j g_j y_j - g)],
    g_x = y (g - sum_j g_j y_j), in one fused kernel over the softmax's dimension
    (ops.softmax_hessian; as tensor ops it was 12 passes over the attention scores)."""
    y, dim = node._saved_result, _signed(node._saved_dim)
    last = dim in (-1, y.dim() - 1)
    use_g = g[0] is not None and not ctx.lm
    want_g = use_g and ctx.wants(0)

    def lastdim(t: Tensor) -> Tensor:
        return (t if last else t.movedim(dim, -1)).to(y.dtype)

    h_in, g_in = ops.softmax_hessian(lastdim(y), lastdim(h[0]), lastdim(g[0]) if use_g else None, not use_g, want_g)
    if not last:
        h_in = h_in.movedim(-1, dim)
        g_in = g_in.movedim(-1, dim) if want_g else g_in
    return (g_in if want_g else None,), (h_in,)


def layer_norm(node, g: Grads, h: Grads, ctx: Ctx):
    """Closed forms per row (O(n)): the diagonal of J^T diag(H) J plus the f'' term,
    in one fused kernel for the input (ops.layer_norm_hessian; the formulas are in
    reference.layer_norm_hessian)."""
    x = node._saved_input
    mu, rstd = node._saved_result1, node._saved_result2
    weight, bias = node._saved_weight, node._saved_bias
    nshape = node._saved_normalized_shape
    k = len(nshape)
    n = math.prod(int(s) for s in nshape)
    n_x, n_w, n_b = _needs(node)
    hh = h[0]
    h_x = g_x = None
    if n_x:
        use_g = g[0] is not None and not ctx.lm
        want_g = use_g and ctx.wants(0)
        rows = x.shape[: x.dim() - k] + (n,)  # the normalized dims as one: the kernel's rows

        def flat(t: Tensor) -> Tensor:
            return t.to(x.dtype).reshape(rows)

        h_x, g_x = ops.layer_norm_hessian(flat(x), mu, rstd, None if weight is None else weight.reshape(n), flat(hh),
                                          flat(g[0]) if use_g else None, not use_g, want_g)
        h_x = h_x.reshape(x.shape)
        g_x = g_x.reshape(x.shape) if want_g else None
    batch_dims = tuple(range(x.dim() - k))
    h_w = h_b = None
    if n_w and weight is not None:
        mu_ = mu.reshape(mu.shape + (1,) * (x.dim() - mu.dim())) if mu.dim() < x.dim() else mu
        rstd_ = rstd.reshape(rstd.shape + (1,) * (x.dim() - rstd.dim())) if rstd.dim() < x.dim() else rstd
        h_w = (x - mu_).mul_(rstd_).square_().mul_(hh).sum(batch_dims)  # sum of xh^2 H: one temporary
    if n_b and bias is not None:
        h_b = hh.sum(batch_dims)
    return (g_x, None, None), (h_x, h_w, h_b)


def batch_norm(node, g: Grads, h: Grads, ctx: Ctx):
    """Eval mode: an affine map per channel with the running statistics."""
    if node._saved_training:
        raise UnsupportedOpError(
            "obd_ext curvature: batch_norm with statistics of the input (BatchNorm in training mode, or "
            "InstanceNorm) has no diagonal rule here; for BatchNorm call model.eval() first (its running "
            "statistics then make it an affine map); otherwise use method='hutchinson' or 'exact'",
            type(node).__name__
        )
    x, weight = node._saved_input, node._saved_weight
    rm, rv, eps = node._saved_running_mean, node._saved_running_var, float(node._saved_eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    rstd = torch.rsqrt(rv + eps).reshape(shape)
    xh = (x - rm.reshape(shape)) * rstd
    gamma = weight.reshape(shape) if weight is not None else torch.ones_like(rstd)
    n_x, n_w, n_b = _needs(node)
    red = [0] + list(range(2, x.dim()))
    c = gamma * rstd
    h_x = h[0] * c * c if n_x else None
    g_x = g[0] * c if n_x and ctx.wants(0) and g[0] is not None else None
    h_w = (xh * xh * h[0]).sum(red) if n_w else None
    h_b = h[0].sum(red) if n_b else None
    return (g_x, None, None), (h_x, h_w, h_b)


def _window_weights(node, nd: int) -> Tensor:
    """The weight 1/d_j of each output window of an average pool (every entry of a
    window has the same weight), broadcastable to the output.

    d_j depends on the window: padding counted or not (``count_include_pad``),
    ``divisor_override``, and ``ceil_mode``'s edge windows, which PyTorch clips to
    the padded input (so they average fewer entries). Rather than restate those
    rules, pool a tensor of ones twice with the node's own settings: once as the
    user did (the sum of the window's weights over its real entries, n_j / d_j)
    and once as a plain sum (n_j, divisor 1)."""
    x = node._saved_self
    pool = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d,
            3: torch.nn.functional.avg_pool3d}[nd]
    ks, stride, pad = list(node._saved_kernel_size), list(node._saved_stride), list(node._saved_padding)
    stride = stride or ks  # an empty stride means the kernel size
    ceil, cip, div = bool(node._saved_ceil_mode), bool(node._saved_count_include_pad), node._saved_divisor_override
    ones = x.new_ones((1,) * (x.dim() - nd) + tuple(x.shape[-nd:]))
    weighted = pool(ones, ks, stride, pad, ceil, cip, div)
    counts = pool(ones, ks, stride, pad, ceil, True, 1)
    return weighted / counts


def _weighted_average(node, g: Grads, h: Grads, ctx: Ctx, weight: Tensor):
    """A linear map whose output j averages its window with weight c_j per entry:
    H_x = B(c * H) (entries c_j^2), g_x = B(g), with B the node's own backward."""
    h_in = _call(node, [h[0] * weight])[0]
    g_in = _call(node, g)[0] if ctx.need_g and g[0] is not None else None
    return (g_in,), (h_in,)


def avg_pool(nd: int) -> Callable:
    """Average pooling in ``nd`` dimensions (AvgPool1d runs as a 2-d pool): any
    padding, ``ceil_mode``, ``count_include_pad`` and ``divisor_override``."""
    def rule(node, g: Grads, h: Grads, ctx: Ctx):
        return _weighted_average(node, g, h, ctx, _window_weights(node, nd))
    return rule


def _adaptive_counts(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """Entries averaged by each adaptive window along one dimension: PyTorch's
    windows are [floor(i In / Out), ceil((i + 1) In / Out)), which may overlap."""
    i = torch.arange(size_out, dtype=torch.long)
    start = torch.div(i * size_in, size_out, rounding_mode="floor")
    end = torch.div((i + 1) * size_in + size_out - 1, size_out, rounding_mode="floor")
    return (end - start).to(like.dtype).to(like.device)


def adaptive_avg_pool(nd: int) -> Callable:
    """Adaptive average pooling: window j averages n_j entries, weight 1/n_j
    (uneven and overlapping windows included)."""
    def rule(node, g: Grads, h: Grads, ctx: Ctx):
        x = node._saved_self
        out = h[0].shape[-nd:]
        weight = None
        for k in range(nd):
            c = _adaptive_counts(int(x.shape[x.dim() - nd + k]), int(out[k]), h[0])
            c = c.reshape((-1,) + (1,) * (nd - 1 - k))
            weight = 1.0 / c if weight is None else weight / c
        return _weighted_average(node, g, h, ctx, weight)
    return rule


def embedding(node, g: Grads, h: Grads, ctx: Ctx):
    """Rows of the table are picked (0/1 Jacobian): the node's backward scatters H into the table."""
    return index_map(node, g, h, ctx)


INDEX_MAPS = [
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TBackward0", "TransposeBackward0",
    "PermuteBackward0", "SliceBackward0", "SelectBackward0", "SplitBackward0", "SplitWithSizesBackward0",
    "UnbindBackward0", "CatBackward0", "StackBackward0", "CloneBackward0", "ExpandBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0", "SumBackward0", "SumBackward1",
    "MaskedFillBackward0", "MaxPool2DWithIndicesBackward0", "EmbeddingBackward0", "AliasBackward0",
    "ToCopyBackward0", "ContiguousBackward0", "IndexBackward0", "FlattenBackward0",
    "ChunkBackward0", "PadBackward0", "ConstantPadNdBackward0", "RepeatBackward0", "ExpandAsBackward0",
    # max selections that route the gradient to one saved index (ties included): 0/1 Jacobians
    "MaxPool3DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0", "MaxBackward0",
]


# ---------------------------------------------------------------------------
# Partial derivatives of elementwise nodes (for elementwise regions, regions.py)
# ---------------------------------------------------------------------------
#
# An elementwise node z = f(a, b, ...) gives, per element, its first partials
# f_i (one per input slot) and its non-zero second partials f_ij (i <= j), for
# the slots that carry a derivative (``live``). ``second=False`` (LM) needs
# only the first partials. A partial is a tensor broadcastable to the output,
# or a number.

Partials = Tuple[List[Optional[object]], Dict[Tuple[int, int], object]]


def _activation_partials(spec: Callable) -> Callable:
    def partials(node, live: Sequence[bool], second: bool) -> Partials:
        v, kind, (p0, p1, p2) = spec(node)
        # The fused kernel returns f'^2 h + f'' g and f' g: with h = 0, g = 1 it gives
        # f'' and f' in one pass (it makes its operands contiguous itself).
        zero, one = v.new_zeros(()).expand(v.shape), v.new_ones(()).expand(v.shape)
        f2, f1 = ops.activation_hessian(v, zero, one, kind, p0, p1, p2, False, True)
        return [f1], ({(0, 0): f2} if second else {})
    return partials


def _unary_partials(derivs: Callable) -> Callable:
    def partials(node, live: Sequence[bool], second: bool) -> Partials:
        d1, d2 = derivs(node)
        return [d1], ({(0, 0): d2} if second and d2 is not None else {})
    return partials


def _add_partials(sign: float) -> Callable:
    def partials(node, live: Sequence[bool], second: bool) -> Partials:
        return [1.0, sign * float(getattr(node, "_saved_alpha", 1.0))], {}
    return partials


def _mul_partials(node, live: Sequence[bool], second: bool) -> Partials:
    # d(ab)/da = b, d(ab)/db = a, d2(ab)/(da db) = 1: the cross term a per-node rule drops
    d1 = [node._saved_other if live[0] else None, node._saved_self if live[1] else None]
    return d1, ({(0, 1): 1.0} if second and live[0] and live[1] else {})


def _div_partials(node, live: Sequence[bool], second: bool) -> Partials:
    a, b = (node._saved_self if live[1] else None), node._saved_other
    inv = 1.0 / b
    d1 = [inv if live[0] else None, -a * inv * inv if live[1] else None]
    d2 = {}
    if second and live[1]:
        d2[(1, 1)] = 2.0 * a * inv * inv * inv
        if live[0]:
            d2[(0, 1)] = -inv * inv
    return d1, d2


def _constant_partials(c: Callable) -> Callable:
    def partials(node, live: Sequence[bool], second: bool) -> Partials:
        return [c(node)], {}
    return partials


# ---------------------------------------------------------------------------
# Parameter uses for per-sample gradients (fisher, ggn-mc: per_sample.py)
# ---------------------------------------------------------------------------
#
# ``(node, slot) -> (kind, saved)`` for a parameter entering ``node`` at input
# ``slot``: what the use computes (per_sample.py turns it into per-sample
# gradients) and the saved tensors it needs (a bias's "x" is only compared with
# the probe, to check the rows); None: not handled there.


def saved_or_none(node, attr: str) -> Optional[Tensor]:
    """A saved tensor, or None where autograd did not save it (no gradient needed it)."""
    try:
        v = getattr(node, attr)
    except (AttributeError, RuntimeError):
        return None
    return v if isinstance(v, Tensor) else None


def _addmm_use(node, slot: int):
    if slot == 2:
        return "mat2", {"x": node._saved_mat1, "alpha": float(node._saved_alpha)}
    if slot == 0:
        return "addmm_bias", {"beta": float(node._saved_beta), "x": saved_or_none(node, "_saved_mat1")}
    return None


def _mm_use(node, slot: int):
    return ("mat2", {"x": node._saved_self, "alpha": 1.0}) if slot == 1 else None


def _conv_use(node, slot: int):
    if slot not in (1, 2) or node._saved_transposed:
        return None
    conf = {"stride": list(node._saved_stride), "padding": list(node._saved_padding),
            "dilation": list(node._saved_dilation), "groups": int(node._saved_groups)}
    if slot == 1:
        return "conv_w", {"x": node._saved_input, **conf}
    return "conv_b", {"x": saved_or_none(node, "_saved_input")}


def _embedding_use(node, slot: int):
    if slot != 0 or node._saved_scale_grad_by_freq or node._saved_sparse:
        return None
    return "embedding", {"x": node._saved_indices, "padding_idx": int(node._saved_padding_idx),
                         "rows": int(node._saved_weight_sym_argsize_0)}


def _layer_norm_use(node, slot: int):
    if slot == 2:
        return "norm_b", {"x": node._saved_input}
    if slot == 1:
        return "ln_w", {"x": node._saved_input, "mean": node._saved_result1, "rstd": node._saved_result2,
                        "n": math.prod(int(s) for s in node._saved_normalized_shape)}
    return None


def _batch_norm_use(node, slot: int):
    if slot == 2:
        return "bn_b", {"x": node._saved_input}
    if slot == 1:
        return "bn_w", {"x": node._saved_input, "mean": node._saved_running_mean, "var": node._saved_running_var,
                        "eps": float(node._saved_eps)}
    return None


def _group_norm_use(node, slot: int):
    if slot == 2:
        return "bn_b", {"x": node._saved_input}
    if slot == 1:
        return "gn_w", {"x": node._saved_input, "mean": node._saved_result1, "rstd": node._saved_result2,
                        "groups": int(node._saved_group)}
    return None


def _add_use(sign: float) -> Callable:
    def use(node, slot: int):
        if slot not in (0, 1):
            return None
        return "add", {"coef": 1.0 if slot == 0 else sign * float(getattr(node, "_saved_alpha", 1.0))}
    return use


def _mul_use(node, slot: int):
    if slot not in (0, 1):
        return None
    other = node._saved_other if slot == 0 else node._saved_self
    return ("mul", {"x": other}) if isinstance(other, Tensor) else None


# ---------------------------------------------------------------------------
# The registry: one entry per autograd node type
# ---------------------------------------------------------------------------


class Rule:
    """Everything the engine knows about one autograd node type.

    Attributes:
        apply: ``(node, g, h, ctx) -> (g_in, h_in)``, the squared-Jacobian rule
            (eq. 7) from the node's outputs to its inputs.
        second_order: ``apply`` uses the gradient at the node's output (an f''
            term), so OBD must carry g down to it; a callable ``node -> bool``
            where that depends on the node.
        partials: for elementwise nodes, ``(node, live, second) -> (first
            partials per slot, second partials {(i, j): ...})``; elementwise
            regions (regions.py) compose them exactly. None: not elementwise.
        param_use: ``(node, slot) -> (kind, saved)`` for a parameter used at
            that input, from which per_sample.py forms per-sample gradients
            (fisher, ggn-mc); None: such uses take the torch.func path.
    """

    __slots__ = ("apply", "second_order", "partials", "param_use")

    def __init__(self, apply: Optional[Callable], second_order: "bool | Callable" = False,
                 partials: Optional[Callable] = None, param_use: Optional[Callable] = None):
        self.apply, self.second_order, self.partials, self.param_use = apply, second_order, partials, param_use

    def __call__(self, node, g: Grads, h: Grads, ctx: Ctx):
        return self.apply(node, g, h, ctx)

    @property
    def elementwise(self) -> bool:
        return self.partials is not None


RULES: Dict[str, Rule] = {name: Rule(index_map) for name in INDEX_MAPS}
RULES["EmbeddingBackward0"] = Rule(embedding, param_use=_embedding_use)
# Copies are elementwise identities: inside an elementwise region (``x * sigmoid(x.float())``)
# they must not hide that one tensor enters twice.
RULES.update({name: Rule(index_map, partials=_constant_partials(lambda n: 1.0))
              for name in ("CloneBackward0", "AliasBackward0", "ToCopyBackward0", "ContiguousBackward0")})
RULES.update({name: Rule(elementwise(d), second_order=name not in ("ReluBackward0", "LeakyReluBackward0",
                                                                    "HardtanhBackward0"),
                         partials=_activation_partials(d)) for name, d in ACTIVATIONS.items()})
RULES.update({name: Rule(unary(d), second_order=name != "NativeDropoutBackward0", partials=_unary_partials(d))
              for name, d in UNARY.items()})
RULES.update({
    "MmBackward0": Rule(mm, param_use=_mm_use),
    "BmmBackward0": Rule(bmm),
    "AddmmBackward0": Rule(addmm, param_use=_addmm_use),
    "ConvolutionBackward0": Rule(convolution, param_use=_conv_use),
    "AddBackward0": Rule(add, partials=_add_partials(1.0), param_use=_add_use(1.0)),
    "SubBackward0": Rule(sub, partials=_add_partials(-1.0), param_use=_add_use(-1.0)),
    "MulBackward0": Rule(mul, partials=_mul_partials, param_use=_mul_use),
    "DivBackward0": Rule(div, second_order=True, partials=_div_partials),
    "MeanBackward0": Rule(mean_all),
    "MeanBackward1": Rule(mean),
    "SoftmaxBackward0": Rule(softmax, second_order=True),
    "SafeSoftmaxBackward0": Rule(softmax, second_order=True),  # softmax with fully masked rows giving 0 (SDPA's math path)
    "MulBackward1": Rule(mul_scalar, partials=_constant_partials(lambda n: float(n._saved_other))),
    "NegBackward0": Rule(neg, partials=_constant_partials(lambda n: -1.0)),
    "AddBackward1": Rule(identity, partials=_constant_partials(lambda n: 1.0)),
    "SubBackward1": Rule(identity, partials=_constant_partials(lambda n: 1.0)),
    "RsubBackward1": Rule(rsub, partials=_constant_partials(lambda n: -float(n._saved_alpha))),
    "NativeLayerNormBackward0": Rule(layer_norm, second_order=True, param_use=_layer_norm_use),
    "NativeBatchNormBackward0": Rule(batch_norm, param_use=_batch_norm_use),
    "CudnnBatchNormBackward0": Rule(batch_norm),
    "AvgPool2DBackward0": Rule(avg_pool(2)),
    "AvgPool3DBackward0": Rule(avg_pool(3)),
    "AdaptiveAvgPool2DBackward0": Rule(adaptive_avg_pool(2)),
    "AdaptiveAvgPool3DBackward0": Rule(adaptive_avg_pool(3)),
})

# Rules for more layers (norms with batch statistics, resampling, index maps, ...):
# their own module, entries of this one registry.
from .rules_layers import LAYER_RULES  # noqa: E402  (it imports the helpers above)

RULES.update(LAYER_RULES)
# log_softmax and the losses' own nodes (the sweep starts at the scalar loss): rules_losses.py
from .rules_losses import LOSS_RULES  # noqa: E402

RULES.update(LOSS_RULES)

# Derived from the registry, never kept by hand (a callable flag counts: see second_order).
SECOND_ORDER = frozenset(name for name, r in RULES.items() if r.second_order)


def second_order(node) -> bool:
    """Whether the node's rule uses the gradient at its output (its f'' term); a
    flag may depend on the node (BatchNorm: only with batch statistics)."""
    rule = RULES.get(type(node).__name__)
    if rule is None:
        return False
    flag = rule.second_order
    return bool(flag(node)) if callable(flag) else flag


def registry_entry(node) -> Optional[Rule]:
    """The node type's registry entry, or None."""
    return RULES.get(type(node).__name__)


def rule_for(node) -> Callable:
    name = type(node).__name__
    rule = RULES.get(name)
    if rule is None or rule.apply is None:
        raise UnsupportedOpError(
            f"obd_ext curvature: no second-order rule for {op_name(name)} (the autograd node {name}); the model "
            "uses an operation the back-propagated diagonal does not cover yet. Use method='hutchinson' "
            "(any model) or 'exact' (small models) instead.", name
        )
    return rule
