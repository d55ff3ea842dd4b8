"""Elementwise regions: exact second derivatives where one tensor enters an
elementwise expression more than once.

The sweep's per-node rules (rules.py) treat the inputs of a node as
independent. That is exact along a chain or tree of elementwise functions
(the chain rule composes f' and f'' exactly), but not where one tensor reaches
an elementwise node through two of its inputs: for ``y = u * u`` the rule of
the product gives ``H_u = 2 u^2 H`` where the truth is ``4 u^2 H + 2 g``; the
square of a sum ``(a + b)^2`` becomes ``a^2 + b^2`` and the mixed term
``d2y / (da db)`` of a product is lost. Written-out activations are built
this way: GPT-2's ``gelu_new`` (``0.5 x (1 + tanh(k (x + c x^3)))``, x entering
three times), Mish (``x tanh(softplus(x))``), ``x * sigmoid(x)``.

What is exact (float64 rounding, against autograd):
    A *region* is the set of elementwise nodes (those whose registry entry has
    ``partials``) on the paths, through elementwise nodes only, from a tensor
    ``S`` used by at least two elementwise inputs to a *join*: an elementwise
    node two of whose inputs depend on ``S`` that way. Regions sharing a node
    are merged. A region is a function ``y_k = F_k(u_1, ..., u_M)``, elementwise
    (with broadcasting), from the tensors entering it to the tensors leaving it.
    For each entering tensor ``u_m`` the region's rule is

        H_{u_m} = sum_k (dF_k/du_m)^2 H_k  +  sum_k (d2F_k/du_m^2) g_k     (OBD)
        H_{u_m} = sum_k (dF_k/du_m)^2 H_k                                 (LM)

    with the true total derivatives, obtained by forward-mode propagation of
    ``(dv/du_m, d2v/du_m^2)`` through the region's nodes in closed form (the
    chain rule with the product rule's cross term ``2 f_ij v_i' v_j'``). Given
    the diagonal H_k at the region's outputs, this is the exact diagonal at its
    inputs: where the model's Hessian restricted to those tensors is diagonal
    (per-feature scales under an elementwise loss; the layer before an
    elementwise loss), the result is the Hessian's diagonal, and ``lm`` is the
    Gauss-Newton diagonal.

What is still dropped (the diagonal approximation of the paper, eq. 7):
    * cross terms between different region outputs (H at the outputs is
      carried as a diagonal);
    * paths that leave the elementwise nodes and rejoin: a residual block
      ``x + f(W x)``, a gate ``x * sigmoid(W x)``: the product at the join is
      treated as having independent inputs there, as every non-elementwise
      node's inputs are (RMSNorm's ``x * rsqrt(mean(x^2) + eps)``, which rejoins
      through the mean, is recognised and swept exactly: patterns.py);
    * cross terms between the entries of one tensor (broadcast parameters
      summed over positions, shared weights) as everywhere in the sweep;
    * a region that a path leaves and re-enters through a non-elementwise node
      (``x * (x + W tanh(x))``) cannot be swept as one unit before its inputs; it
      is left to the per-node rules (``dissolve`` below).

Cost: finding regions is one more pass over the graph's elementwise nodes in
Python (each carries the set of fanned-out tensors it depends on; 27 ms for
a 32-layer GPT-2 graph of 2158 nodes, 8 ms for a 32-layer Llama); a
region costs, per entering tensor that needs curvature, a few elementwise
passes per node, about what its per-node rules cost. Nodes outside regions are
untouched, so models without such expressions run exactly as before.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from .rules import Ctx, registry_entry

__all__ = ["Region", "find_regions", "apply_region"]

Edge = Tuple[object, int]  # (producer node, output number): one tensor of the graph


class Region:
    """A set of elementwise nodes swept as one function of the tensors entering it.

    Attributes:
        nodes: the region's nodes, producers first.
        members: the same, as a set.
        inputs: the tensors entering it that need curvature (producer, output number).
        edges: every (node, slot) -> input edge, one entry per use.
        second_order: some node has a second partial (g must reach the outputs for OBD).
    """

    def __init__(self, nodes: List[object]):
        self.nodes = nodes
        self.members = set(nodes)
        self.edges: List[Tuple[object, int, Edge]] = []
        inputs: List[Edge] = []
        for node in nodes:
            for slot, (child, nr) in enumerate(node.next_functions):
                if child is None or child in self.members:
                    continue
                self.edges.append((node, slot, (child, nr)))
                if (child, nr) not in inputs:
                    inputs.append((child, nr))
        self.inputs = inputs
        self.second_order = any(_has_second(n) for n in nodes)

    def __repr__(self) -> str:
        names = ", ".join(type(n).__name__ for n in self.nodes)
        return f"Region({names}; {len(self.inputs)} inputs)"


def _has_second(node) -> bool:
    """Whether the node can contribute a second-derivative term inside a region:
    its own f'' or the cross term of a product/quotient."""
    name = type(node).__name__
    return registry_entry(node).second_order or name == "MulBackward0"


def _elementwise(node) -> bool:
    entry = registry_entry(node)
    return entry is not None and entry.elementwise


def find_regions(order: Sequence[object], consumers: Dict[object, List[Tuple[object, int]]]) -> List[Region]:
    """The regions of a graph.

    Args:
        order: every node, consumers before producers (the sweep's order).
        consumers: node -> [(consumer node, input slot)] over all its outputs.
    """
    from .patterns import find_rms_norms  # it builds on Region

    # RMS norms written out (x * rsqrt(mean(x^2) + eps)) are units of their own (patterns.py)
    units: List[Region] = find_rms_norms(order, consumers)
    taken = set().union(*(u.members for u in units)) if units else set()
    pos = {node: i for i, node in enumerate(reversed(order))}  # producers first
    ew = {node for node in order if node not in taken and _elementwise(node)}
    if not ew:
        return units
    # Sources: tensors used by two or more elementwise inputs.
    uses: Dict[Edge, int] = {}
    for node in ew:
        for child, nr in node.next_functions:
            if child is not None:
                uses[(child, nr)] = uses.get((child, nr), 0) + 1
    sources = {src for src, count in uses.items() if count >= 2}
    if not sources:
        return units
    # One pass, producers first: the sources each elementwise node depends on
    # through elementwise paths, and the joins (two inputs depending on one source).
    depends: Dict[object, frozenset] = {}
    joins: Dict[Edge, List[object]] = {}
    empty: frozenset = frozenset()
    for node in sorted(ew, key=pos.__getitem__):
        slots = []
        for child, nr in node.next_functions:
            if child is None:
                continue
            here = depends.get(child, empty) if child in ew else empty
            if (child, nr) in sources:
                here = here | {(child, nr)}
            if here:
                slots.append(here)
        depends[node] = frozenset().union(*slots) if slots else empty
        if len(slots) >= 2:
            shared = set()
            for a in range(len(slots)):
                for b in range(a + 1, len(slots)):
                    shared |= slots[a] & slots[b]
            for src in shared:
                joins.setdefault(src, []).append(node)
    parent: Dict[object, object] = {}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for src, js in joins.items():
        # The region of src: the nodes depending on src on a path to one of its joins.
        region: Set[object] = set()
        stack = list(js)
        while stack:
            n = stack.pop()
            if n in region:
                continue
            region.add(n)
            stack.extend(c for c, _ in n.next_functions if c in ew and c not in region and src in depends[c])
        for n in region:
            parent.setdefault(n, n)
        first = next(iter(region))
        for n in region:
            ra, rb = find(first), find(n)
            if ra is not rb:
                parent[rb] = ra
    groups: Dict[object, List[object]] = {}
    for n in parent:
        groups.setdefault(find(n), []).append(n)
    return units + [Region(sorted(nodes, key=pos.__getitem__)) for nodes in groups.values()]


def _scale(a, b):
    """a * b where either may be a number (1.0 treated cheaply)."""
    if isinstance(a, float) and a == 1.0:
        return b
    if isinstance(b, float) and b == 1.0:
        return a
    return a * b


def _prod(a, b) -> Tuple[object, bool]:
    """(a * b, whether the result is a tensor made here, which may be updated in place)."""
    out = _scale(a, b)
    return out, isinstance(out, Tensor) and out is not a and out is not b


def _into(acc: Tensor, t) -> bool:
    """Whether ``t`` can be added into ``acc`` in place (no broadcasting of acc)."""
    return not isinstance(t, Tensor) or (t.dim() <= acc.dim() and torch.broadcast_shapes(acc.shape, t.shape)
                                          == acc.shape and t.dtype == acc.dtype)


def _sum(acc, acc_own: bool, t, t_own: bool) -> Tuple[object, bool]:
    """acc + t, in place into whichever is a tensor made here (never into a saved or
    partial tensor, which the graph and later inputs still read)."""
    if acc is None:
        return t, t_own
    if acc_own and _into(acc, t):
        return acc.add_(t), True
    if t_own and isinstance(acc, Tensor) and _into(t, acc):
        return t.add_(acc), True
    out = acc + t
    return out, isinstance(out, Tensor)


def _acc(total: Optional[Tensor], term: Tensor) -> Tensor:
    return term if total is None else total + term


def _fit(t: Tensor, shape: Tuple[int, ...]) -> Tensor:
    return t if tuple(t.shape) == shape else t.sum_to_size(shape)


def apply_region(region: Region, buffers: Dict[Edge, Tuple[Optional[Tensor], Optional[Tensor]]], ctx: Ctx,
                 g_wanted: Dict[Edge, bool]) -> Dict[Edge, Tuple[Optional[Tensor], Optional[Tensor]]]:
    """(g, H) for each tensor entering the region, from (g, H) at its outputs.

    Args:
        region: the region.
        buffers: (node, output number) -> (g, H) reaching that output of a region
            node from outside the region (or the sweep's seed).
        ctx: OBD or LM.
        g_wanted: input -> whether its producer needs the first-order gradient.

    Returns:
        input -> (g or None, H), each of the shape where the region uses it (the
        sweep sums broadcast results to the input's shape).
    """
    if hasattr(region, "apply"):  # a unit with its own closed form (patterns.py)
        return region.apply(buffers, ctx, g_wanted)
    second = not ctx.lm
    outputs = [(n, buffers[(n, 0)]) for n in region.nodes if (n, 0) in buffers and buffers[(n, 0)][1] is not None]
    live_cache: Dict[object, Tuple[Tuple[bool, ...], object]] = {}
    # How many region nodes read each node's output: derivative tensors are freed after the last.
    readers: Dict[object, int] = {}
    for n in region.nodes:
        for c, _ in n.next_functions:
            if c in region.members:
                readers[c] = readers.get(c, 0) + 1
    result: Dict[Edge, Tuple[Optional[Tensor], Optional[Tensor]]] = {}
    for src in region.inputs:
        d1: Dict[object, object] = {}
        d2: Dict[object, object] = {}
        left = dict(readers)
        for n in region.nodes:
            ins = []  # per slot: (first, second) derivative of the slot's value w.r.t. src, or None
            for child, nr in n.next_functions:
                if child is not None and (child, nr) == src:
                    ins.append((1.0, None))
                elif child in region.members and d1.get(child) is not None:
                    ins.append((d1[child], d2.get(child)))
                else:
                    ins.append(None)
                if child in region.members:
                    left[child] -= 1
                    if left[child] == 0 and not any(o is child for o, _ in outputs):
                        d1.pop(child, None)
                        d2.pop(child, None)
            live = tuple(x is not None for x in ins)
            if not any(live):
                d1[n] = None
                continue
            key = (live, second)
            cached = live_cache.get(n)
            if cached is None or cached[0] != key:
                cached = (key, registry_entry(n).partials(n, live, second))
                live_cache[n] = cached
            f1, f2 = cached[1]
            z1 = z2 = None
            o1 = o2 = False
            for i, x in enumerate(ins):
                if x is None:
                    continue
                z1, o1 = _sum(z1, o1, *_prod(f1[i], x[0]))
                if second and x[1] is not None:
                    z2, o2 = _sum(z2, o2, *_prod(f1[i], x[1]))
            if second:
                for (i, j), f in f2.items():
                    if ins[i] is None or ins[j] is None:
                        continue
                    # d2z = ... + f_ii a_i'^2 + 2 f_ij a_i' a_j' (the product rule's cross term)
                    term, own = _prod(ins[i][0], ins[j][0])
                    term, own2 = _prod(f if i == j else 2.0 * f, term)
                    z2, o2 = _sum(z2, o2, term, own or own2)
            d1[n], d2[n] = z1, z2
        h_in = g_in = None
        want_g = second and g_wanted.get(src, False)
        shape = tuple(src[0]._input_metadata[src[1]].shape)
        for n, (g, h) in outputs:
            z1 = d1.get(n)
            if z1 is None:
                continue
            # Each output's terms summed to the input's shape on their own: outputs of
            # different broadcast shapes must not broadcast into each other first.
            term, own = _prod(z1, z1)
            term, own = (term.mul_(h), True) if own and _into(term, h) else (h * term, True)
            if second and g is not None and d2.get(n) is not None:
                d2n = d2[n]
                if isinstance(d2n, Tensor) and _into(term, d2n) and _into(term, g):
                    term.addcmul_(d2n, g)
                else:
                    term = term + d2n * g
            h_in = _acc(h_in, _fit(term, shape))
            if want_g and g is not None:
                g_in = _acc(g_in, _fit(_scale(z1, g), shape))
        # A copy to another dtype inside the region (``x.float()``) must not change the
        # dtype the input's producer receives.
        dtype = src[0]._input_metadata[src[1]].dtype
        if h_in is not None and h_in.dtype != dtype:
            h_in = h_in.to(dtype)
        if g_in is not None and g_in.dtype != dtype:
            g_in = g_in.to(dtype)
        result[src] = (g_in, h_in)
    return result
