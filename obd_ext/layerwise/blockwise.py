"""Layer-wise pruning (OBD, the Optimal Brain Surgeon, magnitude) one transformer block at a time.

The order of SparseGPT and Wanda: capture the inputs of the first block for
the calibration set, then for each block

1. run the calibration activations through it, accumulating ``sum_n x_nj^2``
   at the input of every linear layer (:class:`CalibrationStats`), or the
   full ``X^T X`` for the surgeon (:class:`GramStats`);
2. prune its layers by layer-wise OBD saliency ``w_ij^2 sum_n x_nj^2``, or by
   the surgeon's sweep, which also updates the kept weights
   (:func:`~obd_ext.layerwise.surgeon.obs_prune_`);
3. run the activations through the *pruned* block: they become the next
   block's inputs, so later blocks are calibrated on what they will see.

Peak memory is one block plus the calibration activations. With ``device``
set, the model stays where it is (e.g. CPU memory) and each block visits the
device in turn, so a model larger than the GPU can be pruned.

Layers outside the repeated blocks (embeddings, the output head) are left
alone, as in SparseGPT and Wanda.

:func:`forward_blockwise` runs a model the same way (block by block over all
batches) for evaluation, so perplexity is measured without the whole model on
the device.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import saliency
from ..selection import check_sparsity, prune_layers_, prune_nm_, prune_rows_, select_global
from ..vocabulary import (DEFAULT_LAYERWISE_METHOD, LAYERWISE_METHODS, LAYERWISE_SCOPES, METHODS, check_method, check_pattern_sparsity,
                          check_scope, parse_pattern)
from .stats import CalibrationStats, GramStats, is_hf_conv1d, prunable_layers, weight_rows
from .surgeon import DEFAULT_BLOCKSIZE, DEFAULT_DAMP, obs_prune_

__all__ = ["DEFAULT_SPARSITY", "resolve_sparsity", "resolve_scope", "find_blocks", "capture_block_inputs",
           "block_hidden_states", "next_block_inputs", "forward_blockwise", "prune_by_saliency_", "prune_layerwise",
           "LayerReport", "LayerwiseResult"]

DEFAULT_SPARSITY = 0.5
"""The sparsity of an unstructured pattern when none is given (an N:M pattern implies its own)."""


def resolve_sparsity(pattern: str, sparsity: Optional[float]) -> float:
    """The sparsity ``(pattern, sparsity)`` means: ``1 - N/M`` for N:M, ``sparsity`` or :data:`DEFAULT_SPARSITY`.

    Raises:
        ValueError: a malformed pattern, a sparsity outside [0, 1], or an N:M
            pattern with a sparsity other than the one it implies.
    """
    implied = check_pattern_sparsity(pattern, sparsity)
    return check_sparsity(DEFAULT_SPARSITY if implied is None else implied)


def resolve_scope(pattern: str, scope: Optional[str], layerwise: bool = True, method: Optional[str] = None) -> str:
    """The selection pool actually used: ``scope``, or the default for None.

    ``scope=None`` means :func:`obd_ext.vocabulary.default_scope` (``"row"``
    for layer-wise saliencies, ``"layer"`` for the surgeon's, ``"global"``
    for whole-network ones). An N:M
    pattern selects within rows (each group of M consecutive inputs of a row
    is a pool), as in ``obd_ext.prune_``: its scope is ``"row"``, and any
    other scope given with it is an error rather than silently ignored.
    """
    if parse_pattern(pattern) is not None:
        if scope not in (None, "row"):
            raise ValueError(f"pattern={pattern!r} selects within rows; scope must be None or 'row', got {scope!r}")
        return "row"
    return check_scope(scope, LAYERWISE_SCOPES, layerwise=layerwise, method=method)


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
    """The ``(args, kwargs)`` the first block is called with, one entry per calibration batch.

    The model runs up to the first block only (a pre-hook stops it there).

    Raises:
        ValueError: no batch reached the first block.
    """
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


def block_hidden_states(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states in a block's ``(args, kwargs)``: the first positional argument or ``hidden_states``."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> Tuple[tuple, dict]:
    if args:
        return (h,) + args[1:], kwargs
    return args, {**kwargs, "hidden_states": h}


def _output(out: Any) -> Tensor:
    # blocks return a tensor (transformers >= 5, obd_ext.models.GPT) or a tuple whose first entry it is
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def next_block_inputs(block: nn.Module, inputs: Sequence[Tuple[tuple, dict]]) -> List[Tuple[tuple, dict]]:
    """Run ``block`` on each ``(args, kwargs)`` of :func:`capture_block_inputs`; the next block's inputs.

    Each entry keeps its other arguments (attention mask, position
    embeddings, ...) and has its hidden states replaced by the block's output,
    which is how a transformer's block loop feeds one block into the next.
    """
    return [_with_hidden(a, kw, _output(block(*a, **kw))) for a, kw in inputs]


class _Replay(nn.Module):
    """Stands in for a block in the last pass of :func:`forward_blockwise`.

    Every stub passes its hidden states through, except the last, which
    returns the recorded output of the real block stack for the current batch;
    the model's own code then applies what follows the blocks (final norm,
    head).
    """

    def __init__(self, tuple_type: Optional[type]):
        super().__init__()
        self.tuple_type = tuple_type  # the real blocks returned this sequence type (None: a bare tensor)
        self.hidden: Optional[Tensor] = None  # set on the last stub only

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = self.hidden if self.hidden is not None else block_hidden_states(args, kwargs)
        return self.tuple_type((h,)) if self.tuple_type is not None else h


class _ModelOutsideBlocksOn:
    """Context manager: the parameters and buffers of ``model`` outside ``blocks`` live on ``device``.

    The embedding, final norm and head are used once per batch, so they move
    once; the blocks move one at a time. Everything goes back on exit.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], device: Optional[torch.device]):
        self.model, self.device = model, device
        self.inside = {id(m) for b in blocks for m in b.modules()}
        self.moved: List[Tuple[nn.Module, str, bool, torch.device]] = []

    def __enter__(self) -> "_ModelOutsideBlocksOn":
        if self.device is None:
            return self
        seen = set()
        for module in self.model.modules():
            if id(module) in self.inside:
                continue
            for name, p in module.named_parameters(recurse=False):
                if id(p) not in seen:  # tied weights (embedding = head) move once
                    seen.add(id(p))
                    self.moved.append((module, name, True, p.device))
                    p.data = p.data.to(self.device)
            for name, b in module.named_buffers(recurse=False):
                self.moved.append((module, name, False, b.device))
                setattr(module, name, b.to(self.device))
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, is_param, home in reversed(self.moved):
            t = getattr(module, name)
            if is_param:
                t.data = t.data.to(home)
            else:
                setattr(module, name, t.to(home))
        self.moved.clear()


@torch.no_grad()
def forward_blockwise(model: nn.Module, batches: Iterable[Any], consume: Callable[[Any, Any], None], *,
                      run: Optional[Callable[[nn.Module, Any], Any]] = None, blocks: Optional[nn.ModuleList] = None,
                      device: Optional[torch.device | str] = None, progress: bool = False,
                      desc: str = "forward") -> None:
    """Run the model on every batch one block at a time, as layer-wise pruning does, and hand each output over.

    The model's layers outside the blocks (embedding, final norm, head) move to
    ``device`` for the whole call; the blocks visit it one at a time, each over
    all batches. So the model is never on the device at once, and its peak
    there is one block plus the hidden states of all batches. Then the model
    runs once more per batch with stand-ins for the blocks that return the
    block stack's output, and ``consume(batch, output)`` receives what the
    model returns (e.g. its logits) exactly as from ``run(model, batch)``.
    In exact arithmetic (and in practice, in float64) the outputs equal the
    whole model's.

    Args:
        model: a transformer whose blocks :func:`find_blocks` finds.
        batches: the inputs, as for ``run``.
        consume: called with ``(batch, output)`` for each batch, in order.
        run: ``run(model, batch)``, one forward; default: ``model(batch)`` with
            the batch moved to ``device``.
        blocks: the model's ``nn.ModuleList`` of blocks (default:
            :func:`find_blocks`); its entries are swapped for stand-ins during
            the last pass and restored after.
        device: where to compute (default: where each part of the model is).
        progress: a tqdm bar over blocks.
        desc: the bar's label.
    """
    device = torch.device(device) if device is not None else None
    blocks = blocks if blocks is not None else find_blocks(model)[1]
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"forward_blockwise: blocks must be the model's non-empty nn.ModuleList of blocks, "
                         f"got {type(blocks).__name__}")
    run = run or (lambda m, b: m(_move(b, device)))
    batches = list(batches)
    originals = list(blocks)
    was_training = model.training
    model.eval()
    try:
        with _ModelOutsideBlocksOn(model, originals, device):
            inputs = [_move(c, device) for c in capture_block_inputs(model, originals[0], batches, run)]
            from tqdm.auto import tqdm

            tuple_type: Optional[type] = None
            for block in tqdm(originals, desc=desc, unit="block", disable=not progress):
                home = next(block.parameters()).device
                if device is not None:
                    block.to(device)
                outs = [block(*a, **kw) for a, kw in inputs]
                tuple_type = type(outs[0]) if isinstance(outs[0], (tuple, list)) else None
                inputs = [_with_hidden(a, kw, _output(o)) for (a, kw), o in zip(inputs, outs)]
                del outs
                if device is not None:
                    block.to(home)
            stubs = [_Replay(tuple_type) for _ in originals]
            try:
                for i, stub in enumerate(stubs):
                    blocks[i] = stub
                for batch, (a, kw) in zip(batches, inputs):
                    stubs[-1].hidden = block_hidden_states(a, kw)
                    consume(batch, run(model, batch))
            finally:
                for i, block in enumerate(originals):
                    blocks[i] = block
    finally:
        model.train(was_training)


@dataclass
class LayerReport:
    """What pruning did to one layer.

    Attributes:
        name: the layer's qualified name in the model (``model.named_modules()``).
        shape: the weight as ``[outputs, inputs]``.
        deleted: entries set to zero.
        total: entries of the weight.
        predicted_increase: sum of the deleted saliencies (layer-wise: the
            predicted reconstruction error of the layer's output).
    """

    name: str
    shape: List[int]
    deleted: int
    total: int
    predicted_increase: float


@dataclass
class LayerwiseResult:
    """What :func:`prune_layerwise` did, per layer, with totals.

    ``scope`` is the pool actually used ("row" for an N:M pattern, which
    selects within rows) and ``sparsity_target`` the sparsity actually asked
    of each pool.
    """

    pattern: str
    scope: str
    method: str
    sparsity_target: float
    layers: List[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration_rows: int = 0

    @property
    def sparsity(self) -> float:
        """Deleted entries over all entries of the pruned layers."""
        total = sum(r.total for r in self.layers)
        return sum(r.deleted for r in self.layers) / total if total else 0.0

    def to_dict(self) -> Dict[str, Any]:
        """The result as plain JSON-ready values, with the achieved ``sparsity``."""
        return {**asdict(self), "sparsity": self.sparsity}

    def __repr__(self) -> str:
        # A summary: the per-layer reports of a large model would print pages (they are in .layers / to_dict()).
        return (f"LayerwiseResult(method={self.method!r}, pattern={self.pattern!r}, scope={self.scope!r}, "
                f"sparsity_target={self.sparsity_target:g}, sparsity={self.sparsity:.4g}, "
                f"layers={len(self.layers)}, calibration_rows={self.calibration_rows}, seconds={self.seconds:.3g})")


def prune_by_saliency_(layers: Dict[str, nn.Module], curvatures: Optional[Dict[str, Tensor]],
                       sparsity: Optional[float] = None, pattern: str = "unstructured",
                       scope: Optional[str] = None) -> List[LayerReport]:
    """Prune the given layers in place by saliency ``h w^2 / 2`` on their ``[outputs, inputs]`` weights.

    Args:
        layers: name -> Linear / HF Conv1D / Conv layer.
        curvatures: name -> ``[outputs, inputs]`` curvature (layer-wise
            ``2 sum x^2`` or whole-network); None for magnitude (``h = 1``).
        sparsity: fraction deleted from each pool; None means
            :data:`DEFAULT_SPARSITY` (unstructured) or ``1 - N/M`` (N:M, which
            allows no other value).
        pattern: "N:M" keeps N of every M consecutive inputs of each row; or
            "unstructured".
        scope: "row" (each output row its own pool: Wanda's rule; the default),
            "layer", or "global" (one pool over all the given layers); None or
            "row" for an N:M pattern (which selects within rows).
    """
    sparsity = resolve_sparsity(pattern, sparsity)
    scope = resolve_scope(pattern, scope)
    return _prune_by_saliency(layers, curvatures, sparsity, pattern, scope)


def _prune_by_saliency(layers: Dict[str, nn.Module], curvatures: Optional[Dict[str, Tensor]], sparsity: float,
                       pattern: str, scope: Optional[str]) -> List[LayerReport]:
    """:func:`prune_by_saliency_` on arguments already checked."""
    nm = parse_pattern(pattern)
    names = list(layers)
    weights = [weight_rows(layers[n]) for n in names]
    if curvatures is None:
        curvatures = {n: torch.ones((), dtype=torch.float32, device=w.device).expand(w.shape)
                      for n, w in zip(names, weights)}
    curvs = [curvatures[n] for n in names]
    with torch.no_grad():
        if nm is not None:
            sels = [prune_nm_(w, h, pattern, name=n) for n, w, h in zip(names, weights, curvs)]
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


def _input_stages(block: nn.Module, layers: Dict[str, nn.Module], inputs) -> List[List[str]]:
    """The block's layers in the order the first calibration batch reaches them, those fed one tensor together."""
    stages: List[List[str]] = []
    seen: set = set()
    last: List[Any] = [None]

    def hook(name: str, x: Tensor) -> None:
        if name not in seen:
            seen.add(name)
            if last[0] is x and stages:
                stages[-1].append(name)
            else:
                stages.append([name])
        last[0] = x

    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: hook(name, args[0]))
               for name, m in layers.items()]
    try:
        args, kwargs = inputs[0]
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in seen]
    if missing:
        raise RuntimeError(f"no calibration inputs reached layer(s) {missing} of the block")
    return stages


def _collect(kind: str, block: nn.Module, layers: Dict[str, nn.Module], inputs, process_group):
    """The statistics ``kind`` ("diagonal" or "gram") of ``layers`` over every calibration input of ``block``."""
    # float64 models are calibrated (and pruned) in float64, all others in float32
    acc = torch.float64 if any(m.weight.dtype == torch.float64 for m in layers.values()) else torch.float32
    stats = GramStats(layers, acc) if kind == "gram" else CalibrationStats(layers, acc)
    with stats:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    if process_group is not None:  # data-parallel calibration: every rank sees the sums of all ranks
        from ..distributed import all_reduce_tensors

        all_reduce_tensors(stats.tensors(), op="sum", group=None if process_group is True else process_group)
    return stats


def _prune_with(stats, layers: Dict[str, nn.Module], sparsity: float, pattern: str, scope: str, method: str,
                blocksize: int, damp: float) -> List[LayerReport]:
    if METHODS[method].statistics == "diagonal":
        curvatures = {n: stats.curvature(n).contiguous() for n in layers}
        return _prune_by_saliency(layers, curvatures, sparsity, pattern, scope)
    for n in layers:
        stats.gram(n)  # every layer reached, every matrix finite: checked before any layer changes
    reports: Dict[str, LayerReport] = {}
    for lead, names in stats.shared().items():
        weights = [weight_rows(layers[n]) for n in names]
        # Layers sharing X^T X (q/k/v, gate/up) are swept as one matrix of stacked rows: one factorisation and
        # one sweep instead of several, with the same result, since rows are independent for "row" and N:M.
        # "layer" chooses over each layer's own rows, so those layers are swept one by one.
        together = scope == "row" and len(names) > 1 and len({(w.dtype, w.device) for w in weights}) == 1
        groups = [list(zip(names, weights))] if together else [[(n, w)] for n, w in zip(names, weights)]
        for group in groups:
            stacked = torch.cat([w for _, w in group]) if len(group) > 1 else group[0][1]
            r = obs_prune_(stacked, stats.gram(lead), sparsity=sparsity, pattern=pattern, scope=scope,
                           blocksize=blocksize, damp=damp, name="+".join(n for n, _ in group),
                           dtype=torch.float64 if stacked.dtype == torch.float64 else torch.float32)
            start = 0
            for n, w in group:
                rows = slice(start, start + w.shape[0])
                if len(group) > 1:
                    w.copy_(stacked[rows])
                reports[n] = LayerReport(n, list(w.shape), int((~r.mask[rows]).sum()), w.numel(),
                                         float(r.row_increase[rows].sum()))
                start += w.shape[0]
    return [reports[n] for n in layers]


@torch.no_grad()
def _prune_block(block: nn.Module, inputs, sparsity: float, pattern: str, scope: Optional[str], method: str,
                 skip: Iterable[str], process_group, blocksize: int = DEFAULT_BLOCKSIZE, damp: float = DEFAULT_DAMP,
                 sequential: bool = False) -> Tuple[Dict[str, nn.Module], List[LayerReport], int]:
    """Statistics over the calibration inputs, then pruning, of one block; returns layers, reports, rows seen.

    With ``sequential``, the layers fed one tensor are pruned together, stage
    after stage in the order the block calls them, each stage's statistics
    collected with the stages before it already pruned (one forward of the
    calibration data per stage).
    """
    layers = prunable_layers(block, skip)
    kind = METHODS[method].statistics
    if kind is None:
        return layers, _prune_by_saliency(layers, None, sparsity, pattern, scope), 0
    stages = _input_stages(block, layers, inputs) if sequential else [list(layers)]
    by_name: Dict[str, LayerReport] = {}
    rows = 0
    for stage in stages:
        part = {n: layers[n] for n in stage}
        stats = _collect(kind, block, part, inputs, process_group)
        rows = max(rows, max(stats.rows.values(), default=0))
        by_name.update((r.name, r) for r in _prune_with(stats, part, sparsity, pattern, scope, method, blocksize,
                                                        damp))
    return layers, [by_name[n] for n in layers], rows


def _check_surgeon_options(method: str, scope: str, pattern: str, blocksize: Optional[int], damp: Optional[float],
                           where: str) -> Tuple[int, float]:
    """(blocksize, damp) for ``method``, defaults filled in; ValueError for an option the method does not use."""
    if method != "layerwise-obs":
        for opt, value in (("blocksize", blocksize), ("damp", damp)):
            if value is not None:
                raise ValueError(f"{where}: {opt}={value!r} applies to method='layerwise-obs' only, "
                                 f"not method={method!r}")
        return DEFAULT_BLOCKSIZE, DEFAULT_DAMP
    if scope == "global":
        raise ValueError(f"{where}: method='layerwise-obs' selects per 'row' or per 'layer', not scope='global'")
    blocksize = DEFAULT_BLOCKSIZE if blocksize is None else blocksize
    damp = DEFAULT_DAMP if damp is None else damp
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{where}: blocksize must be an integer >= 1, got {blocksize!r}")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0 <= damp < float("inf"):
        raise ValueError(f"{where}: damp must be a finite number >= 0, got {damp!r}")
    nm = parse_pattern(pattern)
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"{where}: pattern={pattern!r} needs blocksize to be a multiple of {nm[1]}, got {blocksize}")
    return blocksize, float(damp)


def prune_layerwise(model: nn.Module, calibration: Iterable[Any], *, sparsity: Optional[float] = None,
                    pattern: str = "unstructured", scope: Optional[str] = None,
                    method: str = DEFAULT_LAYERWISE_METHOD, run: Optional[Callable[[nn.Module, Any], Any]] = None, blocks: Optional[Sequence[nn.Module]] = None,
                    device: Optional[torch.device | str] = None, skip: Iterable[str] = (),
                    process_group: Any = None, progress: bool = True, blocksize: Optional[int] = None,
                    damp: Optional[float] = None, sequential: bool = False) -> LayerwiseResult:
    """Prune ``model`` in place layer by layer from calibration data, block by block.

    Args:
        model: a transformer (Llama, GPT-2, obd_ext.models.GPT, or any model
            whose repeated blocks :func:`find_blocks` finds or ``blocks`` gives).
        calibration: batches (e.g. ``[n, seq]`` token-id tensors) for ``run``;
            not used (not even iterated) by ``method="magnitude"``.
        sparsity: fraction deleted in every pool, in [0, 1]; None means
            :data:`DEFAULT_SPARSITY` for an unstructured pattern and
            ``1 - N/M`` for an N:M one (any other value with N:M is an error).
        pattern: "unstructured", "2:4", "4:8" or any "N:M".
        scope: the pool the lowest saliencies are taken from: "row" (Wanda's;
            None means it for layerwise-obd and magnitude), "layer" (None
            means it for layerwise-obs), or "global" (one pool over
            each block's layers: a later block's statistics depend on the
            pruning of earlier ones, so a pool over the whole model is what the
            whole-network curvature of obd_ext.layerwise.hf gives). None or
            "row" for an N:M pattern (which selects within rows).
            ``"layerwise-obs"`` takes "row" or "layer" (SparseGPT's adaptive
            per-block mask), not "global".
        method: "layerwise-obs" (the default,
            ``obd_ext.vocabulary.DEFAULT_LAYERWISE_METHOD``: the Optimal Brain
            Surgeon with the full reconstruction Hessian ``2 X^T X``, the kept
            weights are updated; SparseGPT's algorithm,
            :func:`obd_ext.layerwise.surgeon.obs_prune_`), "layerwise-obd"
            (each layer's reconstruction Hessian diagonal: Wanda's masks for
            scope "row"; no update, one forward per block) or "magnitude"
            (``|w|``, for comparison; no calibration pass); see
            ``obd_ext.vocabulary.METHODS``.
        run: ``run(model, batch)`` does one forward; default ``model(batch)``.
        blocks: the blocks, in order (default: :func:`find_blocks`).
        device: process each block there (the model stays where it is).
        skip: layer names within a block to leave dense (e.g. ``["attn.c_proj"]``).
        process_group: with torch.distributed, each rank passes its own share
            of the calibration data and the statistics are all-reduced (summed)
            before every block is pruned, so all ranks prune identically;
            ``True`` for the default group.
        progress: a tqdm bar over blocks.
        blocksize: "layerwise-obs" only: columns per lazy-update block, and
            the column block over which deletions are chosen (default 128; a
            multiple of M for N:M).
        damp: "layerwise-obs" only: the damping added to ``H``'s diagonal as
            a fraction of its mean (default 0.01).
        sequential: the layers of a block fed by one tensor (q/k/v, gate/up,
            ...) are pruned stage by stage in the order the block calls them,
            each stage's statistics taken with the earlier stages already
            pruned (SparseGPT's "true sequential"; one calibration forward per
            stage). Default False: one forward per block, every layer's
            statistics from the block as it was before any of its layers was
            pruned (SparseGPT's and llm-compressor's default). Ignored by
            "magnitude".

    Returns:
        A :class:`LayerwiseResult` whose layers carry the model's own qualified
        names (``model.layers.0.self_attn.q_proj``). ``predicted_increase`` is
        each layer's predicted reconstruction error: the sum of the deleted
        saliencies (for the surgeon, its damped objective after the updates).
    """
    method = check_method(method, LAYERWISE_METHODS, "prune_layerwise")
    sparsity = resolve_sparsity(pattern, sparsity)
    scope = resolve_scope(pattern, scope, method=method)
    blocksize, damp = _check_surgeon_options(method, scope, pattern, blocksize, damp, "prune_layerwise")
    if not isinstance(sequential, bool):
        raise ValueError(f"prune_layerwise: sequential must be True or False, got {sequential!r}")
    t0 = time.time()
    run = run or (lambda m, b: m(b))
    blocks = list(blocks) if blocks is not None else list(find_blocks(model)[1])
    if method == "layerwise-obs":  # checked for every block before any is pruned
        nm = parse_pattern(pattern)
        for bi, block in enumerate(blocks):
            for n, m in prunable_layers(block, skip).items():
                if not (isinstance(m, nn.Linear) or is_hf_conv1d(m)):
                    raise ValueError(f"prune_layerwise: method='layerwise-obs' prunes nn.Linear and transformers' "
                                     f"Conv1D layers; block {bi} layer {n!r} is a {type(m).__name__} (pass it in "
                                     "skip=)")
                cols = weight_rows(m).shape[1]
                if nm is not None and cols % nm[1]:
                    raise ValueError(f"prune_layerwise: pattern {pattern!r} needs the number of inputs to be a "
                                     f"multiple of {nm[1]}; block {bi} layer {n!r} has {cols}")
    device = torch.device(device) if device is not None else None
    qualified = {id(m): n for n, m in model.named_modules()}
    result = LayerwiseResult(pattern, scope, method, sparsity)
    calibrated = METHODS[method].statistics is not None
    was_training = model.training
    model.eval()  # calibration sees the model as it will run: no dropout
    try:
        inputs = ([_move(c, device) for c in capture_block_inputs(model, blocks[0], calibration, run)]
                  if calibrated else [])
        from tqdm.auto import tqdm

        for bi, block in enumerate(tqdm(blocks, desc=method, unit="block", disable=not progress)):
            home = next(block.parameters()).device
            if device is not None:
                block.to(device)
            layers, reports, rows = _prune_block(block, inputs, sparsity, pattern, scope, method, skip,
                                                 process_group, blocksize, damp, sequential)
            result.calibration_rows = max(result.calibration_rows, rows)
            result.layers += [LayerReport(qualified.get(id(layers[r.name]), f"{bi}.{r.name}"), r.shape, r.deleted,
                                          r.total, r.predicted_increase) for r in reports]
            if calibrated and bi + 1 < len(blocks):  # the pruned block's outputs feed the next block
                inputs = next_block_inputs(block, inputs)
            if device is not None:
                block.to(home)
    finally:
        model.train(was_training)
    result.seconds = time.time() - t0
    return result
