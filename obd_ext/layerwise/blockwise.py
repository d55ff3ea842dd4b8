"""Layer-wise OBD one transformer block at a time.

The order of SparseGPT and Wanda: capture the inputs of the first block for
the calibration set, then for each block

1. run the calibration activations through it, accumulating ``sum_n x_nj^2``
   at the input of every linear layer (:class:`CalibrationStats`);
2. prune its layers by layer-wise OBD saliency ``w_ij^2 sum_n x_nj^2``;
3. run the activations through the *pruned* block: they become the next
   block's inputs, so later blocks are calibrated on what they will see.

Peak memory is one block plus the calibration activations. With ``device``
set, the model stays where it is (e.g. CPU memory) and each block visits the
device in turn, so a model larger than the GPU can be pruned.

Layers outside the repeated blocks (embeddings, the output head) are left
alone, as in SparseGPT and Wanda.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import saliency
from ..selection import check_sparsity, prune_layers_, prune_nm_, prune_rows_, select_global
from .stats import CalibrationStats, prunable_layers, weight_rows

__all__ = ["LAYERWISE_SCOPES", "LAYERWISE_CRITERIA", "parse_pattern", "find_blocks", "capture_block_inputs",
           "prune_by_saliency_", "prune_layerwise", "LayerwiseResult"]

LAYERWISE_SCOPES = ("row", "layer", "global")
LAYERWISE_CRITERIA = ("obd", "magnitude")


def parse_pattern(pattern: str) -> Optional[Tuple[int, int]]:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4) (N kept of every M consecutive inputs)."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except (ValueError, AttributeError):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4' or '4:8', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's repeated blocks: its longest ``nn.ModuleList`` of modules of one class.

    That is ``model.layers`` of Llama, ``transformer.h`` of GPT-2 and ``blocks``
    of obd_ext.models.GPT, found without a table of architectures.
    """
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks; pass blocks= explicitly")
    return best


class _Captured(Exception):
    """Raised by the capture hook to stop the forward at the first block."""


def _move(obj: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable[Any],
                         run: Callable[[nn.Module, Any], Any]) -> List[Tuple[tuple, dict]]:
    """The ``(args, kwargs)`` the first block is called with, one entry per calibration batch."""
    captured: List[Tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run(model, batch)
                except _Captured:
                    pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("calibration: no batch reached the first block (is the calibration data empty?)")
    return captured


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> Tuple[tuple, dict]:
    if args:
        return (h,) + args[1:], kwargs
    return args, {**kwargs, "hidden_states": h}


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerReport:
    name: str
    shape: List[int]
    deleted: int
    total: int
    predicted_increase: float  # sum of deleted layer-wise saliencies: the predicted reconstruction error


@dataclass
class LayerwiseResult:
    """What :func:`prune_layerwise` did, per layer, with totals."""

    pattern: str
    scope: str
    criterion: str
    sparsity_target: float
    layers: List[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration_rows: int = 0

    @property
    def sparsity(self) -> float:
        total = sum(r.total for r in self.layers)
        return sum(r.deleted for r in self.layers) / total if total else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "sparsity": self.sparsity}


def prune_by_saliency_(layers: Dict[str, nn.Module], curvatures: Optional[Dict[str, Tensor]], sparsity: float,
                       pattern: str = "unstructured", scope: str = "row") -> List[LayerReport]:
    """Prune the given layers in place by saliency ``h w^2 / 2`` on their ``[outputs, inputs]`` weights.

    Args:
        layers: name -> Linear / HF Conv1D / Conv layer.
        curvatures: name -> ``[outputs, inputs]`` curvature (layer-wise
            ``2 sum x^2`` or whole-network); None for magnitude (``h = 1``).
        pattern: "N:M" keeps N of every M consecutive inputs of each row
            (``sparsity`` and ``scope`` are then unused); or "unstructured".
        scope: "row" (each output row its own pool: Wanda's rule), "layer",
            or "global" (one pool over all the given layers).
    """
    nm = parse_pattern(pattern)
    if scope not in LAYERWISE_SCOPES:
        raise ValueError(f"scope must be one of {LAYERWISE_SCOPES}, got {scope!r}")
    names = list(layers)
    weights = [weight_rows(layers[n]) for n in names]
    if curvatures is None:
        curvatures = {n: torch.ones((), dtype=torch.float32, device=w.device).expand(w.shape)
                      for n, w in zip(names, weights)}
    curvs = [curvatures[n] for n in names]
    with torch.no_grad():
        if nm is not None:
            sels = [prune_nm_(w, h, n=nm[0], m=nm[1], name=n) for n, w, h in zip(names, weights, curvs)]
        elif scope == "row":
            sels = [prune_rows_(w, h, sparsity=sparsity, name=n) for n, w, h in zip(names, weights, curvs)]
        elif scope == "layer":
            sels = [prune_layers_([w], [h], sparsity=sparsity, names=[n]) for n, w, h in zip(names, weights, curvs)]
        else:  # one pool: select first, so that each layer's share of the predicted increase can be reported
            masks = select_global(weights, curvs, sparsity=sparsity, names=names).masks
            reports = [LayerReport(n, list(w.shape), int((~m).sum()), m.numel(),
                                   float(saliency(w, h)[~m].double().sum()))
                       for n, w, h, m in zip(names, weights, curvs, masks)]
            for w, m in zip(weights, masks):
                w.masked_fill_(~m, 0)
            return reports
    return [LayerReport(n, list(w.shape), int((~s.masks[0]).sum()), w.numel(), s.predicted_increase)
            for n, w, s in zip(names, weights, sels)]


@torch.no_grad()
def _prune_block(block: nn.Module, inputs, sparsity: float, pattern: str, scope: str, criterion: str,
                 skip: Iterable[str], process_group) -> Tuple[List[LayerReport], int]:
    """Statistics over the calibration inputs, then pruning, of one block; returns reports and rows seen."""
    layers = prunable_layers(block, skip)
    if criterion == "magnitude":
        return prune_by_saliency_(layers, None, sparsity, pattern, scope), 0
    with CalibrationStats(layers) as stats:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    if process_group is not None:  # data-parallel calibration: every rank sees the sums of all ranks
        from ..distributed import all_reduce_tensors

        all_reduce_tensors(stats.tensors(), op="sum", group=None if process_group is True else process_group)
    curvatures = {n: stats.curvature(n).contiguous() for n in layers}
    return prune_by_saliency_(layers, curvatures, sparsity, pattern, scope), max(stats.rows.values(), default=0)


def prune_layerwise(model: nn.Module, calibration: Iterable[Any], *, sparsity: float = 0.5,
                    pattern: str = "unstructured", scope: str = "row", criterion: str = "obd",
                    run: Optional[Callable[[nn.Module, Any], Any]] = None, blocks: Optional[Sequence[nn.Module]] = None,
                    device: Optional[torch.device | str] = None, skip: Iterable[str] = (),
                    process_group: Any = None, progress: bool = True) -> LayerwiseResult:
    """Prune ``model`` in place by layer-wise OBD, block by block.

    Args:
        model: a transformer (Llama, GPT-2, obd_ext.models.GPT, or any model
            whose repeated blocks :func:`find_blocks` finds or ``blocks`` gives).
        calibration: batches (e.g. ``[n, seq]`` token-id tensors) for ``run``.
        sparsity: fraction deleted in every pool, in [0, 1] (ignored for N:M).
        pattern: "unstructured", "2:4", "4:8" or any "N:M".
        scope: "row" (default; Wanda's), "layer", or "global" (one pool over
            each block's layers: a later block's statistics depend on the
            pruning of earlier ones, so a pool over the whole model is what the
            whole-network curvature of obd_ext.layerwise.hf gives).
        criterion: "obd" (layer-wise saliency) or "magnitude" (for comparison).
        run: ``run(model, batch)`` does one forward; default ``model(batch)``.
        blocks: the blocks, in order (default: :func:`find_blocks`).
        device: process each block there (the model stays where it is).
        skip: layer names within a block to leave dense (e.g. ``["attn.c_proj"]``).
        process_group: with torch.distributed, each rank passes its own share
            of the calibration data and the statistics are all-reduced (summed)
            before every block is pruned, so all ranks prune identically;
            ``True`` for the default group.
        progress: a tqdm bar over blocks.
    """
    check_sparsity(sparsity)
    parse_pattern(pattern)
    if scope not in LAYERWISE_SCOPES:
        raise ValueError(f"scope must be one of {LAYERWISE_SCOPES}, got {scope!r}")
    if criterion not in LAYERWISE_CRITERIA:
        raise ValueError(f"criterion must be one of {LAYERWISE_CRITERIA}, got {criterion!r}")
    t0 = time.time()
    run = run or (lambda m, b: m(b))
    blocks = list(blocks) if blocks is not None else list(find_blocks(model)[1])
    device = torch.device(device) if device is not None else None
    result = LayerwiseResult(pattern, scope, criterion, sparsity)
    was_training = model.training
    model.eval()  # calibration sees the model as it will run: no dropout
    try:
        inputs = [_move(c, device) for c in capture_block_inputs(model, blocks[0], calibration, run)]
        from tqdm.auto import tqdm

        for bi, block in enumerate(tqdm(blocks, desc="layer-wise OBD", unit="block", disable=not progress)):
            home = next(block.parameters()).device
            if device is not None:
                block.to(device)
            reports, rows = _prune_block(block, inputs, sparsity, pattern, scope, criterion, skip, process_group)
            result.calibration_rows = max(result.calibration_rows, rows)
            result.layers += [LayerReport(f"{bi}.{r.name}", r.shape, r.deleted, r.total, r.predicted_increase)
                              for r in reports]
            if bi + 1 < len(blocks):  # the pruned block's outputs feed the next block
                with torch.no_grad():
                    inputs = [_with_hidden(a, kw, _output(block(*a, **kw))) for a, kw in inputs]
            if device is not None:
                block.to(home)
    finally:
        model.train(was_training)
    result.seconds = time.time() - t0
    return result
