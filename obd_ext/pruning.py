"""Masks that keep deleted weights deleted (EQUATIONS.md, "Deleting a parameter").

A :class:`Pruner` owns one bool keep-mask per pruned parameter and makes
"deleted" mean frozen at zero through training:

- the gradient of a deleted entry is zeroed by a tensor hook, so nothing
  accumulates into momentum or Adam moments;
- after every optimizer step (``attach(optimizer)``) deleted weights are set
  to exactly zero again (weight decay, or an optimizer that moves weights
  without a gradient, cannot revive them), and every per-parameter state
  tensor of the optimizer (SGD momentum, Adam/AdamW moments, anything of the
  parameter's shape) is zeroed at deleted entries.

``prune()`` selects with any criterion and scope of obd_ext.selection; the
paper's variants are ``factor`` (shrink instead of delete) and
``revive()`` (let deleted weights adapt again).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .sparse_export import FORMATS, Finalized, finalize_modules
from .selection import SCOPES, Selection, check_sparsity, prune_, select_scores

__all__ = ["Pruner", "default_prunable", "CRITERIA", "OBDUnstructured"]

CRITERIA = ("obd", "lm", "fisher", "magnitude", "random")


def default_prunable(model: nn.Module) -> List[str]:
    """Weights of Linear, convolution and Embedding layers (biases and norms excluded)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, kinds) and getattr(m, "weight", None) is not None]


class Pruner:
    """Keep-masks for a model's prunable parameters, frozen through training.

    Args:
        model: the model.
        params: parameter names to prune (default: :func:`default_prunable`).
    """

    def __init__(self, model: nn.Module, params: Optional[Sequence[str]] = None):
        self.model = model
        named = dict(model.named_parameters())
        self.names = list(params) if params is not None else default_prunable(model)
        for n in self.names:
            if n not in named:
                raise ValueError(f"params: the model has no parameter named {n!r}")
        self.params: Dict[str, nn.Parameter] = {n: named[n] for n in self.names}
        self.masks: Dict[str, Tensor] = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self._hooks: list = []
        self._optimizers: list = []
        self._install_grad_hooks()

    # ------------------------------------------------------------------
    # Selection
    # ------------------------------------------------------------------

    def prune(self, sparsity: float, criterion: str = "obd", curvature: Optional[Dict[str, Tensor]] = None,
              scope: str = "global", factor: Optional[float] = 0.0, n: int = 2, m: int = 4,
              generator: Optional[torch.Generator] = None) -> Selection:
        """Delete to ``sparsity`` (fraction of the pruned parameters' entries, or per scope).

        Args:
            sparsity: target fraction deleted after the call (entries deleted
                before count and stay deleted).
            criterion: "obd"/"lm"/"fisher" (saliency h w^2 / 2 with the given
                ``curvature``, name -> tensor, e.g. from obd_ext.hessian_diag),
                "magnitude" (h = 1) or "random".
            scope: one of obd_ext.SCOPES.
            factor: deleted weights are multiplied by it (0 deletes; the
                paper's "decrease" variant uses a value in (0, 1)).
        """
        check_sparsity(sparsity)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        weights = [self.params[k] for k in self.names]
        masks = [self.masks[k] for k in self.names]
        if criterion == "random":
            if scope != "global":
                raise ValueError("criterion='random' supports scope='global' only")
            scores = [torch.rand(w.shape, generator=generator).to(w.device) for w in weights]
            sel = select_scores(scores, sparsity=sparsity, masks=masks, names=self.names)
            self.apply_masks(factor)
            return sel
        if criterion == "magnitude":
            curv = [torch.ones_like(w) for w in weights]
        else:
            if curvature is None:
                raise ValueError(f"criterion={criterion!r} needs curvature (name -> tensor), e.g. from "
                                 "obd_ext.hessian_diag(model, loss_fn, data, method=...)")
            missing = [k for k in self.names if k not in curvature]
            if missing:
                raise ValueError(f"curvature has no entry for {missing}")
            curv = [curvature[k].to(w.device) for k, w in zip(self.names, weights)]
        with torch.no_grad():
            sel = prune_(weights, curv, sparsity=sparsity, scope=scope, masks=masks, factor=factor, n=n, m=m,
                         names=self.names)
        self.apply_masks(None)  # the kernels wrote the weights; clear the optimizers' state at new deletions
        return sel

    # ------------------------------------------------------------------
    # Freezing
    # ------------------------------------------------------------------

    def _install_grad_hooks(self) -> None:
        for name, p in self.params.items():
            if p.requires_grad:
                self._hooks.append(p.register_hook(lambda g, name=name: g * self.masks[name].to(g.dtype)))

    @torch.no_grad()
    def apply_masks(self, factor: Optional[float] = 0.0) -> None:
        """Zero (or scale) the deleted weights and the optimizers' state at them."""
        for name, p in self.params.items():
            keep = self.masks[name]
            if factor is not None:
                if factor == 0.0:
                    p.masked_fill_(~keep, 0.0)
                else:
                    p.copy_(torch.where(keep, p, p * factor))
            for opt in self._optimizers:
                for value in opt.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        value.masked_fill_(~keep, 0)

    def attach(self, optimizer: torch.optim.Optimizer) -> "Pruner":
        """Re-apply the masks after every step of ``optimizer``."""
        self._optimizers.append(optimizer)
        self._hooks.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply_masks()))
        return self

    def revive(self) -> None:
        """Let every deleted weight adapt again (the paper's variant): all masks back to True."""
        for m in self.masks.values():
            m.fill_(True)

    def remove(self) -> None:
        """Remove every hook (the masks stay as they are)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._optimizers.clear()

    def finalize(self, format: str = "dense") -> Finalized:
        """Finish pruning: zeros in place, no hooks left, optionally sparse storage.

        Args:
            format: "dense" (plain tensors with zeros), "csr" (pruned Linear
                weights as sparse CSR parameters) or "semi_structured" (2:4
                pruned Linear weights as CUDA 2:4 tensors); see
                obd_ext.sparse_export. Other pruned tensors stay dense.

        Returns:
            A :class:`~obd_ext.sparse_export.Finalized` saying what was converted
            and the bytes before and after.
        """
        if format not in FORMATS:  # checked before the hooks go, so a typo changes nothing
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.apply_masks(0.0)
        self.remove()
        return finalize_modules(self.model, self.names, format)

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
        for k, m in self.masks.items():
            if k not in state:
                raise KeyError(f"load_state_dict: no mask for {k!r}")
            if state[k].shape != m.shape:
                raise ValueError(f"load_state_dict: mask {k!r} has shape {tuple(state[k].shape)}, "
                                 f"expected {tuple(m.shape)}")
            m.copy_(state[k])
        self.apply_masks()


# ---------------------------------------------------------------------------
# torch.nn.utils.prune interoperability
# ---------------------------------------------------------------------------

from torch.nn.utils import prune as _torch_prune  # noqa: E402


class OBDUnstructured(_torch_prune.BasePruningMethod):
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
        _torch_prune._validate_pruning_amount_init(amount)
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
        k = _torch_prune._compute_nparams_toprune(self.amount, alive)
        _torch_prune._validate_pruning_amount(k, alive)
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
            return _torch_prune.custom_from_mask(module, name, keep)
        return super().apply(module, name, amount=amount, curvature=curvature)
