"""The one vocabulary of obd_ext's choices: methods, scopes, N:M patterns.

Every public entry point (``hessian_diag``, ``Pruner.prune``, ``OBDScheduler``,
``prune_``, ``prune_layerwise``, ``prune_llm`` and the CLI) spells a choice
the same way and checks it here, so a name means one thing everywhere:

- ``method``: how saliency is scored. One set of names; each entry point
  accepts the subset that makes sense for it and names the others' homes in
  its error (:func:`check_method`).
- ``scope``: the pool the lowest saliencies are taken from (:data:`SCOPES`).
  ``scope=None`` means the default, :func:`default_scope`.
- ``pattern``: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"`` (keep N of
  every M consecutive inputs); an N:M pattern fixes the sparsity at 1 - N/M.

torch's words are used with torch's meaning: ``amount`` is not used because
obd_ext's ``sparsity`` is the target fraction of all entries, not a fraction
of what remains; ``finalize`` is torch's ``prune.remove`` (make it permanent).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

__all__ = [
    "Method",
    "METHODS",
    "CURVATURE_METHODS",
    "PRUNER_METHODS",
    "LAYERWISE_METHODS",
    "LLM_METHODS",
    "DEFAULT_LAYERWISE_METHOD",
    "SCOPES",
    "LAYERWISE_SCOPES",
    "check_method",
    "check_scope",
    "default_scope",
    "parse_pattern",
    "check_pattern_sparsity",
]


@dataclass(frozen=True)
class Method:
    """One way of scoring weights.

    Attributes:
        name: the spelling users pass as ``method=``.
        summary: one line for ``--help`` and the docs.
        cost: what it costs, in plain words.
        needs_curvature: the saliency is ``h w^2 / 2`` from a curvature estimate.
        statistics: for layer-wise methods, the calibration statistics each
            linear input needs: None (no calibration pass at all),
            ``"diagonal"`` (``sum_n x_nj^2``) or ``"gram"`` (the full
            ``X^T X``).
    """

    name: str
    summary: str
    cost: str
    needs_curvature: bool
    statistics: Optional[str] = None


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("obd", "diagonal Hessian by back-propagated second derivatives (the paper's eq. 7)",
           "about one backward pass", True),
    Method("lm", "Levenberg-Marquardt: eq. 7 without the f'' terms (Gauss-Newton diagonal, never negative under a convex loss)",
           "about one backward pass", True),
    Method("fisher", "empirical Fisher: mean of squared per-sample gradients",
           "one backward pass per sample, batched", True),
    Method("ggn-mc", "Monte-Carlo generalised Gauss-Newton (targets drawn from the model)",
           "one batched per-sample pass per draw", True),
    Method("hutchinson", "Hutchinson's estimator E[z * Hz] with Rademacher z",
           "two backward passes per probe", True),
    Method("exact", "the exact Hessian diagonal, one Hessian-vector product per entry (tiny models only)",
           "one double backward per parameter entry", True),
    Method("magnitude", "|w| (no curvature)", "free", False),
    Method("random", "uniformly random (a baseline)", "free", False),
    Method("layerwise-obd", "layer-wise OBD: each layer's reconstruction Hessian diagonal, "
           "h_ij = 2 sum_n x_nj^2 (Wanda's score), block by block",
           "one forward of the calibration data per block", True, "diagonal"),
    Method("layerwise-obs", "layer-wise Optimal Brain Surgeon (SparseGPT's sweep): deletions chosen and the kept "
           "weights of each row updated from the layer's full reconstruction Hessian 2 X^T X",
           "one forward of the calibration data per block, an X^T X per linear input and a Cholesky "
           "factorisation plus one column sweep per layer", True, "gram"),
)}

# The subsets each entry point accepts.
CURVATURE_METHODS: Tuple[str, ...] = ("obd", "lm", "fisher", "ggn-mc", "hutchinson", "exact")
PRUNER_METHODS: Tuple[str, ...] = CURVATURE_METHODS + ("magnitude", "random")
LAYERWISE_METHODS: Tuple[str, ...] = ("layerwise-obd", "layerwise-obs", "magnitude")
LLM_METHODS: Tuple[str, ...] = ("layerwise-obd", "layerwise-obs", "magnitude", "obd", "lm", "fisher")

# The default of prune_layerwise, prune_llm and `obd-ext prune-llm`: the method
# that measured best (bench/RESULTS.md, "Layer-wise OBS"): on both language
# models trained here it gives the lowest perplexity at 50% and under 2:4 of
# obd_ext's methods, level with llm-compressor's SparseGPT (the same algorithm;
# at most 0.002% apart), for an X^T X per input and a sweep per layer on top of
# layer-wise OBD's cost (bench: 1.4-1.6x its time).
DEFAULT_LAYERWISE_METHOD = "layerwise-obs"

# Where to go for a method an entry point does not take.
_HOMES = {
    CURVATURE_METHODS: "obd_ext.hessian_diag",
    PRUNER_METHODS: "obd_ext.Pruner.prune / obd_ext.OBDScheduler",
    LAYERWISE_METHODS: "obd_ext.layerwise.prune_layerwise",
    LLM_METHODS: "obd_ext.layerwise.prune_llm / obd-ext prune-llm",
}

SCOPES: Tuple[str, ...] = ("global", "layer", "row", "group")
LAYERWISE_SCOPES: Tuple[str, ...] = ("row", "layer", "global")


def check_method(method: str, accepted: Sequence[str], where: str) -> str:
    """Return ``method`` if ``where`` accepts it, else raise a ValueError that says where it is accepted."""
    if method in accepted:
        return method
    if method in METHODS:
        homes = [home for subset, home in _HOMES.items() if method in subset]
        raise ValueError(f"method={method!r} is not accepted by {where} (it accepts {tuple(accepted)}); "
                         f"{method!r} is accepted by {', '.join(homes)}")
    raise ValueError(f"method must be one of {tuple(accepted)} for {where}, got {method!r}")


def default_scope(layerwise: bool, method: Optional[str] = None) -> str:
    """The scope used when ``scope=None``: one rule for every entry point.

    Whole-model saliencies (``hessian_diag`` methods, magnitude, random) are
    changes of the one training loss, comparable across layers, so the
    default pools them all (``"global"``, the paper's choice). Layer-wise
    saliencies are each layer's own reconstruction error, in units that differ
    from layer to layer, so the default compares them within each output row
    (``"row"``, Wanda's choice; layer-wise pruning with ``"layer"`` or
    ``"global"`` is allowed but measured worse). The surgeon
    (``"layerwise-obs"``) is the exception: its score is the increase of the
    whole layer's error after the kept weights are updated, comparable across
    the rows of a layer, so it pools the layer (``"layer"``, SparseGPT's
    adaptive mask), which measured at or below ``"row"`` and llm-compressor's
    SparseGPT on both trained models (bench/RESULTS.md).
    """
    if not layerwise:
        return "global"
    return "layer" if method == "layerwise-obs" else "row"


def check_scope(scope: Optional[str], accepted: Sequence[str], layerwise: bool = False,
                method: Optional[str] = None) -> str:
    """The scope to use: ``scope``, or :func:`default_scope` when None; ValueError if not accepted."""
    if scope is None:
        return default_scope(layerwise, method)
    if scope not in accepted:
        raise ValueError(f"scope must be one of {tuple(accepted)} (or None for "
                         f"{default_scope(layerwise, method)!r}), got {scope!r}")
    return scope


def parse_pattern(pattern: str) -> Optional[Tuple[int, int]]:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4): keep N of every M consecutive inputs."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"([1-9][0-9]*):([1-9][0-9]*)", pattern) if isinstance(pattern, str) else None
    if match is None:  # written exactly: no spaces, signs or leading zeros
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4' or '4:8', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def check_pattern_sparsity(pattern: str, sparsity: Optional[float]) -> Optional[float]:
    """The sparsity a (pattern, sparsity) pair means; ValueError when they conflict.

    An N:M pattern fixes the sparsity at 1 - N/M: ``sparsity`` may be None or
    that value; anything else is an error, never silently replaced.
    """
    nm = parse_pattern(pattern)
    if nm is None:
        return sparsity
    implied = 1 - nm[0] / nm[1]
    if sparsity is not None and not math.isclose(float(sparsity), implied, rel_tol=0, abs_tol=1e-9):
        raise ValueError(f"pattern={pattern!r} deletes {nm[1] - nm[0]} of every {nm[1]} (sparsity {implied:g}); "
                         f"sparsity={sparsity!r} conflicts with it (leave sparsity out, or pass {implied:g})")
    return implied
