"""Calibration statistics of layer-wise OBD: ``sum_n x_nj^2`` per input feature.

For one linear layer ``y = x W^T`` and the reconstruction loss
``E = sum_n ||x_n W^T - x_n W'^T||^2`` of its calibration inputs, the Hessian
of ``E`` with respect to row ``i`` of ``W`` is ``2 X^T X`` for every row, so its
diagonal is ``h_ij = 2 sum_n x_nj^2`` and the OBD saliency of ``w_ij`` is
``s_ij = h_ij w_ij^2 / 2 = w_ij^2 sum_n x_nj^2`` (docs/math.md, "Layer-wise form for large
models"). Ranked per output row this is the square of Wanda's score
``|w_ij| ||x_j||``, so the masks are Wanda's.

:class:`CalibrationStats` collects the statistics with forward pre-hooks:
linear inputs go through the fused ``column_sq_sum_`` op (bf16/fp16 read as
they are, fp32 accumulation, no upcast copy of the activations); convolutions
sum ``x^2`` over every kernel offset's window.

:class:`GramStats` collects the full ``X^T X`` per linear input, which the
layer-wise Optimal Brain Surgeon (:mod:`.surgeon`) needs; layers fed the same
tensor (q/k/v, gate/up) share one matrix.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..layer_kinds import is_hf_conv1d

__all__ = ["CalibrationStats", "GramStats", "is_hf_conv1d", "prunable_layers", "weight_rows", "weight_rows_of"]


def _kinds(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or is_hf_conv1d(module)


def prunable_layers(root: nn.Module, skip: Iterable[str] = ()) -> Dict[str, nn.Module]:
    """Linear, HF Conv1D, Conv1d and Conv2d layers under ``root``, by name (``skip``: names left out)."""
    skip = set(skip)
    return {n: m for n, m in root.named_modules() if n and n not in skip and _kinds(m)}


def weight_rows_of(module: nn.Module, t: Tensor) -> Tensor:
    """A tensor shaped like ``module.weight`` viewed as ``[outputs, inputs]`` (HF Conv1D transposed,
    convolutions flattened)."""
    return t.t() if is_hf_conv1d(module) else t.flatten(1) if t.dim() > 2 else t


def weight_rows(module: nn.Module) -> Tensor:
    """The weight as ``[outputs, inputs]``: a view that writes through to the parameter."""
    return weight_rows_of(module, module.weight)


def _conv_window_sums(conv: nn.Conv1d | nn.Conv2d, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``S[c, k...] = sum over samples and output positions of x[c, pos*stride + k*dilation - pad]^2``."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"layer-wise statistics support convolutions with numeric zero padding, got "
                         f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
    nd = x.dim() - 2 if x.dim() == conv.weight.dim() else x.dim() - 1
    if x.dim() == nd + 1:  # unbatched input
        x = x.unsqueeze(0)
    sq = x.detach().to(dtype).square()
    pads = [p for p in reversed(conv.padding) for _ in range(2)]
    sq = F.pad(sq, pads)
    out = torch.empty((sq.shape[1],) + tuple(conv.kernel_size), dtype=dtype, device=x.device)
    spatial = sq.shape[2:]
    n_out = [(spatial[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1) // conv.stride[d] + 1
             for d in range(nd)]
    for k in itertools.product(*(range(s) for s in conv.kernel_size)):
        window = tuple(slice(k[d] * conv.dilation[d], k[d] * conv.dilation[d] + (n_out[d] - 1) * conv.stride[d] + 1,
                             conv.stride[d]) for d in range(nd))
        out[(slice(None),) + k] = sq[(slice(None), slice(None)) + window].sum(dim=[0] + list(range(2, 2 + nd)))
    return out


class _InputHooks:
    """What both statistics share: the layers, the accumulation dtype, rows seen, and the
    forward pre-hooks that feed each layer's input to ``add`` inside a ``with`` block."""

    def __init__(self, layers: Dict[str, nn.Module], acc_dtype: torch.dtype):
        if acc_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"acc_dtype must be torch.float32 or torch.float64, got {acc_dtype}")
        self.layers = dict(layers)
        self.acc_dtype = acc_dtype
        self.rows: Dict[str, int] = {n: 0 for n in self.layers}
        self._handles: List = []

    def add(self, name: str, x: Tensor) -> None:  # pragma: no cover - each statistic defines it
        raise NotImplementedError

    def __enter__(self):
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: self.add(name, args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class CalibrationStats(_InputHooks):
    """Accumulates ``sum_n x_nj^2`` over the inputs of ``layers`` while the model runs.

    Use as a context manager around forward passes::

        with CalibrationStats(prunable_layers(block)) as stats:
            for x in batches:
                block(x)
        h = stats.curvature("mlp.fc1", block.mlp.fc1)   # [out, in], 2 sum x^2

    Args:
        layers: name -> module (see :func:`prunable_layers`).
        acc_dtype: accumulation precision, float32 (default) or float64.
    """

    def __init__(self, layers: Dict[str, nn.Module], acc_dtype: torch.dtype = torch.float32):
        super().__init__(layers, acc_dtype)
        self.sums: Dict[str, Optional[Tensor]] = {n: None for n in self.layers}

    @torch.no_grad()
    def add(self, name: str, x: Tensor) -> None:
        """Add one batch of inputs of layer ``name``."""
        m = self.layers[name]
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            part = _conv_window_sums(m, x, self.acc_dtype)
            self.sums[name] = part if self.sums[name] is None else self.sums[name].add_(part)
            self.rows[name] += x.shape[0] if x.dim() == m.weight.dim() else 1
            return
        if self.sums[name] is None:
            self.sums[name] = torch.zeros(x.shape[-1], dtype=self.acc_dtype, device=x.device)
        ops.column_sq_sum_(self.sums[name], x.detach())
        self.rows[name] += x.numel() // max(1, x.shape[-1])

    def column_sums(self, name: str) -> Tensor:
        """``sum_n x_nj^2`` laid out like a row of :func:`weight_rows` (per group for grouped convs)."""
        s = self.sums[name]
        if s is None:
            raise RuntimeError(f"no calibration inputs reached layer {name!r}: run the model on calibration "
                               "data inside the CalibrationStats context first")
        if not torch.isfinite(s).all():
            bad = int((~torch.isfinite(s)).nonzero()[0])
            raise ValueError(f"calibration statistics of layer {name!r} are not finite at input feature {bad} "
                             f"(value {float(s[bad])}): the calibration activations hold NaN/Inf or overflow")
        return s

    def curvature(self, name: str) -> Tensor:
        """The layer-wise Hessian diagonal ``2 sum_n x_nj^2`` as a ``[outputs, inputs]`` tensor."""
        m = self.layers[name]
        s = self.column_sums(name)
        rows = weight_rows(m)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            groups, per = m.groups, m.weight.shape[1]
            out_per_group = m.weight.shape[0] // groups
            s = s.reshape(groups, per, -1).flatten(1)  # [groups, in_per_group * kernel]
            return (2 * s).repeat_interleave(out_per_group, dim=0)
        return (2 * s).expand(rows.shape[0], -1)

    def tensors(self) -> Dict[str, Tensor]:
        """name -> accumulated sums (for all-reducing across data-parallel ranks)."""
        return {n: s for n, s in self.sums.items() if s is not None}

    def __repr__(self) -> str:
        return f"CalibrationStats({len(self.layers)} layers, rows={sum(self.rows.values())})"



class GramStats(_InputHooks):
    """Accumulates ``X^T X`` (summed over tokens) at the input of each linear layer while the model runs.

    Layers called on the very same input tensor one after the other (a
    transformer's q/k/v projections, or gate/up) share one matrix: the
    sharing is found on the first call and checked on every later one (a
    layer that shared its input once and then sees a different one is an
    error, never a silently wrong matrix).

    Use as a context manager around forward passes::

        with GramStats(prunable_layers(block)) as stats:
            for x in batches:
                block(x)
        g = stats.gram("self_attn.q_proj")   # [in, in], sum_n x_n x_n^T

    Args:
        layers: name -> ``nn.Linear`` or HF ``Conv1D`` (convolutions are refused).
        acc_dtype: accumulation precision, float32 (default) or float64. The
            activations are cast to it before the product.
    """

    def __init__(self, layers: Dict[str, nn.Module], acc_dtype: torch.dtype = torch.float32):
        super().__init__(layers, acc_dtype)
        for name, m in self.layers.items():
            if not (isinstance(m, nn.Linear) or is_hf_conv1d(m)):
                raise ValueError(f"layer {name!r} is a {type(m).__name__}: the full X^T X statistics (layer-wise "
                                 "OBS) support nn.Linear and transformers' Conv1D only")
        self.leader: Dict[str, str] = {}  # name -> the layer whose matrix it uses (itself when not shared)
        self.sums: Dict[str, Tensor] = {}  # leader name -> X^T X
        self._last: Optional[tuple] = None  # (input tensor, leader) of the latest call

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._last = None  # do not keep an activation alive

    @torch.no_grad()
    def add(self, name: str, x: Tensor) -> None:
        """Add one batch of inputs of layer ``name`` (a repeat of the previous layer's input is counted once)."""
        same = self._last is not None and self._last[0] is x
        lead = self.leader.get(name)
        if lead is None:  # first call: share the previous layer's matrix if fed the same tensor
            lead = self._last[1] if same and self.sums[self._last[1]].shape[0] == x.shape[-1] else name
            self.leader[name] = lead
        if lead != name:
            if not (same and self._last[1] == lead):
                raise RuntimeError(f"GramStats: layer {name!r} shared its input with {lead!r} on the first batch but "
                                   "not on a later one; collect this model's statistics without sharing")
        else:
            xs = x.detach().reshape(-1, x.shape[-1]).to(self.acc_dtype)
            if name not in self.sums:
                self.sums[name] = torch.zeros((xs.shape[1], xs.shape[1]), dtype=self.acc_dtype, device=x.device)
            self.sums[name].addmm_(xs.t(), xs)
        self.rows[name] += x.numel() // max(1, x.shape[-1])
        self._last = (x, lead)

    def gram(self, name: str) -> Tensor:
        """``sum_n x_n x_n^T`` over every input row of layer ``name``, ``[in, in]`` (shared matrices are one tensor).

        Raises:
            RuntimeError: no calibration input reached the layer.
            ValueError: the matrix is not finite (NaN/Inf activations or overflow).
        """
        lead = self.leader.get(name)
        if lead is None:
            raise RuntimeError(f"no calibration inputs reached layer {name!r}: run the model on calibration "
                               "data inside the GramStats context first")
        g = self.sums[lead]
        if not bool(torch.isfinite(g).all()):
            i, j = (int(v) for v in (~torch.isfinite(g)).nonzero()[0])
            raise ValueError(f"calibration statistics X^T X of layer {name!r} are not finite at [{i}, {j}] (value "
                             f"{float(g[i, j])}): the calibration activations hold NaN/Inf or overflow")
        return g

    def column_sums(self, name: str) -> Tensor:
        """``sum_n x_nj^2``: the diagonal of :meth:`gram` (what :class:`CalibrationStats` collects)."""
        return self.gram(name).diagonal()

    def shared(self) -> Dict[str, List[str]]:
        """leader -> every layer using its matrix, in call order."""
        out: Dict[str, List[str]] = {}
        for n, lead in self.leader.items():
            out.setdefault(lead, []).append(n)
        return out

    def tensors(self) -> Dict[str, Tensor]:
        """leader name -> accumulated matrix, each shared matrix once (for all-reducing across ranks)."""
        return dict(self.sums)

    def __repr__(self) -> str:
        return (f"GramStats({len(self.layers)} layers, {len(self.sums)} matrices, "
                f"rows={sum(self.rows.values())})")
