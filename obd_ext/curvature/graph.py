"""Checks on the autograd graph that every curvature method reads.

Every method takes what it needs from the graph autograd records for the
forward pass. A reentrant checkpoint (``torch.utils.checkpoint(...,
use_reentrant=True)``) records its block as one opaque node that re-runs the
forward inside ``backward()`` (or, when none of the block's inputs requires
grad, as no node at all: PyTorch only warns that gradients will be None): the block's operations and parameters are not
in the graph at all, so a method reading the graph would see them as unused
(exactly 0 curvature) or fail inside PyTorch. One clear error, for every
method, replaces both; the non-reentrant checkpoint records the block's
operations as usual and works with every method.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator, Optional

from .rules import UnsupportedOpError

__all__ = ["REENTRANT_CHECKPOINT_NODES", "reentrant_checkpoint_error", "check_graph", "checkpoint_guard"]

# Node types of reentrant autograd Functions whose backward re-runs a forward.
REENTRANT_CHECKPOINT_NODES = frozenset({"CheckpointFunctionBackward"})


def reentrant_checkpoint_error(method: Optional[str] = None) -> UnsupportedOpError:
    """The one error for a reentrant checkpoint, naming the fix."""
    which = f"method={method!r}" if method else "the curvature methods"
    return UnsupportedOpError(
        "obd_ext curvature: the model runs part of its forward under torch.utils.checkpoint.checkpoint(..., "
        "use_reentrant=True); its block's operations and parameters are hidden from the autograd graph that "
        f"{which} reads (they would get no curvature). Pass use_reentrant=False to checkpoint (supported by every "
        "method), or run the curvature pass without checkpointing."
    )


def check_graph(roots: Iterable[object], method: Optional[str] = None) -> None:
    """Raise :func:`reentrant_checkpoint_error` if the graph below ``roots`` (grad_fn
    nodes; None entries are skipped) holds a reentrant checkpoint."""
    stack = [r for r in roots if r is not None]
    seen = set(stack)
    while stack:
        node = stack.pop()
        if type(node).__name__ in REENTRANT_CHECKPOINT_NODES:
            raise reentrant_checkpoint_error(method)
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)


# PyTorch's warning when a reentrant checkpoint's inputs need no gradient: the
# block then leaves no node in the graph at all, and its parameters none either.
_NO_GRAD_INPUTS = r"None of the inputs have requires_grad=True"


@contextlib.contextmanager
def checkpoint_guard(method: Optional[str] = None) -> Iterator[None]:
    """Around forward passes the methods read: a reentrant checkpoint whose inputs
    need no gradient (it leaves no trace in the graph, so the check on the graph
    cannot see it) raises :func:`reentrant_checkpoint_error` instead of PyTorch's
    warning. Other warnings are shown as usual."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=_NO_GRAD_INPUTS, category=UserWarning)
        try:
            yield
        except UserWarning as e:
            if _NO_GRAD_INPUTS in str(e):
                raise reentrant_checkpoint_error(method) from e
            raise
