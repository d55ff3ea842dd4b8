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

:func:`forward_blockwise` runs a model the same way (block by block over all
batches) for evaluation, so perplexity is measured without the whole model on
the device.
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
from ..vocabulary import (LAYERWISE_METHODS, LAYERWISE_SCOPES, check_method, check_pattern_sparsity, check_scope,
                          parse_pattern)
from .stats import CalibrationStats, prunable_layers, weight_rows

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


def resolve_scope(pattern: str, scope: Optional[str], layerwise: bool = True) -> str:
    """The selection pool actually used: ``scope``, or the default for None.

    ``scope=None`` means :func:`obd_ext.vocabulary.default_scope` (``"row"``
    for layer-wise saliencies, ``"global"`` for whole-network ones). An N:M
    pattern selects within rows (each group of M consecutive inputs of a row
    is a pool), as in ``obd_ext.prune_``: its scope is ``"row"``, and any
    other scope given with it is an error rather than silently ignored.
    """
    if parse_pattern(pattern) is not None:
        if scope not in (None, "row"):
            raise ValueError(f"pattern={pattern!r} selects within rows; scope must be None or 'row', got {scope!r}")
        return "row"
    return check_scope(scope, LAYERWISE_SCOPES, layerwise=layerwise)


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


@torch.no_grad()
def _prune_block(block: nn.Module, inputs, sparsity: float, pattern: str, scope: Optional[str], method: str,
                 skip: Iterable[str], process_group) -> Tuple[Dict[str, nn.Module], List[LayerReport], int]:
    """Statistics over the calibration inputs, then pruning, of one block; returns layers, reports, rows seen."""
    layers = prunable_layers(block, skip)
    if method == "magnitude":
        return layers, _prune_by_saliency(layers, None, sparsity, pattern, scope), 0
    with CalibrationStats(layers) as stats:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    if process_group is not None:  # data-parallel calibration: every rank sees the sums of all ranks
        from ..distributed import all_reduce_tensors

        all_reduce_tensors(stats.tensors(), op="sum", group=None if process_group is True else process_group)
    curvatures = {n: stats.curvature(n).contiguous() for n in layers}
    return (layers, _prune_by_saliency(layers, curvatures, sparsity, pattern, scope),
            max(stats.rows.values(), default=0))


def prune_layerwise(model: nn.Module, calibration: Iterable[Any], *, sparsity: Optional[float] = None,
                    pattern: str = "unstructured", scope: Optional[str] = None, method: str = "layerwise-obd",
                    run: Optional[Callable[[nn.Module, Any], Any]] = None, blocks: Optional[Sequence[nn.Module]] = None,
                    device: Optional[torch.device | str] = None, skip: Iterable[str] = (),
                    process_group: Any = None, progress: bool = True) -> LayerwiseResult:
    """Prune ``model`` in place by layer-wise OBD, block by block.

    Args:
        model: a transformer (Llama, GPT-2, obd_ext.models.GPT, or any model
            whose repeated blocks :func:`find_blocks` finds or ``blocks`` gives).
        calibration: batches (e.g. ``[n, seq]`` token-id tensors) for ``run``.
        sparsity: fraction deleted in every pool, in [0, 1]; None means
            :data:`DEFAULT_SPARSITY` for an unstructured pattern and
            ``1 - N/M`` for an N:M one (any other value with N:M is an error).
        pattern: "unstructured", "2:4", "4:8" or any "N:M".
        scope: the pool the lowest saliencies are taken from: "row" (the
            default for None; Wanda's), "layer", or "global" (one pool over
            each block's layers: a later block's statistics depend on the
            pruning of earlier ones, so a pool over the whole model is what the
            whole-network curvature of obd_ext.layerwise.hf gives). None or
            "row" for an N:M pattern (which selects within rows).
        method: "layerwise-obd" (each layer's reconstruction Hessian diagonal:
            Wanda's masks for scope "row") or "magnitude" (``|w|``, for
            comparison); see ``obd_ext.vocabulary.METHODS``.
        run: ``run(model, batch)`` does one forward; default ``model(batch)``.
        blocks: the blocks, in order (default: :func:`find_blocks`).
        device: process each block there (the model stays where it is).
        skip: layer names within a block to leave dense (e.g. ``["attn.c_proj"]``).
        process_group: with torch.distributed, each rank passes its own share
            of the calibration data and the statistics are all-reduced (summed)
            before every block is pruned, so all ranks prune identically;
            ``True`` for the default group.
        progress: a tqdm bar over blocks.

    Returns:
        A :class:`LayerwiseResult` whose layers carry the model's own qualified
        names (``model.layers.0.self_attn.q_proj``).
    """
    method = check_method(method, LAYERWISE_METHODS, "prune_layerwise")
    sparsity = resolve_sparsity(pattern, sparsity)
    scope = resolve_scope(pattern, scope)
    t0 = time.time()
    run = run or (lambda m, b: m(b))
    blocks = list(blocks) if blocks is not None else list(find_blocks(model)[1])
    device = torch.device(device) if device is not None else None
    qualified = {id(m): n for n, m in model.named_modules()}
    result = LayerwiseResult(pattern, scope, method, sparsity)
    was_training = model.training
    model.eval()  # calibration sees the model as it will run: no dropout
    try:
        inputs = [_move(c, device) for c in capture_block_inputs(model, blocks[0], calibration, run)]
        from tqdm.auto import tqdm

        for bi, block in enumerate(tqdm(blocks, desc="layer-wise OBD", unit="block", disable=not progress)):
            home = next(block.parameters()).device
            if device is not None:
                block.to(device)
            layers, reports, rows = _prune_block(block, inputs, sparsity, pattern, scope, method, skip,
                                                 process_group)
            result.calibration_rows = max(result.calibration_rows, rows)
            result.layers += [LayerReport(qualified.get(id(layers[r.name]), f"{bi}.{r.name}"), r.shape, r.deleted,
                                          r.total, r.predicted_increase) for r in reports]
            if bi + 1 < len(blocks):  # the pruned block's outputs feed the next block
                inputs = next_block_inputs(block, inputs)
            if device is not None:
                block.to(home)
    finally:
        model.train(was_training)
    result.seconds = time.time() - t0
    return result
