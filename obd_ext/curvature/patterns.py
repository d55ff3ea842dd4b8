"""RMS normalisation written out of elementwise ops, swept as one unit.

``nn.RMSNorm``, ``F.rms_norm`` and the hand-written norms of Llama, T5, Mistral
and others compute ``y = x * rsqrt(mean(x^2, dims, keepdim=True) + eps)`` (or
``x / sqrt(...)``): one tensor ``x`` enters twice, once directly and once
through a mean. Per-node rules treat the two uses as independent and drop the
cross terms through the mean (up to 3.4x off on the layer below); the region
search of regions.py does not join them either, since the path through the
mean is not elementwise. This module finds that subgraph (the square, the
mean, the optional ``+ eps``, the (r)sqrt, the product or quotient, and dtype
copies between them) and gives it the exact closed form per row of the ``n``
entries the mean reduces, as the layer-norm rule does:

with ``r = (mean(x^2) + eps)^(-1/2)``, ``a = r^3 / n``, ``S = sum_i H_i x_i^2``,
``T = sum_i g_i x_i`` over the row,

    H_x = r^2 H - 2 r a x^2 H + a^2 x^2 S                    (diag of J^T H J)
          - 2 a g x + T (3 a r^2 x^2 / n - a)                (OBD's f'' terms)
    g_x = r g - a x T

The weight ``w * y`` that usually follows is an ordinary product outside the
unit. Where the pattern is not matched exactly (another consumer of an inner
value, a mean without keepdim), the per-node rules apply as before.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from .regions import Edge, Region, _fit
from .rules import Ctx, _signed

__all__ = ["RMSNormUnit", "find_rms_norms"]

_COPIES = frozenset({"ToCopyBackward0", "CloneBackward0", "AliasBackward0", "ContiguousBackward0"})


class RMSNormUnit(Region):
    """``x * rsqrt(mean(x^2) + eps)`` (or ``x / sqrt(...)``) as one function of x."""

    def __init__(self, nodes: List[object], out: object, x_saved: Tensor, r: Tensor, dims: Tuple[int, ...], n: int):
        super().__init__(nodes)
        self.out, self.x_saved, self.r, self.dims, self.n = out, x_saved, r, dims, n
        self.second_order = True

    def apply(self, buffers: Dict[Edge, Tuple[Optional[Tensor], Optional[Tensor]]], ctx: Ctx,
              g_wanted: Dict[Edge, bool]) -> Dict[Edge, Tuple[Optional[Tensor], Optional[Tensor]]]:
        g, h = buffers.get((self.out, 0), (None, None))
        src = self.inputs[0]
        meta = src[0]._input_metadata[src[1]]
        if h is None:
            return {}
        x, r, dims, n = self.x_saved, self.r, self.dims, self.n
        h = h.to(x.dtype)
        x2 = x * x
        a = r * r * r / n
        s = (h * x2).sum(dims, keepdim=True)
        h_x = h * (r * r - 2.0 * r * a * x2) + (a * a * s) * x2
        g_x = None
        if not ctx.lm and g is not None:
            g = g.to(x.dtype)
            t = (g * x).sum(dims, keepdim=True)
            h_x = h_x - 2.0 * a * g * x + t * (3.0 * a * r * r / n * x2 - a)
            if g_wanted.get(src, False):
                g_x = _fit(r * g - a * x * t, tuple(meta.shape)).to(meta.dtype)
        return {src: (g_x, _fit(h_x, tuple(meta.shape)).to(meta.dtype))}


def _through_copies(edge: Edge) -> List[Edge]:
    """The edge and those below it through copy nodes (dtype casts, clones); the caller
    checks that the copies feed nothing outside the unit."""
    chain = [edge]
    node = edge[0]
    while type(node).__name__ in _COPIES and node.next_functions[0][0] is not None:
        chain.append(node.next_functions[0])
        node = node.next_functions[0][0]
    return chain


def _squared_input(node) -> Optional[Tuple[Edge, Tensor]]:
    """For x.pow(2) / x.square() / x * x: (the edge of x, x as saved)."""
    name = type(node).__name__
    if name == "PowBackward0" and float(node._saved_exponent) == 2.0:
        return node.next_functions[0], node._saved_self
    if name == "MulBackward0" and node.next_functions[0] == node.next_functions[1] \
            and node.next_functions[0][0] is not None:
        return node.next_functions[0], node._saved_self
    return None


def _plus_constant(node) -> bool:
    """``v + eps`` with eps a number or a tensor needing no gradient (derivative 1 in v)."""
    name = type(node).__name__
    if name == "AddBackward1":
        return True
    if name != "AddBackward0":
        return False
    (a, _), (b, _) = node.next_functions
    if a is not None and b is None:
        return True
    return a is None and b is not None and float(getattr(node, "_saved_alpha", 1.0)) == 1.0


def _match(m, consumers) -> Optional[RMSNormUnit]:
    name = type(m).__name__
    if name == "MulBackward0":
        candidates = [(s, "RsqrtBackward0") for s in (0, 1)]
    elif name == "DivBackward0":
        candidates = [(1, "SqrtBackward0")]
    else:
        return None
    for slot, root_type in candidates:
        root = m.next_functions[slot][0]
        if root is None or type(root).__name__ != root_type:
            continue
        other = m.next_functions[1 - slot]
        if other[0] is None:
            continue
        nodes = [m, root]
        node = root.next_functions[0][0]
        if node is not None and _plus_constant(node):
            nodes.append(node)
            node = next(c for c, _ in node.next_functions if c is not None)
        if node is None or type(node).__name__ != "MeanBackward1" or not bool(node._saved_keepdim):
            continue
        mean = node
        nodes.append(mean)
        sq = mean.next_functions[0][0]
        found = _squared_input(sq) if sq is not None else None
        if found is None:
            continue
        nodes.append(sq)
        sq_edge, x_saved = found
        chain1 = _through_copies(sq_edge)
        chain2 = _through_copies(other)
        common = next((e for e in chain2 if e in chain1), None)
        if common is None:
            continue
        # copies between the shared tensor and its two uses belong to the unit
        for chain in (chain1, chain2):
            for e in chain[:chain.index(common)]:
                if e[0] not in nodes:
                    nodes.append(e[0])
        members = set(nodes)
        # a closed unit: only the product's output leaves it
        if any(c not in members for n in nodes if n is not m for c, _ in consumers.get(n, [])):
            continue
        sizes = [int(s) for s in mean._saved_self_sym_sizes]
        dims = tuple(sorted({_signed(d) % len(sizes) for d in mean._saved_dim})) or tuple(range(len(sizes)))
        if x_saved.dim() != len(sizes):
            continue
        n = math.prod(sizes[d] for d in dims)
        r = root._saved_result if root_type == "RsqrtBackward0" else 1.0 / root._saved_result
        unit = RMSNormUnit(nodes, m, x_saved, r.to(x_saved.dtype), dims, n)
        if len(unit.inputs) != 1 or unit.inputs[0] != common:
            continue
        return unit
    return None


def find_rms_norms(order: Sequence[object], consumers) -> List[RMSNormUnit]:
    """Every RMS normalisation of the graph (nodes of one never overlap another's)."""
    units: List[RMSNormUnit] = []
    taken: set = set()
    for node in order:
        if type(node).__name__ not in ("MulBackward0", "DivBackward0"):
            continue
        unit = _match(node, consumers)
        if unit is not None and not (unit.members & taken):
            units.append(unit)
            taken |= unit.members
    return units
