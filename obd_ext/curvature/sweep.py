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
from .rules import SECOND_ORDER, Ctx, rule_for

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
          names: Dict[int, str]) -> Dict[str, Tensor]:
    """Back-propagate (g, H) from the model output to the parameters.

    Args:
        root: the model output's ``grad_fn`` (the output tensor itself is not
            needed, so the caller can free it: logits-sized at a large vocabulary).
        output_nr: the output's ``output_nr``.
        seed: ``[g_out, h_out]``: dL/d output (needed for OBD's f'' terms; None
            for LM) and the diagonal of d2L/d output2 (the boundary condition).
            The list is emptied, so that once the output's node has been
            processed nothing holds these output-sized tensors.
        lm: drop the f'' terms (Levenberg-Marquardt / Gauss-Newton).
        names: id(parameter) -> name, for the parameters wanted.

    Returns:
        name -> curvature of that parameter (summed over its uses and the batch).
    """
    g_out, h_out = seed
    seed.clear()
    if root is None:
        raise ValueError("the model output has no autograd graph: does it depend on a parameter that requires grad?")
    ctx = Ctx(lm)
    deps: Dict[object, int] = defaultdict(int)
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        if type(node).__name__ in REENTRANT_CHECKPOINT_NODES:  # before any work: never a silent zero
            raise reentrant_checkpoint_error("lm" if lm else "obd")
        for child, _ in node.next_functions:
            if child is None:
                continue
            deps[child] += 1
            if child not in seen:
                seen.add(child)
                stack.append(child)

    # Topological order (consumers before producers), then which nodes need the
    # first-order gradient at their outputs: those with an f'' term and those
    # that pass g on to one. Parameters never do, so OBD skips the weight
    # gradients of the ordinary backward pass.
    order: List[object] = []
    pending = dict(deps)
    queue = [root]
    while queue:
        node = queue.pop()
        order.append(node)
        for child, _ in node.next_functions:
            if child is not None:
                pending[child] -= 1
                if pending[child] == 0:
                    queue.append(child)
    needs_g: Dict[object, bool] = {}
    for node in reversed(order):
        needs_g[node] = not lm and not hasattr(node, "variable") and (
            type(node).__name__ in SECOND_ORDER
            or any(child is not None and needs_g[child] for child, _ in node.next_functions))

    buffers: Dict[object, Dict[int, Tuple[Optional[Tensor], Optional[Tensor]]]] = {
        root: {output_nr: (g_out if needs_g[root] else None, h_out)}}
    del g_out, h_out
    results: Dict[str, Tensor] = {}
    ready: List[object] = [root]
    while ready:
        node = ready.pop()
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
        children = node.next_functions
        if all(x is None for x in h):
            g_in, h_in = (None,) * len(children), (None,) * len(children)
        else:
            ctx.g_wanted = [child is not None and needs_g[child] for child, _ in children]
            g_in, h_in = rule_for(node)(node, g, h, ctx)
        for (child, idx), gi, hi in zip(children, g_in, h_in):
            if child is None:
                continue
            if hi is not None:
                shape = child._input_metadata[idx].shape
                old = buffers.setdefault(child, {}).get(idx, (None, None))
                buffers[child][idx] = (_add(old[0], _fit(gi, shape)), _add(old[1], _fit(hi, shape)))
            deps[child] -= 1
            if deps[child] == 0:
                ready.append(child)
    return results
