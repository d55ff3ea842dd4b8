"""Masks that keep deleted weights deleted (docs/math.md, "Deleting a parameter").

A :class:`Pruner` owns one bool keep-mask per pruned parameter and makes
"deleted" mean frozen at zero through training:

- after every backward, the accumulated gradient of a deleted entry is set to
  zero in place (a post-accumulate-grad hook: one pass, no allocation), so
  nothing flows into momentum or Adam moments;
- ``prune()`` zeroes every per-parameter state tensor of the attached
  optimizers at new deletions, except the second moments that only divide a
  zero update, which on the CPU are held at a tiny positive value (see
  :mod:`obd_ext.frozen_state`: torch's CPU square root is slow on zeros);
- for the optimizers in :data:`ZERO_PRESERVING` nothing more is needed: with a
  zero gradient, zero update-carrying state and a zero weight, their update of
  that entry is exactly zero (weight decay included), so a step costs nothing
  extra. Any other optimizer (LBFGS, Muon, a user's own) gets the deleted
  weights and its state re-zeroed after every step, and LBFGS's history is
  cleared when the masks change (its flat history from before would revive
  them inside the step).

``prune()`` selects with any method and scope of the one vocabulary
(:mod:`obd_ext.vocabulary`); the paper's variants are ``factor`` (shrink
instead of delete) and ``revive()`` (let deleted weights adapt again).

Masks travel with the model as its zeros: a finalized or pruned model saved
with ``torch.save(model.state_dict())`` or ``save_pretrained`` holds plain
dense tensors (readable by anything), and ``Pruner(model, adopt_zeros=True)``
in a fresh process takes every exact zero of the pruned parameters as
deleted. Zeros are chosen over extra mask buffers because a pruned weight is
exactly zero by construction, so the zeros *are* the mask, and buffers would
make the checkpoint unloadable by plain transformers or a model without the
Pruner. A model pruned with ``torch.nn.utils.prune`` (``weight_orig`` and
``weight_mask``) is adopted with its masks.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import prune as torch_prune

from . import frozen_state
from .frozen_state import ZERO_PRESERVING
from .layer_kinds import prunable_weight_attrs, stores_inputs_first
from .selection import Selection, prune_as, select_scores
from .selection_checks import check_factor, check_sparsity
from .sparse_export import FORMATS, Finalized, finalize_modules
from .vocabulary import CURVATURE_METHODS, PRUNER_METHODS, SCOPES, check_method, check_pattern_sparsity, check_scope

__all__ = ["Pruner", "default_prunable", "ZERO_PRESERVING", "OBDUnstructured"]

# The integer type whose bits a gradient entry of each width is viewed as.
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def default_prunable(model: nn.Module) -> List[str]:
    """The weights of the model's prunable layers (:mod:`obd_ext.layer_kinds`), by name.

    Linear, Bilinear, convolution, Embedding, transformers' Conv1D, the input
    projections of MultiheadAttention and the weight matrices of RNN/LSTM/GRU
    layers; biases and norms are excluded. Every layer is listed under its own
    name, so a weight shared by two layers (an embedding tied to the output
    head) appears under both; the Pruner prunes it once.
    """
    # A weight computed from other parameters (weight_norm, spectral_norm,
    # parametrizations) is not itself a parameter: its parameters (e.g.
    # weight_v) are named by the Pruner's warning instead. A weight
    # reparametrised by torch.nn.utils.prune is listed: the Pruner adopts it.
    return [f"{name}.{attr}" if name else attr for name, m in model.named_modules()
            for attr in prunable_weight_attrs(m)
            if isinstance(getattr(m, attr, None), nn.Parameter) or _torch_pruned(m, attr) is not None]


def warn_uncovered(model: nn.Module, names: Sequence[str], stacklevel: int = 3) -> None:
    """Warn when weight matrices outside ``names`` are at least 5% of the model's (a default list missed them)."""
    # A matrix held as a raw nn.Parameter by a custom module is not in the
    # default list: say so when such weights are a sizeable part of the model,
    # rather than prune the rest and report the sparsity of what was listed.
    listed = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in set(names)}
    matrices = {id(p): (n, p.numel()) for n, p in model.named_parameters()  # two or more dims above 1
                if not isinstance(p, nn.parameter.UninitializedParameter) and sum(d > 1 for d in p.shape) >= 2}
    left = [(n, k) for i, (n, k) in matrices.items() if i not in listed]
    total = sum(k for _, k in matrices.values())
    if left and sum(k for _, k in left) >= 0.05 * total:
        share = sum(k for _, k in left) / total
        warnings.warn(f"Pruner: {len(left)} weight matrices ({share:.1%} of the model's matrix entries, e.g. "
                      f"{[n for n, _ in left[:3]]}) are not in a layer the default list knows, so they are not "
                      "pruned; pass params=obd_ext.default_prunable(model) + [...] to include them",
                      stacklevel=stacklevel)


def _owner(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name.rpartition(".")[0])
    except AttributeError:
        return None


def inputs_first(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is a layer weight stored inputs first (Conv1D, transposed convolutions).

    The row, N:M and group scopes read dim 0 as the outputs and dim 1 as the
    inputs, so such a weight is selected with those two dims swapped.
    """
    owner = _owner(model, name)
    return name.rpartition(".")[2] == "weight" and owner is not None and stores_inputs_first(owner)


def layout_unknown(model: nn.Module, name: str, p: Tensor) -> bool:
    """A parameter of 3 or more dims that is not a known layer's weight (e.g. stacked MoE experts).

    Nothing says which of its dims hold outputs and inputs, so the row, N:M
    and group scopes refuse it rather than guess (2-D ones are read as
    ``[out, in]``, like ``nn.Linear``).
    """
    owner = _owner(model, name)
    return p.dim() >= 3 and (owner is None or name.rpartition(".")[2] not in prunable_weight_attrs(owner))


def _torch_pruned(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The module owning ``name`` if torch.nn.utils.prune reparametrised it (``<attr>_orig``, ``<attr>_mask``)."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    orig, mask = getattr(owner, attr + "_orig", None), getattr(owner, attr + "_mask", None)
    return owner if isinstance(orig, nn.Parameter) and isinstance(mask, Tensor) else None


class Pruner:
    """Keep-masks for a model's prunable parameters, frozen through training.

    Args:
        model: the model.
        params: parameter names to prune (default: :func:`default_prunable`).
            A parameter shared under several names (tied weights) is pruned
            once, with one mask, under its first name; its other names are
            accepted everywhere a name is (``aliases`` maps them).
        adopt_zeros: take every exact zero of the pruned parameters as already
            deleted (a pruned model saved and loaded elsewhere resumes with
            its deletions frozen). Off by default: a dense model may hold
            exact zeros that must keep training (an Embedding's padding row,
            a zero-initialised layer).

    Layers pruned with ``torch.nn.utils.prune`` are adopted: their mask
    becomes this Pruner's and torch's reparametrisation is made permanent
    (``torch.nn.utils.prune.remove``), so the layer holds a plain weight.
    """

    def __init__(self, model: nn.Module, params: Optional[Sequence[str]] = None, *, adopt_zeros: bool = False):
        names = list(params) if params is not None else default_prunable(model)
        if not names:
            raise ValueError("params: no parameters to prune (got an empty list" + (
                ")" if params is not None
                else "; the model has no layer weights obd_ext.default_prunable knows: pass params=)"))
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"params: each name may appear once, got {dup} more than once")
        if not isinstance(adopt_zeros, bool):
            raise TypeError(f"adopt_zeros must be a bool, got {adopt_zeros!r}")
        # Every name of every parameter, tied ones included (named_parameters() lists a shared one once).
        named = dict(model.named_parameters(remove_duplicate=False))
        torch_owned = {n: _torch_pruned(model, n) for n in names if n not in named}
        missing = [n for n, owner in torch_owned.items() if owner is None]
        if missing:
            raise ValueError(f"params: the model has no parameter named {missing[0]!r}")
        sparse = [n for n in names if n in named and named[n].layout != torch.strided]
        if sparse:
            raise ValueError(f"params: {sparse[0]!r} is a {named[sparse[0]].layout} tensor (e.g. left by "
                             "finalize('csr'), which is for inference): prune the dense model instead")
        lazy = [n for n in names if isinstance(named.get(n), nn.parameter.UninitializedParameter)]
        if lazy:
            raise ValueError(f"params: {lazy[0]!r} is not initialised yet (a lazy module): run one forward pass "
                             "before building the Pruner")
        # Validated: now adopt torch.nn.utils.prune's masks (this changes the model).
        adopted: Dict[str, Tensor] = {}
        for n, owner in torch_owned.items():
            attr = n.rpartition(".")[2]
            adopted[n] = getattr(owner, attr + "_mask").detach().bool().clone()
            torch_prune.remove(owner, attr)
        named = dict(model.named_parameters(remove_duplicate=False))
        if params is None:
            warn_uncovered(model, names)
        self.model = model
        self.names: List[str] = []
        self.aliases: Dict[str, str] = {}  # every accepted name -> the name its mask is kept under
        self.params: Dict[str, nn.Parameter] = {}
        by_id: Dict[int, str] = {}
        for n in names:
            p = named[n]
            first = by_id.setdefault(id(p), n)
            self.aliases[n] = first
            if first == n:
                self.names.append(n)
                self.params[n] = p
        for n, p in named.items():  # tied names the user did not list still find their mask
            if id(p) in by_id:
                self.aliases.setdefault(n, by_id[id(p)])
        self._inputs_first = {n for n in self.names if inputs_first(model, n)}
        self._layout_unknown = [n for n in self.names if layout_unknown(model, n, self.params[n])]
        self.masks: Dict[str, Tensor] = {}
        for n, p in self.params.items():
            if n in adopted:
                self.masks[n] = adopted[n].to(p.device)
            elif adopt_zeros:
                self.masks[n] = p.detach() != 0
            else:
                self.masks[n] = torch.ones_like(p, dtype=torch.bool)
        if not adopt_zeros and not adopted:
            zeros = {n: float((p == 0).float().mean()) for n, p in self.params.items() if p.numel()}
            many = {n: z for n, z in zeros.items() if z >= 0.1}
            if many:
                n, z = next(iter(many.items()))
                warnings.warn(f"Pruner: {len(many)} of the pruned parameters are at least 10% exact zeros "
                              f"(e.g. {n}: {z:.0%}); if the model was pruned before, pass adopt_zeros=True to keep "
                              "those weights frozen", stacklevel=2)
        self._deleted: Dict[str, Tensor] = {}  # ~mask, kept so apply_masks allocates nothing
        self._bitmasks: Dict[tuple, tuple] = {}  # the gradient hook's integer masks, see _bitmask
        self._hooks: list = []
        self._grad_hooked: set = set()  # names whose gradient hook is installed
        self._forward_hooks: list = []  # hook weights unfrozen later at their layer's next forward
        self._optimizers: list = []
        self._weights_dirty = False  # deleted weights may be non-zero (after a factor prune or a mask load)
        self._refresh_deleted()
        self._install_grad_hooks()

    def __repr__(self) -> str:
        total = sum(m.numel() for m in self.masks.values())
        deleted = total - sum(int(m.sum()) for m in self.masks.values())
        return (f"Pruner({len(self.names)} parameters, {total} entries, {deleted} deleted "
                f"(sparsity {deleted / total if total else 0.0:.4f}), {len(self._optimizers)} optimizer(s) attached, "
                f"hooks {'on' if self._hooks else 'off'})")

    # ------------------------------------------------------------------
    # Selection
    # ------------------------------------------------------------------

    def _curvature_list(self, method: str, curvature) -> List[Tensor]:
        if curvature is None:
            raise ValueError(f"method={method!r} needs curvature (name -> tensor), e.g. from "
                             f"obd_ext.hessian_diag(model, loss_fn, data, method={method!r})")
        if not hasattr(curvature, "keys"):
            raise TypeError(f"curvature must map parameter names to tensors (a dict or obd_ext.Curvature), "
                            f"got {type(curvature).__name__}")
        by_canonical: Dict[str, Tensor] = {}
        given_as: Dict[str, str] = {}
        for k in curvature.keys():
            if k not in self.aliases:
                continue
            canonical, h = self.aliases[k], curvature[k]
            if canonical not in by_canonical:
                by_canonical[canonical], given_as[canonical] = h, k
            elif h is not by_canonical[canonical] and not (
                    isinstance(h, Tensor) and isinstance(by_canonical[canonical], Tensor)
                    and h.shape == by_canonical[canonical].shape and torch.equal(h, by_canonical[canonical])):
                raise ValueError(f"curvature[{given_as[canonical]!r}] and curvature[{k!r}] differ, but both name one "
                                 "(tied) parameter, pruned once with one curvature: give it under one name")
        missing = [k for k in self.names if k not in by_canonical]
        if missing:
            raise ValueError(f"curvature has no entry for {missing}")
        out = []
        for k in self.names:
            h, w = by_canonical[k], self.params[k]
            if not isinstance(h, Tensor):
                raise TypeError(f"curvature[{k!r}] must be a tensor, got {type(h).__name__}")
            if h.shape != w.shape:
                raise ValueError(f"curvature[{k!r}] has shape {tuple(h.shape)}, the parameter {tuple(w.shape)}")
            out.append(h.to(w.device))
        return out

    def prune(self, sparsity: Optional[float] = None, method: str = "obd", curvature=None, *,
              scope: Optional[str] = None, pattern: str = "unstructured", factor: Optional[float] = 0.0,
              generator: Optional[torch.Generator] = None, nonfinite: str = "error") -> Selection:
        """Delete to a target sparsity: the fraction of the pruned entries deleted after the call.

        Unlike ``torch.nn.utils.prune``'s ``amount`` (a fraction of what
        remains), ``sparsity`` is the total: entries deleted before count and
        stay deleted, and asking for less than is already deleted is an error
        (``revive()`` first to start over).

        Args:
            sparsity: target fraction deleted after the call, overall or per
                ``scope``; implied by an N:M ``pattern`` (may be omitted).
            method: one of :data:`obd_ext.vocabulary.PRUNER_METHODS`: a
                curvature method ("obd", "lm", "fisher", ...: saliency
                ``h w^2 / 2`` with ``curvature``), "magnitude" or "random".
            curvature: name -> curvature tensor (a dict, or the
                :class:`~obd_ext.Curvature` from ``obd_ext.hessian_diag``);
                needed by the curvature methods.
            scope: one of :data:`obd_ext.vocabulary.SCOPES`; None for the
                default ("global").
            pattern: "unstructured" or "N:M" such as "2:4" (N kept of every M
                consecutive inputs of each row).
            factor: deleted weights are multiplied by it, in [0, 1] (0 deletes;
                the paper's "decrease" variant uses a value in (0, 1), and the
                next optimizer step zeroes them); None leaves them as they are.
            generator: random source for method="random".
            nonfinite: "error" (default) raises on NaN/Inf in a kept weight
                or its curvature; "keep" leaves such entries alone.

        Returns:
            The :class:`~obd_ext.Selection` (counts and the predicted loss increase).
        """
        check_method(method, PRUNER_METHODS, "Pruner.prune")
        if check_factor(factor) is not None and not 0.0 <= factor <= 1.0:
            raise ValueError(f"factor must be in [0, 1] (0 deletes; the paper's 'decrease' variant shrinks by a value "
                             f"in (0, 1)) or None to leave the weights, got {factor!r}")
        self._check_current("prune")
        resolved_scope = check_scope(scope, SCOPES)
        sparsity = check_pattern_sparsity(pattern, sparsity)
        if sparsity is None:
            raise ValueError("sparsity: give the target fraction deleted (or an N:M pattern, which implies it)")
        sparsity = check_sparsity(sparsity)
        if pattern == "unstructured" and resolved_scope == "global" and sparsity < self.sparsity - 0.5 / max(self._total, 1):
            raise ValueError(f"sparsity={sparsity:g} is below the {self.sparsity:.6g} already deleted: a Pruner only "
                             "deletes more (sparsity is the total, not torch's fraction of what remains); call "
                             "revive() first to start over")
        if self._layout_unknown and (pattern != "unstructured" or resolved_scope in ("row", "group")):
            n = self._layout_unknown[0]
            raise ValueError(f"Pruner.prune: {n!r} ({self.params[n].dim()} dims) is not a known layer's weight, so "
                             f"which dims hold its outputs and inputs is unknown; scope={resolved_scope!r} with "
                             f"pattern={pattern!r} needs them: use scope 'global' or 'layer', or a Pruner without it")
        weights = [self.params[k] for k in self.names]
        masks = [self.masks[k] for k in self.names]
        if method == "random":
            if resolved_scope != "global" or pattern != "unstructured":
                raise ValueError("method='random' supports scope='global' with pattern='unstructured' only")
            scores = [torch.rand(w.shape, generator=generator).to(w.device) for w in weights]
            before = [m.clone() for m in masks] if factor not in (0.0, None) else None
            sel = select_scores(scores, sparsity=sparsity, masks=masks, names=self.names)
            if before is not None:  # shrink the new deletions only, as the kernels do
                with torch.no_grad():
                    for w, m, b in zip(weights, masks, before):
                        w.copy_(torch.where(b & ~m, w * factor, w))
            self._after_masks_changed(factor, weights_written=True)
            return sel
        if method in CURVATURE_METHODS:
            curv = self._curvature_list(method, curvature)
        else:  # magnitude: saliency w^2 / 2 orders like |w|
            curv = [torch.ones_like(w) for w in weights]

        def rows(ts: List[Tensor]) -> List[Tensor]:  # weights stored inputs first: select with dims 0, 1 swapped
            return [t.transpose(0, 1) if n in self._inputs_first else t for n, t in zip(self.names, ts)]

        labels = [f"{n} (stored inputs first, shown with dims 0 and 1 swapped)" if n in self._inputs_first else n
                  for n in self.names]
        with torch.no_grad():
            sel = prune_as("Pruner.prune", rows(weights), rows(curv), sparsity=sparsity, scope=scope, pattern=pattern,
                           masks=rows(masks), factor=factor, nonfinite=nonfinite, names=labels)
        sel.masks = masks  # the masks as stored, not the views
        for part, m in zip(sel.per_tensor, masks):
            part.masks = [m]
        self._after_masks_changed(factor, weights_written=True)
        return sel

    def _check_current(self, where: str) -> None:
        """The model must still hold the parameters this Pruner masks (not replaced after it was built)."""
        for name, p in self.params.items():
            try:
                now = self.model.get_parameter(name)
            except AttributeError:
                now = None
            if now is not p:
                raise RuntimeError(f"{where}: the model's parameter {name!r} is no longer the one this Pruner masks "
                                   "(replaced after the Pruner was built, e.g. by load_state_dict(assign=True) or by "
                                   "setting the attribute): build a new Pruner on the model as it is now "
                                   "(adopt_zeros=True keeps its deletions)")

    @property
    def _total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    # ------------------------------------------------------------------
    # Freezing
    # ------------------------------------------------------------------

    def _refresh_deleted(self) -> None:
        self._deleted = {k: ~m for k, m in self.masks.items()}

    def _bitmask(self, name: str, g: Tensor) -> Tensor:
        """The keep-mask as integers of the gradient's width: all bits set where kept, none where deleted.

        Cached per (name, dtype, device) and rebuilt when the bool mask changes
        (its version counter moves on any in-place edit, or it is replaced).
        """
        mask = self.masks[name]
        key = (name, g.dtype, g.device)
        hit = self._bitmasks.get(key)
        if hit is not None and hit[0] is mask and hit[1] == mask._version:
            return hit[2]
        itype = _INT_OF_WIDTH[g.element_size()]
        bits = torch.zeros(mask.shape, dtype=itype, device=g.device)
        bits.masked_fill_(mask.to(g.device), 255 if itype == torch.uint8 else -1)
        self._bitmasks[key] = (mask, mask._version, bits)
        return bits

    def _mask_grad(self, name: str, param: Tensor) -> None:
        # After accumulation, in place, one pass: the gradient's bits AND the
        # keep-mask's. A deleted entry becomes exactly +0.0 whatever it held
        # (NaN and Inf included, which a multiply would keep as NaN) and a kept
        # one is untouched bit for bit. An integer AND is fully vectorised:
        # 2.2 ms on the 10M entries of bench_masked_step's MLP against 6.5 ms
        # for torch.where(mask, g, 0, out=g) and 7.0 ms for masked_fill_
        # (2 threads), for an integer mask of the gradient's width (4 bytes
        # per fp32 entry, held while the Pruner is attached).
        g = param.grad
        if g is None:
            return
        if g.layout != torch.strided:
            raise RuntimeError(f"Pruner: the gradient of {name!r} is {g.layout} (e.g. nn.Embedding(sparse=True)); "
                               f"deleted entries are frozen by masking dense gradients in place: use sparse=False")
        g.view(_INT_OF_WIDTH[g.element_size()]).bitwise_and_(self._bitmask(name, g))

    def _install_grad_hooks(self) -> None:
        # A parameter frozen (requires_grad=False) when the Pruner is built
        # cannot take a hook; once unfrozen it gets one at the model's next
        # forward (so its next backward is masked) or, at the latest, before
        # the next step of an attached optimizer, which also masks what it
        # accumulated meanwhile.
        if len(self._grad_hooked) == len(self.params):
            return
        for name, p in self.params.items():
            if p.requires_grad and name not in self._grad_hooked:
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda param, name=name: self._mask_grad(name, param)))
                self._grad_hooked.add(name)
                self._mask_grad(name, p)
        if len(self._grad_hooked) < len(self.params) and not self._forward_hooks:
            # on every layer using such a weight (tied ones under each name): a model
            # may be run through its submodules, never calling the root's forward
            owners = {id(m): m for n, c in self.aliases.items() if c not in self._grad_hooked
                      for m in [self.model.get_submodule(n.rpartition(".")[0])]}
            for m in owners.values():
                self._forward_hooks.append(m.register_forward_pre_hook(lambda module, args: self._install_grad_hooks()))
            self._hooks.extend(self._forward_hooks)

    def _after_masks_changed(self, factor: Optional[float], weights_written: bool) -> None:
        """After a selection: apply ``factor`` unless the kernels did, zero the optimizers' state at deletions."""
        self._refresh_deleted()
        # factor 0: every deleted weight zero (also ones a user wrote to while unhooked); a factor
        # shrinks only the new deletions, which the kernels did (weights_written) or apply_masks does.
        self.apply_masks(0.0 if factor == 0.0 else None if weights_written else factor)
        # Deleted weights shrunk (or left, factor=None) are not zero yet: the next step zeroes them.
        self._weights_dirty = factor != 0.0
        for opt in self._optimizers:
            self._restart_lbfgs(opt)

    def _restart_lbfgs(self, opt: torch.optim.Optimizer) -> None:
        # LBFGS keeps flat histories of steps and gradient changes from before
        # the masks: its next direction would move deleted entries inside the
        # step. A fresh history (the same as a restart) cannot.
        if isinstance(opt, torch.optim.LBFGS) and any((~m).any() for m in self.masks.values()):
            opt.state.clear()

    @torch.no_grad()
    def apply_masks(self, factor: Optional[float] = 0.0) -> None:
        """Zero (or scale, or leave with ``factor=None``) the deleted weights, and freeze the optimizers' state there.

        The state is zeroed, except second moments held positive on the CPU
        (:mod:`obd_ext.frozen_state`).
        """
        for name, p in self.params.items():
            deleted = self._deleted[name]
            if factor is not None:
                if factor == 0.0:
                    p.masked_fill_(deleted, 0.0)
                else:
                    p.copy_(torch.where(deleted, p * factor, p))
        for opt in self._optimizers:
            self._set_state(opt)
        if factor == 0.0:
            self._weights_dirty = False

    @torch.no_grad()
    def _set_state(self, opt: torch.optim.Optimizer, how: str = "freeze", names: Optional[Sequence[str]] = None,
                   keys: Optional[Sequence[str]] = None) -> None:
        """Write ``opt``'s per-entry state at the deleted entries (``names``, ``keys``: only those).

        how:
            "freeze": state that carries an update to zero, second moments held
                on the CPU to their held value (:mod:`obd_ext.frozen_state`);
            "loaded": the same, but held second moments are only raised where
                zero or subnormal, so a state this Pruner saved loads bit for bit;
            "fresh": what a new parameter's state holds (entries it stops freezing).
        """
        held = frozen_state.held_keys(opt) if how != "fresh" else ()
        free = frozen_state.scale_keys(opt) if how == "loaded" else ()
        groups = frozen_state.groups_of(opt)
        for name in self.names if names is None else names:
            p = self.params[name]
            state = opt.state.get(p)
            if not state or id(p) not in groups:
                continue
            group, deleted = groups[id(p)], self._deleted[name]
            holding = bool(held) and frozen_state.holds(opt, group, p) is not None
            for key, value in state.items():
                if key == "step" or key in free or (keys is not None and key not in keys):
                    continue
                if not (isinstance(value, Tensor) and value.shape == p.shape):
                    continue
                if how == "fresh":
                    value.masked_fill_(deleted, frozen_state.fresh_value(opt, group, key))
                elif holding and key in held:
                    low = deleted & (value < torch.finfo(value.dtype).tiny) if how == "loaded" else deleted
                    value.masked_fill_(low, frozen_state.held_value(value.dtype))
                else:
                    value.masked_fill_(deleted, 0)

    def _rearm(self, opt: torch.optim.Optimizer) -> None:
        # A held second moment decays by beta2 every step; it is set again
        # every rearm_period steps, counted by the optimizer's own "step" from
        # the step that built the state (so a resumed run re-arms at the same
        # steps). Period 0: it never decays, and is set when the masks change.
        held = frozen_state.held_keys(opt)
        if not held:
            return
        groups = frozen_state.groups_of(opt)
        due = []
        for name, p in self.params.items():
            step = opt.state.get(p, {}).get("step")
            period = frozen_state.holds(opt, groups[id(p)], p) if step is not None and id(p) in groups else None
            if period and (int(step) - 1) % period == 0:
                due.append(name)
        if due:
            self._set_state(opt, names=due, keys=held)

    def _before_step(self) -> None:
        # The gradient hook masks at accumulation (so clipping and logging see
        # zeros); the step masks again, because a gradient can change after it
        # unseen: assigned (p.grad = g), edited through .data (which has a
        # version counter of its own), or of a weight unfrozen since. One
        # allocation-free AND per step, about 1% of the bench MLP's step.
        self._install_grad_hooks()
        for name, p in self.params.items():
            self._mask_grad(name, p)

    def _after_state_load(self, opt: torch.optim.Optimizer) -> None:
        # A state loaded after attaching (e.g. from before pruning) may carry
        # momentum at deleted entries, or an LBFGS history that moves them.
        if isinstance(opt, torch.optim.LBFGS) and not self._lbfgs_history_clean(opt):
            opt.state.clear()
        self._set_state(opt, "loaded")

    def _lbfgs_history_clean(self, opt: torch.optim.LBFGS) -> bool:
        """Whether LBFGS's flat history is zero at every deleted entry (as in a state saved under this Pruner)."""
        by_id = {id(p): n for n, p in self.params.items()}
        flat = torch.cat([self._deleted[by_id[id(p)]].reshape(-1) if id(p) in by_id
                          else torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                          for p in opt.param_groups[0]["params"]])
        for state in opt.state.values():
            for key in ("d", "prev_flat_grad", "old_dirs", "old_stps"):
                for v in state.get(key, []) if isinstance(state.get(key), list) else [state.get(key)]:
                    if isinstance(v, Tensor) and v.shape == flat.shape and v[flat].any():
                        return False
        return True

    def _after_step(self, opt: torch.optim.Optimizer) -> None:
        # Zero-preserving optimizers cannot move a deleted entry while its
        # weight is zero; others, and weights left non-zero by factor, are re-zeroed.
        if self._weights_dirty or not frozen_state.preserves_zero(opt):
            self.apply_masks(0.0)
        else:
            self._rearm(opt)

    def attach(self, optimizer: torch.optim.Optimizer) -> "Pruner":
        """Keep deleted weights at zero through ``optimizer``'s steps, its state there frozen (see apply_masks)."""
        if isinstance(optimizer, torch.optim.SparseAdam):
            raise ValueError("attach: SparseAdam takes sparse gradients, which the Pruner cannot mask in place; "
                             "use Adam or AdamW")
        if optimizer in self._optimizers:
            return self
        self._check_current("attach")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p in self.params.values()):
            raise ValueError(f"attach: the optimizer holds none of the {len(self.params)} pruned parameters (e.g. "
                             f"{self.names[0]!r}), so nothing it does could be frozen: attach the optimizer that "
                             "trains this model's parameters")
        self._install_grad_hooks()  # again, after remove_hooks()
        self._optimizers.append(optimizer)
        self._hooks.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step()))
        self._hooks.append(optimizer.register_load_state_dict_post_hook(self._after_state_load))
        self._hooks.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(opt)))
        # Weights written while unhooked, and state built before attaching, must not revive anything
        # (weights shrunk by a factor stay so until the next step).
        self.apply_masks(None if self._weights_dirty else 0.0)
        self._restart_lbfgs(optimizer)
        return self

    def revive(self) -> None:
        """Let every deleted weight adapt again (the paper's variant): all masks back to True.

        The revived entries start from fresh optimizer state (what the
        optimizer builds for a new parameter: zero, or its initial value).
        """
        self._release_state()
        for m in self.masks.values():
            m.fill_(True)
        self._refresh_deleted()

    def remove_hooks(self) -> None:
        """Remove the gradient and optimizer hooks; the masks and the zeros stay as they are.

        This is not ``torch.nn.utils.prune.remove`` (which makes pruning
        permanent): that is :meth:`finalize`.
        """
        self._release_state()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._grad_hooked.clear()
        self._forward_hooks.clear()
        self._optimizers.clear()

    def _release_state(self) -> None:
        # Frozen state (zeros, held second moments) is for entries this Pruner
        # freezes: whatever trains them next (revived, or no Pruner) finds the
        # state a fresh parameter would have (Rprop's step size is its lr,
        # Adagrad's sum its initial value; zero otherwise).
        for opt in self._optimizers:
            self._set_state(opt, "fresh")

    def finalize(self, format: str = "dense") -> Finalized:
        """Make pruning permanent (torch's ``prune.remove``): zeros in place, no hooks, optionally sparse storage.

        Args:
            format: "dense" (plain tensors with zeros), "csr" (pruned Linear
                weights as sparse CSR parameters) or "semi_structured" (2:4
                pruned Linear weights as CUDA 2:4 tensors); see
                obd_ext.sparse_export. Other pruned tensors, and weights shared by
                several layers (tied), stay dense.

        Every layer is checked before anything changes: a layer that cannot
        be converted leaves the model, the masks and the hooks as they were.

        Returns:
            A :class:`~obd_ext.sparse_export.Finalized` saying what was converted
            and the bytes before and after.
        """
        if format not in FORMATS:  # checked before the hooks go, so a typo changes nothing
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self._check_current("finalize")
        with torch.no_grad():
            zeroed = {k: p.masked_fill(self._deleted[k], 0.0) for k, p in self.params.items()}
        # Converts every layer from the zeroed copies first; raises before anything is changed.
        result = finalize_modules(self.model, self.names, format, values=zeroed)
        with torch.no_grad():
            for k, p in self.params.items():
                if k not in result.converted:
                    p.copy_(zeroed[k])
        self.remove_hooks()
        return result

    # ------------------------------------------------------------------
    # Reporting and persistence
    # ------------------------------------------------------------------

    @property
    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total if total else 0.0

    def counts(self) -> Dict[str, int]:
        """Deleted entries per parameter."""
        return {k: int((~m).sum()) for k, m in self.masks.items()}

    def state_dict(self) -> Dict[str, Tensor]:
        return {k: m.clone() for k, m in self.masks.items()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Load masks saved by :meth:`state_dict`; every mask is checked before any is changed."""
        for k, m in self.masks.items():
            if k not in state:
                raise KeyError(f"load_state_dict: no mask for {k!r}")
            v = state[k]
            if not isinstance(v, Tensor) or v.dtype != torch.bool:
                raise TypeError(f"load_state_dict: mask {k!r} must be a bool tensor, got "
                                f"{v.dtype if isinstance(v, Tensor) else type(v).__name__}")
            if v.shape != m.shape:
                raise ValueError(f"load_state_dict: mask {k!r} has shape {tuple(v.shape)}, "
                                 f"expected {tuple(m.shape)}")
        extra = sorted(set(state) - set(self.masks))
        if extra:
            raise KeyError(f"load_state_dict: masks for parameters this Pruner does not prune: {extra}")
        self._check_current("load_state_dict")
        self._release_state()  # entries the loaded masks revive start fresh; deleted ones are frozen again below
        for k, m in self.masks.items():
            m.copy_(state[k])
        self._after_masks_changed(0.0, weights_written=False)


# ---------------------------------------------------------------------------
# torch.nn.utils.prune interoperability
# ---------------------------------------------------------------------------

def _check_amount(amount) -> None:
    """torch.nn.utils.prune's rule for ``amount``: a count >= 0 or a fraction in [0, 1]."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"amount must be an int (a count) or a float (a fraction), got {amount!r}")
    if isinstance(amount, int) and amount < 0 or isinstance(amount, float) and not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be a count >= 0 or a fraction in [0, 1], got {amount!r}")


def _amount_count(amount, alive: int) -> int:
    """Entries ``amount`` takes from ``alive`` unpruned ones, rounded like torch's methods."""
    k = amount if isinstance(amount, int) else round(amount * alive)
    if k > alive:
        raise ValueError(f"amount={amount!r} asks for {k} entries but only {alive} are left unpruned")
    return k


class OBDUnstructured(torch_prune.BasePruningMethod):
    """A ``torch.nn.utils.prune`` method that deletes by OBD saliency ``h w^2 / 2``.

    Example::

        OBDUnstructured.apply(model.fc, "weight", amount=0.5, curvature=h["fc.weight"])

    Like torch's own methods, ``amount`` (a fraction or a count) is taken from
    the entries not yet pruned; existing masks are kept. For a global pool,
    pass ``importance_scores={(m, "weight"): obd_ext.saliency(w, h), ...}`` to
    ``torch.nn.utils.prune.global_unstructured``.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount, curvature: Tensor):
        _check_amount(amount)
        self.amount = amount
        self.curvature = curvature

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        from .ops import saliency

        if t.shape != self.curvature.shape:
            raise ValueError(f"OBDUnstructured: curvature has shape {tuple(self.curvature.shape)} but the tensor to "
                             f"prune has shape {tuple(t.shape)}; use OBDUnstructured.apply (it handles tensors "
                             "pruned before)")
        keep = default_mask.clone().bool()
        alive = int(keep.sum())
        k = _amount_count(self.amount, alive)
        already = keep.numel() - alive
        with torch.no_grad():
            select_scores([saliency(t.detach(), self.curvature.to(t.device))], k=already + k, masks=[keep])
        return keep.to(default_mask.dtype)

    @classmethod
    def apply(cls, module: nn.Module, name: str, amount, curvature: Tensor):  # type: ignore[override]
        if hasattr(module, name + "_mask"):
            # Pruned before: torch's container would hand compute_mask only the
            # surviving entries, without their positions, so select on the
            # whole tensor here and add the result as a custom mask.
            orig, old = getattr(module, name + "_orig"), getattr(module, name + "_mask")
            keep = cls(amount, curvature).compute_mask(orig.detach(), old)
            return torch_prune.custom_from_mask(module, name, keep)
        return super().apply(module, name, amount=amount, curvature=curvature)
