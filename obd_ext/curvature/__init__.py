"""Per-parameter curvature for OBD saliency.

``hessian_diag(model, loss_fn, data, method)`` returns one tensor per parameter:

- ``obd``: the paper's back-propagated diagonal (eq. 7, with f'' terms); can be
  negative away from a minimum (``Curvature.negative`` counts them);
- ``lm``: Levenberg-Marquardt / Gauss-Newton (the model's f'' dropped, the loss's
  kept; never negative under a loss convex in the model output);
- ``fisher``, ``ggn-mc``, ``hutchinson``, ``exact``: see estimators.py.

``CurvatureAccumulator`` is the same sweep driven from the user's own training
loop. The sweep walks the autograd graph (sweep.py, rules.py), so models need
not be ``nn.Sequential``; a node without a rule is a clear error naming the
user's modules that made it.

Where ``obd`` / ``lm`` are exact (the Hessian's / Gauss-Newton diagonal, to
rounding; each case is tested against autograd in float64):

- the last layer's weights and biases under any loss of per-sample terms whose
  ops have rules (MSE, BCE-with-logits with ``pos_weight``, cross-entropy with
  weights / label smoothing / probabilities, NLL after ``log_softmax``, Huber,
  SmoothL1, KLDiv, a regulariser term, a loss of your own: the sweep goes
  through the loss's own ops, losses.py), and under MSE also the layer before
  the last; ``lm`` there is the Gauss-Newton diagonal ``J^T H_loss J`` with the
  model ending at the loss's input;
- every elementwise region (regions.py): a tensor entering an elementwise
  expression more than once (``u * u``, ``x * sigmoid(x)``, Mish, GPT-2's
  ``gelu_new`` written out) is swept as one function with its true f' and f'',
  so per-feature scales and biases under an elementwise loss are exact;
- linear maps with one weight per entry: average pools of every kind (each
  window's own divisor: padding, ``ceil_mode``, ``count_include_pad``,
  ``divisor_override``, uneven adaptive windows), views, sums, means,
  interpolation (squared separable weights), index maps (gather,
  index_select, pixel shuffle, nearest upsampling, where);
- each norm's own rule, per row of normalised entries: LayerNorm, GroupNorm,
  BatchNorm with batch statistics, InstanceNorm, and RMS norms written out
  (``x * rsqrt(mean(x^2) + eps)``: recognised as one unit, patterns.py).

Where the diagonal approximation drops cross terms (as the paper does): between
units of one layer below the last (through a weight matrix, a convolution,
attention, softmax, between the rows of a norm), along paths that leave the
elementwise ops and rejoin (residual blocks, gates ``x * sigmoid(W x)``, an
LSTM's gates), and between entries of one shared or broadcast parameter. ``fisher`` is the empirical Fisher exactly (equal to a per-sample
loop); ``exact`` is autograd's diagonal.

A block under ``torch.utils.checkpoint(..., use_reentrant=True)`` is a clear
error for every method (use ``use_reentrant=False``, which all support).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..block_cache import cpu_block_cache
from ..vocabulary import CURVATURE_METHODS, check_method
from .estimators import exact, hutchinson, per_sample_squared
from .graph import check_graph, checkpoint_guard
from .naming import name_modules
from .losses import Boundary, boundary_for, loss_sweep_seed, model_end, output_tensors
from .rules import UnsupportedOpError
from .sweep import sweep

__all__ = ["METHODS", "Curvature", "hessian_diag", "CurvatureAccumulator", "UnsupportedOpError", "recordable"]

# The methods hessian_diag accepts: the project's one list (vocabulary.py).
METHODS = CURVATURE_METHODS


@contextlib.contextmanager
def recordable(model: Optional[nn.Module] = None) -> Iterator[None]:
    """Context for forward passes the sweep will walk.

    ``F.scaled_dot_product_attention`` normally runs fused kernels whose
    backward is one opaque node; under the math backend it is recorded as
    matmuls, a scale and a softmax, which have rules. Given a ``model`` with
    recurrent layers (nn.LSTM, nn.GRU, nn.RNN), those run as their cell ops
    instead of oneDNN / cuDNN kernels (recording.py). Use it around your own
    forward when feeding a CurvatureAccumulator; hessian_diag uses it itself.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .recording import RecurrentAsCellOps, has_recurrent

    with sdpa_kernel(SDPBackend.MATH):
        if model is not None and has_recurrent(model):
            with RecurrentAsCellOps():
                yield
        else:
            yield


class Curvature(dict):
    """name -> curvature tensor, with how it was obtained.

    Attributes:
        method: the estimator.
        reduction: "mean" (averaged over batches) or "sum".
        batches: number of batches seen.
        negative: name -> number of negative entries (only ``obd``,
            ``hutchinson``, ``exact``, and ``lm`` under a loss not convex in the
            model output can have any).
    """

    def __init__(self, values: Dict[str, Tensor], method: str, reduction: str, batches: int):
        super().__init__(values)
        self.method = method
        self.reduction = reduction
        self.batches = batches
        self.negative = {k: int((v < 0).sum()) for k, v in values.items()}

    @property
    def total_negative(self) -> int:
        """Negative entries over all tensors."""
        return sum(self.negative.values())

    def __repr__(self) -> str:
        # A summary, never the values: a model's worth of numbers is no use in a log.
        entries = sum(v.numel() for v in self.values())
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in self.values()})
        return (f"Curvature(method={self.method!r}, tensors={len(self)}, entries={entries}, "
                f"dtype={'/'.join(dtypes) or None}, reduction={self.reduction!r}, batches={self.batches}, "
                f"negative={self.total_negative})")


def _check_method(method: str) -> str:
    return check_method(method, CURVATURE_METHODS, "obd_ext.hessian_diag")


def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction


def _selected(model: nn.Module, params) -> Dict[str, Tensor]:
    """The parameters to compute: given names / tensors, or every one that requires grad."""
    named = dict(model.named_parameters())
    if params is None:
        return {k: v for k, v in named.items() if v.requires_grad}
    by_id = {id(v): k for k, v in named.items()}
    out = {}
    for p in params:
        if isinstance(p, str):
            if p not in named:
                raise ValueError(f"params: the model has no parameter named {p!r}")
            out[p] = named[p]
        else:
            if id(p) not in by_id:
                raise ValueError("params: a given tensor is not a parameter of the model")
            out[by_id[id(p)]] = p
    return {k: v for k, v in out.items() if v.requires_grad}


def as_batches(data) -> Iterable[Tuple[Tensor, Tensor]]:
    """Data given as one (inputs, targets) pair or as an iterable of such batches.

    A map-style ``Dataset`` (e.g. ``TensorDataset``) yields single samples
    without their batch dimension: iterating it as batches would feed the model
    a wrongly shaped input (or, worse, a sample's features as a batch), so it is
    an error that says how to batch it.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return [tuple(data)]
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError(f"data: got a {type(data).__name__}, which yields single samples; pass batches instead, "
                        f"e.g. torch.utils.data.DataLoader(data, batch_size=64), or one (inputs, targets) pair")
    if isinstance(data, Tensor):
        raise TypeError(f"data: got a single tensor of shape {tuple(data.shape)}; pass (inputs, targets) batches")
    return data


class CurvatureAccumulator:
    """Accumulate ``obd`` / ``lm`` curvature during the user's own forward passes.

    Example::

        acc = CurvatureAccumulator(model, nn.CrossEntropyLoss(), method="lm")
        for x, y in loader:
            with obd_ext.curvature.recordable(model):  # attention, recurrent layers
                out = model(x)
            loss = acc.accumulate(out, y)     # the sweep; the graph stays intact
            loss_fn(out, y).backward(); opt.step(); opt.zero_grad()
        h = acc.result()                      # averaged over the batches seen

    A block under ``torch.utils.checkpoint(..., use_reentrant=True)`` is a clear
    error (use ``use_reentrant=False``); when none of such a block's inputs requires
    grad it leaves no trace in the graph, which only ``hessian_diag`` (running the
    forward itself) can catch: PyTorch's warning "None of the inputs have
    requires_grad=True" is the sign in your own loop.

    Each ``accumulate`` reuses freed CPU blocks within its own sweep; wrap the
    loop in ``obd_ext.block_cache.cpu_block_cache()`` to reuse them from one
    batch to the next as ``hessian_diag`` does.
    """

    def __init__(self, model: nn.Module, loss_fn, method: str = "obd", params=None):
        if _check_method(method) not in ("obd", "lm"):
            raise ValueError(f"CurvatureAccumulator computes 'obd' or 'lm'; use hessian_diag for {method!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
        self.model, self.method, self.loss_fn = model, method, loss_fn
        self.boundary = boundary_for(loss_fn)  # the closed-form fast path, or None: through the loss's ops
        self.params = _selected(model, params)
        self._names = {id(v): k for k, v in self.params.items()}
        self._sum: Dict[str, Tensor] = {}
        self._owned: set = set()  # names whose running sum this accumulator allocated (safe to add into)
        self.batches = 0

    def accumulate(self, output, target) -> Tensor:
        """Run the sweep from ``output`` (with its graph); returns the loss value (detached).

        Plain MSE / cross-entropy / BCE-with-logits start at ``output`` with their
        closed forms; any other loss is computed here as ``loss_fn(output, target)``
        and the sweep starts at it, through the loss's own ops (losses.py)."""
        lm = self.method == "lm"
        if not output_tensors(output):
            raise ValueError("the model output has no autograd graph: does it depend on a parameter that requires "
                             "grad?")
        with cpu_block_cache():  # the sweep's temporaries recycle their pages
            b: Optional[Boundary] = None
            # A trailing log_softmax belongs to the loss under lm (losses.py, "Where the
            # model ends"): the closed forms would put the boundary after it. An output
            # of several tensors (a tuple, a dict) goes through the loss's ops.
            if self.boundary is not None and isinstance(output, Tensor) and not (
                    lm and type(output.grad_fn).__name__ == "LogSoftmaxBackward0"):
                b = self.boundary(output, target, need_g=not lm)
            if b is not None:
                # Only the graph is needed from here on: dropping the output and the
                # boundary tensors lets the sweep free them after the first node (with
                # hessian_diag, which keeps no reference of its own: 3 logits-sized
                # tensors, 384 MiB for the benchmark GPT at vocabulary 32k).
                root, nr, loss = output.grad_fn, output.output_nr, b.loss
                seed = [b.g, b.h_lm if lm else b.h_obd]
                end, name = None, None
                del b
            else:  # the sweep starts at the scalar loss and goes through its own ops
                full, name = loss_sweep_seed(self.loss_fn, output, target)
                root, nr, end, loss = full.grad_fn, 0, model_end(output), full.detach()
                seed = [torch.ones_like(loss), torch.zeros_like(loss)]
                del full
            del output
            with torch.no_grad():
                res = sweep(root, nr, seed, lm, self._names, model_root=end, loss_name=name)
            for k, v in res.items():
                if k not in self._sum:
                    self._sum[k] = v  # the sweep's tensor: it may be shared (e.g. two biases of one sum)
                elif k in self._owned:
                    self._sum[k].add_(v)  # no model-sized allocation per batch
                else:
                    self._sum[k] = self._sum[k] + v
                    self._owned.add(k)
        self.batches += 1
        return loss

    def result(self, reduction: str = "mean") -> Curvature:
        _check_reduction(reduction)
        scale = self._scale(reduction)
        vals = {k: self._sum.get(k, torch.zeros_like(p)) * scale for k, p in self.params.items()}
        return Curvature(vals, self.method, reduction, self.batches)

    def _scale(self, reduction: str) -> float:
        return 1.0 / max(self.batches, 1) if reduction == "mean" else 1.0

    def _take(self, reduction: str) -> Curvature:
        """result() for a caller that drops the accumulator (hessian_diag): the sums
        are handed over and scaled in place, not copied (a model-sized copy, 68 MB
        for the benchmark GPT). A sum that shares memory with another is copied, so
        no tensor is scaled twice or returned twice."""
        _check_reduction(reduction)
        scale = self._scale(reduction)
        vals: Dict[str, Tensor] = {}
        storages = set()
        for k, p in self.params.items():
            v = self._sum.pop(k, None)
            self._owned.discard(k)
            if v is None:
                v = torch.zeros_like(p)
            elif v.untyped_storage().data_ptr() in storages:
                v = v.clone()
            storages.add(v.untyped_storage().data_ptr())
            vals[k] = v.mul_(scale) if scale != 1.0 else v
        return Curvature(vals, self.method, reduction, self.batches)

    def __enter__(self) -> "CurvatureAccumulator":
        return self

    def __exit__(self, *exc) -> None:
        return None


def _named(err: UnsupportedOpError, model: nn.Module, x) -> UnsupportedOpError:
    """The same error, naming the user's modules that made the node at fault."""
    if err.node_type is None:
        return err
    try:
        found = name_modules(model, lambda: model(x), err.node_type)
    except Exception:  # noqa: BLE001 - naming is a courtesy: never hide the real error behind another
        return err
    if not found:
        return err
    where = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    msg = str(err)
    head, sep, tail = msg.partition("; ")
    return UnsupportedOpError(f"{head}, used in {where}{sep}{tail}", err.node_type)


def hessian_diag(model: nn.Module, loss_fn, data, method: str = "obd", reduction: str = "mean",
                 params=None, samples: int = 1, seed: Optional[int] = 0, progress: bool = True) -> Curvature:
    """Per-parameter curvature of ``loss_fn(model(x), y)`` over ``data``.

    Args:
        model: any nn.Module; frozen parameters (requires_grad=False) are skipped.
        loss_fn: called as ``loss_fn(model(x), y)``, returning a scalar. For
            ``obd``/``lm`` any loss built from ops with rules: the sweep starts at
            the loss and goes through its own ops (CrossEntropyLoss with weights,
            label smoothing or probabilities, BCEWithLogitsLoss with
            ``pos_weight``, NLLLoss, Huber, SmoothL1, KLDiv, a regulariser term
            added, your own; plain MSE / CE / BCE-with-logits take closed-form
            fast paths); for ``lm`` the model ends at ``loss_fn``'s input, a
            trailing log_softmax counted as the loss's (losses.py, "Where the
            model ends"). For ``fisher``/``ggn-mc`` a loss of
            losses.PER_SAMPLE_LOSSES, reduction "mean" or "sum" (KLDiv also
            "batchmean"); any loss for ``hutchinson`` and ``exact``.
        data: an iterable of (inputs, targets) batches, or one such pair.
        method: one of METHODS.
        reduction: "mean" averages the per-batch curvatures (the curvature of
            the mean batch loss), "sum" adds them.
        params: names or parameters to compute (default: all that require grad).
        samples: Monte-Carlo samples per batch (``ggn-mc``, ``hutchinson``).
        seed: seeds the Monte-Carlo draws (None: torch's global generator).
        progress: show a tqdm bar over batches.

    Returns:
        A :class:`Curvature` (a dict name -> tensor of the parameter's shape).
    """
    _check_method(method)
    _check_reduction(reduction)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss such as nn.CrossEntropyLoss(), got a "
                        f"{type(loss_fn).__name__}; the order is hessian_diag(model, loss_fn, data, ...)")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    selected = _selected(model, params)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if method in ("obd", "lm"):
        acc = CurvatureAccumulator(model, loss_fn, method, list(selected))
    total: Dict[str, Tensor] = {}
    batches = as_batches(data)
    try:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"curvature ({method})", disable=not progress, leave=False)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        pass
    count = 0
    # forward, boundary and sweep of every batch reuse each other's blocks; every
    # method records attention through its math path (the fused kernels' backward
    # is one opaque node for obd/lm and has no derivative for hutchinson/exact)
    with cpu_block_cache(), checkpoint_guard(method), recordable(model):
        for x, y in batches:
            count += 1
            if method in ("obd", "lm"):
                try:
                    acc.accumulate(model(x), y)  # no reference kept here: the sweep frees the logits early
                except UnsupportedOpError as e:
                    raise _named(e, model, x) from None
                continue
            if method in ("fisher", "ggn-mc"):
                part = per_sample_squared(model, loss_fn, x, y, selected, method == "ggn-mc", gen,
                                          samples=samples if method == "ggn-mc" else 1)
            else:
                loss = loss_fn(model(x), y)
                check_graph([loss.grad_fn], method)
                part = hutchinson(loss, selected, samples, gen) if method == "hutchinson" else exact(loss, selected)
            for k, v in part.items():
                total[k] = v.detach() if k not in total else total[k] + v.detach()
    if method in ("obd", "lm"):
        return acc._take(reduction)
    scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    vals = {k: total.get(k, torch.zeros_like(p)) * scale for k, p in selected.items()}
    return Curvature(vals, method, reduction, count)
