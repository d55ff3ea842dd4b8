"""The user's names for the autograd nodes of an error.

An autograd node knows nothing of the module that made it. When the sweep
stops at a node without a rule, :func:`name_modules` runs the forward once
more with every module's forward hooked and every torch function watched, and
tags each node created inside a module with the module's qualified name and
class (``encoder.layers.0.norm (LlamaRMSNorm)``). This costs a forward pass,
only on the error path; the sweep itself never pays for it.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List

import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["op_name", "name_modules"]

_KEY = "obd_ext_module"


def op_name(node_type: str) -> str:
    """The operation of an autograd node type in the user's terms: "CumsumBackward0" -> "cumsum"."""
    base = re.sub(r"Backward\d*$", "", node_type)
    base = re.sub(r"^(Native|Cudnn|Miopen|Mkldnn)", "", base)
    # CamelCase to snake_case, keeping a dimension with its digit ("Pool2D" -> "pool2d")
    words = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[0-9])(?=[A-Z][a-z])", "_", base).lower()
    return words or node_type


class _Tagger(TorchFunctionMode):
    """Tags the grad_fn of every tensor a torch function makes (and the nodes
    behind it not tagged yet, made inside composite functions) with the innermost
    module running."""

    def __init__(self, stack: List[str]):
        super().__init__()
        self.stack = stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack:
            label = self.stack[-1]
            todo = [t.grad_fn for t in tree_leaves(out) if isinstance(t, Tensor) and t.grad_fn is not None]
            while todo:
                node = todo.pop()
                if node is None or hasattr(node, "variable") or _KEY in node.metadata:
                    continue
                node.metadata[_KEY] = label
                todo.extend(c for c, _ in node.next_functions)
        return out


def name_modules(model: nn.Module, run: Callable[[], object], node_type: str) -> List[str]:
    """The modules (qualified name and class) whose forward makes a node of ``node_type``.

    Args:
        model: the user's model.
        run: runs the forward that the sweep read, returning its output.
        node_type: the autograd node's type name.

    Returns:
        "name (Class)" for each module, in graph order; "(the model's forward)" where a
        node is made outside every submodule.
    """
    names: Dict[nn.Module, str] = {m: (n or "(the model)") for n, m in model.named_modules()}
    stack: List[str] = []

    def pre(module, args):
        if module in names:
            stack.append(f"{names[module]} ({type(module).__name__})")

    def post(module, args, out):
        if module in names and stack:
            stack.pop()

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    h1, h2 = register_module_forward_pre_hook(pre), register_module_forward_hook(post)
    try:
        with torch.enable_grad(), _Tagger(stack):
            out = run()
    finally:
        h1.remove()
        h2.remove()
    found: List[str] = []
    roots = [t.grad_fn for t in tree_leaves(out) if isinstance(t, Tensor) and t.grad_fn is not None]
    seen, todo = set(roots), list(roots)
    while todo:
        node = todo.pop()
        if type(node).__name__ == node_type:
            label = node.metadata.get(_KEY, "(the model's forward)")
            if label not in found:
                found.append(label)
        for c, _ in node.next_functions:
            if c is not None and c not in seen:
                seen.add(c)
                todo.append(c)
    return found[::-1]  # the walk went from the output back: forward order reads better
