"""What an optimizer's state holds at a deleted (frozen) entry, and why.

A deleted weight stays at zero because its gradient is masked to zero and the
state that carries an update (momentum, Adam's first moment) is zeroed when it
is deleted: for the optimizers in :data:`ZERO_PRESERVING` the update of that
entry is then exactly zero every step.

Second moments are different: they only divide that zero update, so any
positive value there leaves the weight exactly where it is. Left at zero they
cost time on the CPU: torch's CPU square root takes a slow path on exact zeros
(5x slower than on other values, measured over 10M float32 entries on the
project's AMD EPYC, torch 2.13.0+cpu) and on subnormals (40x), and Adam's
``exp_avg_sq.sqrt()`` runs over every deleted entry every step. That was most
of the cost of freezing a 90%-pruned MLP's AdamW step (bench/RESULTS.md). So
on the CPU a deleted entry's second moment is *held* at :func:`held_value`
instead of zero:

- ``sqrt(smallest normal number)`` of the state's dtype (2^-63 in float32 and
  bfloat16, 2^-7 in float16): in float32 its square root (3e-10) is below the
  usual ``eps`` (1e-8), so even a saved state reused without the Pruner
  would behave almost like a fresh (zero) entry; the Pruner itself resets it
  whenever it stops freezing the entry;
- re-set every :func:`rearm_period` steps, before the optimizer's decay
  (``beta2`` per step) can take it down to subnormal.

Everything else at a deleted entry is zeroed when it is deleted, and
:class:`Pruner` gives the entries it stops freezing (``revive``,
``remove_hooks``, ``finalize``, masks loaded with fewer deletions) the state a
new parameter would have (:func:`fresh_value`). On other devices the square root has no
such path, and the held entries stay at zero.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ZERO_PRESERVING", "preserves_zero", "scale_keys", "fresh_value", "held_keys", "held_value",
           "rearm_period", "holds", "groups_of"]

# Optimizers whose step leaves an entry at exactly zero when its gradient, its
# update-carrying state and its weight are zero: every update term is a
# product with the gradient or a state that only grows from it, and weight
# decay multiplies the weight (SGD: buf = mu buf + g + wd w; Adam/AdamW/
# Adamax/NAdam/RAdam: m and v from g, update m / (sqrt(v) + eps), decoupled
# decay w (1 - lr wd); Adagrad, Adadelta, RMSprop: g over an accumulator;
# Rprop: sign(g) step; ASGD: w (1 - lambda eta) - eta g, ax moves toward w;
# Adafactor: g over a factored second moment). tests/test_pruning.py and
# tests/test_pruner_state.py check each one by property. LBFGS (flat history
# of steps) and Muon (orthogonalises the whole update) mix entries, so they
# are not in this list.
ZERO_PRESERVING = tuple(getattr(torch.optim, n) for n in (
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Rprop", "ASGD",
    "Adafactor") if hasattr(torch.optim, n))


def preserves_zero(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt``'s step provably leaves a deleted entry at zero (see ZERO_PRESERVING; exact types only).

    Their updates divide a zero by a denominator that ``eps`` keeps positive;
    an ``eps`` of 0, or one that rounds to 0 in the parameter's dtype (1e-8 in
    float16), makes it 0 / 0 = NaN, so such an optimizer is treated like any
    other: the Pruner re-zeroes after its steps.
    """
    if type(opt) not in ZERO_PRESERVING:  # a subclass may change the step (add noise, mix entries)
        return False
    for group in opt.param_groups:
        eps = group.get("eps")
        values = [float(e) for e in (eps if isinstance(eps, (tuple, list)) else (eps,)) if e is not None]
        for dtype in {p.dtype for p in group["params"]} if values else ():
            if not all(_positive_in(e, dtype) for e in values):
                return False
    return True


@functools.lru_cache(maxsize=64)
def _positive_in(value: float, dtype: torch.dtype) -> bool:
    # Asked after every step: cached, so the step pays no tensor creation.
    return torch.tensor(value, dtype=dtype).item() > 0


# What a fresh parameter's state holds, where it is not zero: an entry the
# Pruner stops freezing (revive, remove_hooks) is reset to it.
_FRESH: Tuple[Tuple[type, str, Callable[[dict], float]], ...] = (
    (torch.optim.Rprop, "step_size", lambda group: group["lr"]),
    (torch.optim.Adagrad, "sum", lambda group: group["initial_accumulator_value"]),
)


def scale_keys(opt: torch.optim.Optimizer) -> Tuple[str, ...]:
    """State keys whose value at a deleted entry cannot move it (they scale a zero update), besides the held ones.

    Rprop's step size multiplies sign(0) = 0 (and Rprop itself clamps it to
    its minimum there every step); a state loaded after attaching keeps them.
    """
    return ("step_size",) if type(opt) is torch.optim.Rprop else ()


def fresh_value(opt: torch.optim.Optimizer, group: dict, key: str) -> float:
    """The value ``opt`` gives state ``key`` of a new parameter of ``group`` (0 unless listed in _FRESH)."""
    for cls, k, value in _FRESH:
        if isinstance(opt, cls) and key == k:
            return float(value(group))
    return 0.0


# Per optimizer class: the state keys whose square root divides the update,
# and the factor that state decays by per step when its gradient is zero (1:
# it never decays). Matched by exact type: a subclass may use its state
# otherwise, and zeros are always safe. Adadelta takes sqrt(v + eps) and
# Adamax no root at all, so they need nothing held.
_HELD: Tuple[Tuple[type, Tuple[str, ...], Callable[[dict], float]], ...] = (
    (torch.optim.Adam, ("exp_avg_sq", "max_exp_avg_sq"), lambda group: group["betas"][1]),
    (torch.optim.AdamW, ("exp_avg_sq", "max_exp_avg_sq"), lambda group: group["betas"][1]),
    (torch.optim.NAdam, ("exp_avg_sq",), lambda group: group["betas"][1]),
    (torch.optim.RAdam, ("exp_avg_sq",), lambda group: group["betas"][1]),
    (torch.optim.RMSprop, ("square_avg",), lambda group: group["alpha"]),
    (torch.optim.Adagrad, ("sum",), lambda group: 1.0),
)

# Below this many steps between re-arms (a decay under about 0.25 in float32)
# the re-arming pass would cost about what it saves: such groups hold zeros.
_MIN_PERIOD = 16


def _entry(opt: torch.optim.Optimizer):
    for cls, keys, decay in _HELD:
        if type(opt) is cls:
            return keys, decay
    return None


def held_keys(opt: torch.optim.Optimizer) -> Tuple[str, ...]:
    """The state keys of ``opt`` held positive at deleted entries (empty for other optimizers)."""
    entry = _entry(opt)
    return entry[0] if entry else ()


def held_value(dtype: torch.dtype) -> float:
    """The square root of the smallest normal number of ``dtype``: a power of two, exact in it."""
    return math.sqrt(torch.finfo(dtype).tiny)


def rearm_period(decay: float, dtype: torch.dtype) -> Optional[int]:
    """Steps between re-arms so that ``held_value * decay**period >= sqrt(held_value * tiny)``.

    That is half the headroom between the held value and the smallest normal
    number, so a state re-set every ``period`` steps never turns subnormal.
    Returns 0 for a state that never decays, None where holding is not worth it
    (a decay at or below 0, or so fast that the period is under 16 steps).
    """
    if decay >= 1.0:
        return 0
    if not decay > 0.0:
        return None
    headroom = math.log(held_value(dtype) / torch.finfo(dtype).tiny)
    period = int(headroom / (2.0 * -math.log(decay)))
    return period if period >= _MIN_PERIOD else None


def holds(opt: torch.optim.Optimizer, group: dict, param: Tensor) -> Optional[int]:
    """The re-arm period if ``param``'s held keys are held positive under ``opt``, else None."""
    entry = _entry(opt)
    if entry is None or param.device.type != "cpu" or not param.is_floating_point():
        return None
    return rearm_period(float(entry[1](group)), param.dtype)


def groups_of(opt: torch.optim.Optimizer) -> Dict[int, dict]:
    """id(parameter) -> its param group."""
    return {id(p): g for g in opt.param_groups for p in g["params"]}
