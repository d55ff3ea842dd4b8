"""Turning pruned weights into storage that profits from the zeros.

Three finished forms of a pruned model (``Pruner.finalize(format=...)``):

- ``"dense"``: plain tensors with zeros in place, no hooks; runs anywhere.
- ``"csr"``: each pruned ``nn.Linear`` weight becomes a sparse CSR parameter
  with int32 indices (``F.linear`` accepts it, so the module is unchanged).
  It saves memory from about 67% sparsity on in fp32 (4 bytes of value plus 4
  of column index per kept entry) and speeds up matmuls only at high sparsity;
  torch's CPU CSR matmul supports float32/float64 only.
- ``"semi_structured"``: 2:4 weights of ``nn.Linear`` layers as
  ``torch.sparse.to_sparse_semi_structured`` tensors, which run on the sparse
  tensor cores of NVIDIA GPUs (Ampere and newer; fp16/bf16; CUDA only in
  torch). The 2:4 pattern is checked first: a layer that is not 2:4 raises
  instead of being silently densified or mangled.

Other pruned tensors (convolutions, embeddings) stay dense with zeros: torch
has no fast sparse kernels for them.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .vocabulary import parse_pattern

__all__ = ["FORMATS", "Finalized", "check_nm_pattern", "to_csr", "to_semi_structured", "finalize_modules"]

FORMATS = ("dense", "csr", "semi_structured")


@dataclass
class Finalized:
    """What finalising did: which parameters changed storage, and bytes before/after."""

    format: str
    converted: List[str] = field(default_factory=list)
    kept_dense: List[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0


def check_nm_pattern(weight: Tensor, pattern: str = "2:4", name: str = "weight") -> None:
    """Raise unless every M consecutive inputs of each row hold at most N nonzeros (``pattern="N:M"``)."""
    nm = parse_pattern(pattern)
    if nm is None:
        raise ValueError(f"pattern must be 'N:M' such as '2:4', got {pattern!r}")
    n, m = nm
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(f"{name}: {n}:{m} sparsity needs a 2-D weight whose input size is a multiple of {m}, "
                         f"got shape {tuple(weight.shape)}")
    nonzeros = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    worst = int(nonzeros.max()) if nonzeros.numel() else 0
    if worst > n:
        row, group = divmod(int(nonzeros.reshape(-1).argmax()), nonzeros.shape[1])
        raise ValueError(f"{name} is not {n}:{m} sparse: row {row}, inputs {group * m}..{group * m + m - 1} hold "
                         f"{worst} nonzeros (prune with pattern='{n}:{m}' first)")


def _bytes(t: Tensor) -> int:
    if t.layout == torch.sparse_csr:
        return sum(x.numel() * x.element_size() for x in (t.crow_indices(), t.col_indices(), t.values()))
    if hasattr(t, "__tensor_flatten__"):  # tensor subclasses such as the 2:4 semi-structured ones
        inner = [getattr(t, a) for a in t.__tensor_flatten__()[0]]
        return sum(x.numel() * x.element_size() for x in inner if x is not None)
    return t.numel() * t.element_size()


def to_csr(weight: Tensor, name: str = "weight") -> Tensor:
    """CSR copy of a 2-D weight with int32 indices (halves the index bytes of torch's default)."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: CSR needs a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.device.type == "cpu" and weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: torch's CPU CSR matmul supports float32/float64 only, got {weight.dtype}; "
                         "cast the model first or use format='dense'")
    with warnings.catch_warnings():  # torch's "CSR support is in beta" notice, once per tensor
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.detach().to_sparse_csr()
    index = torch.int32 if weight.numel() < 2**31 else torch.int64
    # The indices come from torch's own conversion, so they are valid by construction.
    return torch.sparse_csr_tensor(csr.crow_indices().to(index), csr.col_indices().to(index), csr.values(),
                                   weight.shape, check_invariants=False)


def to_semi_structured(weight: Tensor, name: str = "weight") -> Tensor:
    """2:4 semi-structured copy of a 2-D CUDA weight (checked to be 2:4 first)."""
    check_nm_pattern(weight, "2:4", name)
    if weight.device.type != "cuda":
        raise ValueError(f"{name}: 2:4 semi-structured tensors run on CUDA only (torch.sparse."
                         f"to_sparse_semi_structured), got device {weight.device}; use format='dense' or 'csr'")
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: 2:4 semi-structured tensors need float16 or bfloat16, got {weight.dtype}")
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight.detach())


def finalize_modules(model: nn.Module, names: List[str], format: str,
                     values: Optional[Dict[str, Tensor]] = None) -> Finalized:
    """Convert the named parameters of ``model`` to ``format``, all or nothing.

    Args:
        values: name -> the tensor to store (default: the parameter's data,
            zeros already in place). Every conversion runs before the first
            parameter is replaced, so a layer that cannot be converted raises
            with the model unchanged.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    modules = dict(model.named_modules())
    # A parameter several layers share (an embedding tied to the head) stays
    # dense: replacing it in one owner would untie the two.
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    out = Finalized(format)
    replace = []
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = modules[owner_name]
        p = getattr(owner, attr)
        data = values[name] if values is not None else p.data
        out.bytes_before += _bytes(p)
        if format == "dense" or not (isinstance(owner, nn.Linear) and attr == "weight") or uses[id(p)] > 1:
            out.kept_dense.append(name)
            out.bytes_after += _bytes(p)
            continue
        convert = to_csr if format == "csr" else to_semi_structured
        sparse = convert(data, name)
        replace.append((owner, attr, sparse))
        out.converted.append(name)
        out.bytes_after += _bytes(sparse)
    for owner, attr, sparse in replace:
        setattr(owner, attr, nn.Parameter(sparse, requires_grad=False))
    return out
