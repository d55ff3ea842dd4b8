"""Recurrent layers recorded as their cell operations.

``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` run one fused kernel where one exists
(oneDNN on CPU for float32 / bfloat16, cuDNN on GPU), whose backward is one
opaque autograd node: no rule can read it, and it has no double backward for
``hutchinson`` / ``exact``. Without those kernels PyTorch runs the same
layers as matmuls, ``unsafe_split``, sigmoid, tanh and products, all of which
have rules. :class:`RecurrentAsCellOps` switches the fused kernels off for the
recurrent functions only (every other operation, convolutions included, keeps
its kernels): the outputs are the same up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

__all__ = ["RecurrentAsCellOps", "has_recurrent"]

_RECURRENT = frozenset({torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu})


def has_recurrent(model: nn.Module) -> bool:
    """Whether the model holds an nn.LSTM / nn.GRU / nn.RNN."""
    return any(isinstance(m, nn.RNNBase) for m in model.modules())


class RecurrentAsCellOps(TorchFunctionMode):
    """Run torch.lstm / gru / rnn_tanh / rnn_relu without oneDNN and cuDNN."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RECURRENT:
            return func(*args, **kwargs)
        # only the enabled switches (the backends' flags() contexts also reset TF32 and
        # determinism settings, and warn about them)
        cudnn, mkldnn = torch._C._get_cudnn_enabled(), torch._C._get_mkldnn_enabled()
        torch._C._set_cudnn_enabled(False)
        torch._C._set_mkldnn_enabled(False)
        try:
            return func(*args, **kwargs)
        finally:
            torch._C._set_cudnn_enabled(cudnn)
            torch._C._set_mkldnn_enabled(mkldnn)
