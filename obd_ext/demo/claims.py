"""The paper's four claims (section 2.3), checked on the seed-averaged curves of a demo run.

1. ``obd_below_magnitude``: deleting without retraining, OBD's training MSE is at least
   :data:`CLAIM_MARGIN_DB` below magnitude's at every grid level from 80% to 50% of the parameters
   remaining;
2. ``random_worst``: random deletion's MSE is above both OBD's and magnitude's at every level with
   something deleted;
3. ``prediction``: OBD's predicted objective is within :data:`CLAIM_PREDICTION_DB` of the actual one at
   every level with at most 30% deleted;
4. ``retraining``: with retraining, test accuracy is at most :data:`CLAIM_ACCURACY_POINTS` below the
   dense network's at every round with at most 60% deleted.

A claim is checked only where the run can establish it; otherwise it is *skipped*, with the reason, and
never reported as failed. Claim 1 is about the trained network's minimum: OBD's lead over magnitude at
light deletion grows as training approaches the minimum (the extremal approximation of eq. 7 holds
there), so it needs the full training, :data:`FULL_TRAINING_EPOCHS` epochs. ``--quick`` trains 800
(about 6 dB above the full run's training MSE), where the lead at 80% remaining is under 1 dB even though
OBD is still below magnitude; a quick run therefore skips claim 1 and checks the other three. A claim
whose range holds no level of the run's grid is skipped too.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from .config import DEFAULTS

__all__ = ["CLAIMS", "CLAIM_MARGIN_DB", "CLAIM_RANGE", "CLAIM_PREDICTED_UPTO", "CLAIM_PREDICTION_DB",
           "CLAIM_RETRAIN_UPTO", "CLAIM_ACCURACY_POINTS", "FULL_TRAINING_EPOCHS", "check_claims", "format_claims"]

CLAIMS = ("obd_below_magnitude", "random_worst", "prediction", "retraining")
CLAIM_MARGIN_DB = 1.0          # OBD at least this far below magnitude ...
CLAIM_RANGE = (0.5, 0.8)       # ... at every level with this fraction of the parameters remaining
CLAIM_PREDICTED_UPTO = 0.3     # predicted within CLAIM_PREDICTION_DB of actual up to this fraction deleted
CLAIM_PREDICTION_DB = 1.0
CLAIM_RETRAIN_UPTO = 0.6       # with retraining, test accuracy within CLAIM_ACCURACY_POINTS of dense up to this deleted
CLAIM_ACCURACY_POINTS = 1.0
# Claim 1 needs the network trained to (near) its minimum: the full run's training.
FULL_TRAINING_EPOCHS = int(DEFAULTS["epochs"])
_EPS = 1e-9


def _verdict(claim: Dict[str, object], holds: bool, skip: Optional[str]) -> Dict[str, object]:
    """Set ``pass`` (None when skipped), ``status`` and, when skipped, ``skipped_because``."""
    if skip:
        claim.update({"pass": None, "status": "skipped", "skipped_because": skip})
    else:
        claim.update({"pass": bool(holds), "status": "pass" if holds else "fail"})
    return claim


def check_claims(r: Dict[str, object]) -> Dict[str, object]:
    """The paper's four claims on the seed-averaged curves of ``r`` (as :func:`obd_ext.demo.run_demo` returns).

    Levels are the grid's parameter counts: "from 80% to 50% remaining" is every level whose remaining
    fraction lies in [0.5, 0.8]; "random worst everywhere" is every level with something deleted (the grid
    stops at --min-remaining, where the figure stops); "up to 30% deleted" is every level with at least
    70% remaining; "with 60% deleted" is every retraining round with at least 40% remaining.

    Args:
        r: the seed means, with ``config`` (the run's settings: ``epochs`` decides whether claim 1 can
            be checked).

    Returns:
        One entry per claim of :data:`CLAIMS`: ``claim`` (the statement), ``measured`` and ``threshold``
        (what was compared with what, in words), ``remaining`` (the levels it covers), the per-level
        numbers, ``status`` ("pass", "fail" or "skipped"), ``pass`` (None when skipped) and, when skipped,
        ``skipped_because``; then ``checked`` and ``skipped`` (claim keys), ``all_pass`` (every checked
        claim holds; False when none was checked) and ``averaging``.
    """
    epochs = int(r["config"]["epochs"])
    total = r["parameters"]
    f1 = r["figure1a"]
    rem = f1["remaining"]
    frac = [x / total for x in rem]
    db = f1["train_mse_db"]

    lo, hi = CLAIM_RANGE
    idx = [i for i, f in enumerate(frac) if lo - _EPS <= f <= hi + _EPS]
    margin = [db["magnitude"][i] - db["obd"][i] for i in idx]
    c1 = {"claim": f"OBD's training MSE at least {CLAIM_MARGIN_DB:g} dB below magnitude's at every level from "
                   f"{hi:.0%} to {lo:.0%} of the parameters remaining",
          "measured": "smallest margin of OBD below magnitude (dB)", "threshold": f">= {CLAIM_MARGIN_DB:g} dB",
          "remaining": [rem[i] for i in idx], "margin_db": margin,
          "min_margin_db": min(margin) if margin else float("nan")}
    skip = None
    if epochs < FULL_TRAINING_EPOCHS:
        skip = (f"needs the full training ({FULL_TRAINING_EPOCHS} epochs, the default without --quick; this run "
                f"trained {epochs}): OBD's lead over magnitude at light deletion shows at the trained minimum")
    elif not idx:
        skip = f"the grid has no level with {hi:.0%} to {lo:.0%} of the parameters remaining"
    _verdict(c1, bool(margin) and min(margin) >= CLAIM_MARGIN_DB, skip)

    idx = [i for i, f in enumerate(frac) if f < 1 - _EPS]
    worst = [db["random"][i] - max(db["obd"][i], db["magnitude"][i]) for i in idx]
    c2 = {"claim": f"random deletion worst (above OBD and magnitude) at every level deleted, down to "
                   f"{min(frac):.0%} remaining",
          "measured": "smallest margin of random above the higher of OBD and magnitude (dB)", "threshold": "> 0 dB",
          "remaining": [rem[i] for i in idx], "margin_db": worst,
          "min_margin_db": min(worst) if worst else float("nan")}
    _verdict(c2, bool(worst) and min(worst) > 0, None if idx else "the grid has no level with something deleted")

    b = r["figure1b"]
    idx = [i for i, f in enumerate(frac) if f >= 1 - CLAIM_PREDICTED_UPTO - _EPS]
    err = [b["predicted_db"][i] - b["actual_db"][i] for i in idx]
    c3 = {"claim": f"predicted objective within {CLAIM_PREDICTION_DB:g} dB of the actual one up to "
                   f"{CLAIM_PREDICTED_UPTO:.0%} deleted",
          "measured": "largest |predicted - actual| training MSE (dB)", "threshold": f"<= {CLAIM_PREDICTION_DB:g} dB",
          "remaining": [rem[i] for i in idx], "error_db": err,
          "max_abs_error_db": max(abs(e) for e in err) if err else float("nan")}
    deleted_levels = [i for i in idx if frac[i] < 1 - _EPS]
    _verdict(c3, bool(err) and max(abs(e) for e in err) <= CLAIM_PREDICTION_DB,
             None if deleted_levels else f"the grid has no level with between 0% and {CLAIM_PREDICTED_UPTO:.0%} "
                                         "deleted")

    rows = r["figure2"]["with_retraining"]
    dense = rows[0]["test_accuracy"]
    kept = [e for e in rows[1:] if e["remaining"] / total >= 1 - CLAIM_RETRAIN_UPTO - _EPS]
    drop = [100 * (dense - e["test_accuracy"]) for e in kept]
    c4 = {"claim": f"with retraining, test accuracy within {CLAIM_ACCURACY_POINTS:g} point of the dense "
                   f"network with up to {CLAIM_RETRAIN_UPTO:.0%} of the parameters deleted",
          "measured": "largest drop of test accuracy below the dense network's (points)",
          "threshold": f"<= {CLAIM_ACCURACY_POINTS:g} point",
          "dense_accuracy": dense, "remaining": [e["remaining"] for e in kept],
          "accuracy": [e["test_accuracy"] for e in kept], "drop_points": drop,
          "max_drop_points": max(drop) if drop else float("nan")}
    _verdict(c4, bool(kept) and max(drop) <= CLAIM_ACCURACY_POINTS + _EPS,
             None if kept else f"no retraining round with up to {CLAIM_RETRAIN_UPTO:.0%} deleted")

    claims = dict(zip(CLAIMS, (c1, c2, c3, c4)))
    checked = [k for k, c in claims.items() if c["status"] != "skipped"]
    return {**claims, "checked": checked, "skipped": [k for k in CLAIMS if k not in checked],
            "all_pass": bool(checked) and all(claims[k]["pass"] for k in checked),
            "averaging": f"means over seeds {r['seeds']}: MSE in dB (mean of 10 log10 MSE), accuracy arithmetic"}


def _per_level(values: List[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def format_claims(c: Dict[str, object]) -> str:
    """The claims check as printed: one line per claim (verdict, statement, measured value against its
    threshold), skipped claims with their reason, and a last line counting what was checked."""
    c1, c2, c3, c4 = (c[k] for k in CLAIMS)
    # (the measured value, the per-level detail) of each claim
    measured = {
        "obd_below_magnitude": (f"smallest margin {c1['min_margin_db']:.2f} dB",
                                f"per level {_per_level(c1['margin_db'], '.1f')}"),
        "random_worst": (f"random at least {c2['min_margin_db']:.2f} dB above the others", ""),
        "prediction": (f"largest error {c3['max_abs_error_db']:.2f} dB",
                       f"per level {_per_level(c3['error_db'], '+.2f')}"),
        "retraining": (f"dense {c4['dense_accuracy']:.3f}, largest drop {c4['max_drop_points']:.2f} points",
                       f"lowest {min(c4['accuracy'], default=float('nan')):.3f}"),
    }
    lines = [f"claims check ({c['averaging']}):"]
    for key in CLAIMS:
        claim = c[key]
        value, detail = measured[key]
        if claim["status"] == "skipped":
            lines.append(f"  SKIP  {claim['claim']}: not checked, {claim['skipped_because']}")
            if claim["remaining"]:
                lines.append(f"        (for information, this run measured: {value})")
        else:
            needs = f"needs {claim['threshold']}" + (f"; {detail}" if detail else "")
            lines.append(f"  {claim['status'].upper()}  {claim['claim']}: {value} ({needs})")
    checked, skipped = c["checked"], c["skipped"]
    held = [k for k in checked if c[k]["pass"]]
    if not skipped:
        last = (f"all {len(checked)} claims hold" if c["all_pass"] else
                f"{len(held)} of {len(checked)} claims hold (failed: {', '.join(k for k in checked if k not in held)})")
    else:
        last = (f"{len(held)} of the {len(checked)} claims checked hold; skipped {len(skipped)} this run cannot "
                f"establish: {', '.join(skipped)}")
    lines.append(last)
    return "\n".join(lines)
