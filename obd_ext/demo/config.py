"""The demo's settings: the full run, the quick run, and the choices it accepts."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

from ..vocabulary import check_method

__all__ = ["DEFAULTS", "QUICK", "METHODS", "SCHEDULES", "resolve_config"]

# Full run: 4 seeds cost the same wall time as 3 on two cores (two at a time).
DEFAULTS: Dict[str, object] = {
    "seeds": 4, "epochs": 1500, "lr": 0.003, "retrain_steps": 100, "random_draws": 5, "levels": 17,
    "min_remaining": 0.2, "obd_step": 0.0125, "method": "obd", "schedule": "levels",
}
# --quick (CI): a shorter training and a 10% grid, which still has the 80%..50% and 40% levels of the claims.
QUICK: Dict[str, object] = {**DEFAULTS, "seeds": 2, "epochs": 800, "retrain_steps": 60, "random_draws": 3,
                            "levels": 9, "obd_step": 0.025}
# The saliencies the Fig. 2 rounds may use: OBDScheduler's methods that make sense for this small network
# (the sampling estimators and the exact diagonal add nothing here; random is Fig. 1a's baseline).
METHODS = ("obd", "lm", "fisher", "magnitude")
SCHEDULES = ("levels", "cubic")

_POSITIVE_INTS = ("seeds", "epochs", "random_draws")


def resolve_config(quick: bool = False, explicit: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
    """The settings of a run: :data:`QUICK` or :data:`DEFAULTS`, overridden by the non-None ``explicit`` values.

    Raises:
        ValueError: for an unknown key or a value out of range, naming the option and the value.
    """
    cfg = dict(QUICK if quick else DEFAULTS)
    for key, value in (explicit or {}).items():
        if key not in cfg:
            raise ValueError(f"unknown demo setting {key!r}; the settings are {tuple(cfg)}")
        if value is not None:
            cfg[key] = value
    check_method(str(cfg["method"]), METHODS, "obd-ext demo")
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg['schedule']!r}")
    for key in _POSITIVE_INTS:
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be at least 1, got {cfg[key]!r}")
    if int(cfg["retrain_steps"]) < 0:
        raise ValueError(f"retrain_steps must be at least 0, got {cfg['retrain_steps']!r}")
    if int(cfg["levels"]) < 2:
        raise ValueError(f"levels must be at least 2, got {cfg['levels']!r}")
    if not 0 < float(cfg["min_remaining"]) < 1:
        raise ValueError(f"min_remaining must lie in (0, 1), got {cfg['min_remaining']!r}")
    if not 0 < float(cfg["obd_step"]) <= 1:
        raise ValueError(f"obd_step must lie in (0, 1], got {cfg['obd_step']!r}")
    if not float(cfg["lr"]) > 0:
        raise ValueError(f"lr must be positive, got {cfg['lr']!r}")
    return cfg
