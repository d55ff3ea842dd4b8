"""The reverse sweep of back-propagated second derivatives (OBD eq. 7).

Why the autograd graph, and not module hooks or a dispatch mode: the graph that
autograd records for the forward pass already holds, for every operation, the
tensors its derivatives need (``node._saved_*``) and the wiring between
operations, for any model: residual adds, attention, tied weights (one
parameter, several uses: its AccumulateGrad node receives every use, which is
eq. 5). Module hooks would need one rule per module type and miss functional
code (``x @ w``, ``F.gelu``, weight tying); a dispatch mode would record the
same information a second time. So the sweep walks ``output.grad_fn`` in
reverse topological order, calling one rule per node type (rules.py), and
reduces broadcast results to each input's shape as autograd's engine does.
Calling rules does not consume the graph: ``loss.backward()`` still works
afterwards.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from torch import Tensor

from .graph import REENTRANT_CHECKPOINT_NODES, reentrant_checkpoint_error
from .regions import Region, apply_region, find_regions
from .naming import op_name
from .rules import Ctx, UnsupportedOpError, rule_for, second_order

__all__ = ["sweep"]


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _fit(t: Optional[Tensor], shape) -> Optional[Tensor]:
    if t is None or tuple(t.shape) == tuple(shape):
        return t
    return t.sum_to_size(shape)


def sweep(root, output_nr: int, seed: List[Optional[Tensor]], lm: bool,
          names: Dict[int, str], model_root=None, loss_name: Optional[str] = None) -> Dict[str, Tensor]:
    """Back-propagate (g, H) from the model output (or the loss) to the parameters.

    Args:
        root: the model output's ``grad_fn`` (the output tensor itself is not
            needed, so the caller can free it: logits-sized at a large vocabulary),
            or the scalar loss's (then the seed is g = 1, H = 0).
        output_nr: the output's ``output_nr``.
        seed: ``[g_out, h_out]``: dL/d output (needed for OBD's f'' terms; None
            for LM) and the diagonal of d2L/d output2 (the boundary condition).
            The list is emptied, so that once the output's node has been
            processed nothing holds these output-sized tensors.
        lm: drop the f'' terms (Levenberg-Marquardt / Gauss-Newton) in the model.
        names: id(parameter) -> name, for the parameters wanted.
        model_root: with ``root`` a loss: the node where the model ends (the
            model output's ``grad_fn``), or a list of them (an output of several
            tensors). Nodes it reaches are the model's; the
            others are the loss's, always swept with their f'' terms, so that
            under ``lm`` what reaches the model output is the diagonal of the
            loss's own Hessian there (losses.py, "Where the model ends").
        loss_name: the loss, for errors raised in its nodes.

    Returns:
        name -> curvature of that parameter (summed over its uses and the batch).
    """
    g_out, h_out = seed
    seed.clear()
    if root is None:
        raise ValueError("the model output has no autograd graph: does it depend on a parameter that requires grad?")
    ctx = Ctx(lm)
    consumers: Dict[object, List[Tuple[object, int]]] = defaultdict(list)
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        if type(node).__name__ in REENTRANT_CHECKPOINT_NODES:  # before any work: never a silent zero
            raise reentrant_checkpoint_error("lm" if lm else "obd")
        for slot, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            consumers[child].append((node, slot))
            if child not in seen:
                seen.add(child)
                stack.append(child)

    # Topological order of the nodes (consumers before producers), then the
    # units the sweep visits: single nodes, and elementwise regions (regions.py)
    # swept as one function of their inputs.
    order = _topological([root], lambda n: [c for c, _ in n.next_functions if c is not None], consumers)
    loss_side = _loss_side(order, model_root) if model_root is not None else frozenset()
    if lm and loss_side:
        # A region is swept in one mode: under lm the loss's (f'' kept) and the model's
        # (f'' dropped) are found apart, so that none spans the two.
        regions = (find_regions([n for n in order if n in loss_side], consumers)
                   + find_regions([n for n in order if n not in loss_side], consumers))
    else:
        regions = find_regions(order, consumers)
    while True:
        unit_of: Dict[object, object] = {node: node for node in order}
        for region in regions:
            for node in region.nodes:
                unit_of[node] = region
        units = _unit_order(unit_of[root], unit_of, consumers)
        if units is not None:
            break
        # A region that a path leaves and re-enters through a non-elementwise node
        # would have to be swept before itself: leave those to the per-node rules.
        regions = [r for r in regions if not _cyclic(r, unit_of, consumers)]

    # Which units need the first-order gradient at their outputs: those with an
    # f'' term (a region with a product or an f'') and those that pass g on to
    # one. Parameters never do, so OBD skips the weight gradients.
    def unit_lm(unit) -> bool:
        return lm and (unit.nodes[0] if isinstance(unit, Region) else unit) not in loss_side

    needs_g: Dict[object, bool] = {}
    for unit in reversed(units):
        if isinstance(unit, Region):
            own, children = unit.second_order, [c for c, _ in unit.inputs]
        else:
            if hasattr(unit, "variable"):
                needs_g[unit] = False
                continue
            own, children = second_order(unit), [c for c, _ in unit.next_functions if c is not None]
        needs_g[unit] = not unit_lm(unit) and (own or any(needs_g[unit_of[c]] for c in children))

    deps: Dict[object, int] = defaultdict(int)
    for child, cons in consumers.items():
        for node, _ in cons:
            if unit_of[node] is not unit_of[child]:
                deps[unit_of[child]] += 1

    buffers: Dict[object, Dict[int, Tuple[Optional[Tensor], Optional[Tensor]]]] = {
        root: {output_nr: (g_out if needs_g[unit_of[root]] else None, h_out)}}
    del g_out, h_out
    results: Dict[str, Tensor] = {}
    ready: List[object] = [unit_of[root]]

    def send(child, idx: int, gi: Optional[Tensor], hi: Optional[Tensor]) -> None:
        if hi is not None:
            shape = child._input_metadata[idx].shape
            old = buffers.setdefault(child, {}).get(idx, (None, None))
            buffers[child][idx] = (_add(old[0], _fit(gi, shape)), _add(old[1], _fit(hi, shape)))

    def done(child) -> None:
        unit = unit_of[child]
        deps[unit] -= 1
        if deps[unit] == 0:
            ready.append(unit)

    while ready:
        unit = ready.pop()
        if isinstance(unit, Region):
            outs = {}
            for node in unit.nodes:
                for nr, gh in buffers.pop(node, {}).items():
                    outs[(node, nr)] = gh
            if any(h is not None for _, h in outs.values()):
                ctx.lm = unit_lm(unit)
                res = apply_region(unit, outs, ctx, {src: needs_g[unit_of[src[0]]] for src in unit.inputs})
            else:
                res = {}
            del outs
            for src, (gi, hi) in res.items():
                send(src[0], src[1], gi, hi)
            for _, _, (child, _) in unit.edges:
                done(child)
            continue
        node = unit
        buf = buffers.pop(node, {})
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf tensor
            name = names.get(id(node.variable))
            h = buf.get(0, (None, None))[1]
            if name is not None and h is not None:
                h = _fit(h, node.variable.shape)
                results[name] = _add(results.get(name), h)
            continue
        n_out = len(node._input_metadata)
        g = [buf.get(i, (None, None))[0] for i in range(n_out)]
        h = [buf.get(i, (None, None))[1] for i in range(n_out)]
        del buf
        children = node.next_functions
        if all(x is None for x in h):
            g_in, h_in = (None,) * len(children), (None,) * len(children)
        else:
            ctx.g_wanted = [child is not None and needs_g[unit_of[child]] for child, _ in children]
            ctx.lm = unit_lm(node)
            g_in, h_in = _rule(node, loss_name if node in loss_side else None)(node, g, h, ctx)
        del g, h
        for (child, idx), gi, hi in zip(children, g_in, h_in):
            if child is None:
                continue
            send(child, idx, gi, hi)
            done(child)
    return results


def _loss_side(order: List[object], model_root) -> frozenset:
    """The nodes the model output's nodes do not reach: the loss's own."""
    roots = list(model_root) if isinstance(model_root, (list, tuple)) else [model_root]
    if not set(roots) & set(order):
        raise ValueError("obd_ext curvature: the loss does not depend on the model output (was it detached?)")
    model = set(roots)
    stack = list(roots)
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is not None and child not in model:
                model.add(child)
                stack.append(child)
    return frozenset(n for n in order if n not in model)


def _rule(node, loss_name: Optional[str]):
    """The node's rule; in the loss, an unsupported op is an error naming the loss."""
    try:
        return rule_for(node)
    except UnsupportedOpError as e:
        if loss_name is None:
            raise
        name = type(node).__name__
        raise UnsupportedOpError(
            f"obd_ext curvature: the loss {loss_name} uses {op_name(name)} (the autograd node {name}), which has "
            "no second-order rule; write the loss from supported ops, or use method='hutchinson' (any loss) or "
            "'exact' (small models)") from e


def _topological(roots: List[object], children, consumers) -> List[object]:
    """Kahn's order from ``roots``: every node after all its consumers."""
    pending = {node: len(cons) for node, cons in consumers.items()}
    order: List[object] = []
    queue = list(roots)
    while queue:
        node = queue.pop()
        order.append(node)
        for child in children(node):
            pending[child] -= 1
            if pending[child] == 0:
                queue.append(child)
    return order


def _unit_order(root_unit, unit_of: Dict[object, object], consumers) -> Optional[List[object]]:
    """Units in topological order (consumers first), or None if regions make a cycle."""
    pending: Dict[object, int] = defaultdict(int)
    for child, cons in consumers.items():
        for node, _ in cons:
            if unit_of[node] is not unit_of[child]:
                pending[unit_of[child]] += 1
    order: List[object] = []
    queue = [root_unit]
    while queue:
        unit = queue.pop()
        order.append(unit)
        nodes = unit.nodes if isinstance(unit, Region) else (unit,)
        for node in nodes:
            for child, _ in node.next_functions:
                if child is None or unit_of[child] is unit:
                    continue
                cu = unit_of[child]
                pending[cu] -= 1
                if pending[cu] == 0:
                    queue.append(cu)
    total = len(set(unit_of.values()))
    return order if len(order) == total else None


def _cyclic(region: Region, unit_of, consumers) -> bool:
    """Whether a path leaves ``region`` and comes back into it."""
    stack = [c for n in region.nodes for c, _ in consumers.get(n, []) if c not in region.members]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in region.members:
            return True
        stack.extend(c for c, _ in consumers.get(node, []))
    return False
