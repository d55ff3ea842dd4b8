"""Which layers hold prunable weights: the one rule behind the Pruner's default list and layer-wise pruning.

A prunable weight is a layer's matrix (or kernel) of connections: Linear,
Bilinear, convolutions and transposed convolutions, Embedding and
EmbeddingBag, transformers' ``Conv1D`` (GPT-2's linear layers, stored
``[in, out]``), the input projections ``nn.MultiheadAttention`` holds as raw
parameters (``in_proj_weight``, or ``q/k/v_proj_weight``), and the weight
matrices of RNN, LSTM and GRU layers and cells. Biases and normalisation
parameters are not: they are few, and deleting them is rarely what a user
means.
"""

from __future__ import annotations

from typing import List

import torch.nn as nn
from torch import Tensor

__all__ = ["is_hf_conv1d", "stores_inputs_first", "prunable_weight_attrs"]

_WEIGHT_KINDS = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer storing its weight as ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def stores_inputs_first(module: nn.Module) -> bool:
    """Whether ``module.weight`` holds its inputs in dim 0 and outputs in dim 1.

    transformers' Conv1D stores ``[in, out]`` and transposed convolutions
    ``[in, out / groups, *kernel]``, where every other layer here (and the
    row, N:M and group scopes) has ``[out, in, ...]``.
    """
    return is_hf_conv1d(module) or isinstance(module, nn.modules.conv._ConvTransposeNd)


def prunable_weight_attrs(module: nn.Module) -> List[str]:
    """Names of ``module``'s own prunable weights (not its children's), in registration order."""
    if isinstance(module, _WEIGHT_KINDS) or is_hf_conv1d(module):
        return ["weight"] if isinstance(getattr(module, "weight", None), Tensor) else []
    if isinstance(module, nn.MultiheadAttention):
        return [n for n in _ATTENTION_WEIGHTS if isinstance(getattr(module, n, None), nn.Parameter)]
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
    return []
