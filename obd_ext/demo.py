"""The paper's experiment (LeCun, Denker & Solla, 1989, section 2.3) on the
handwritten digits bundled with scikit-learn, averaged over several seeds.

A small constrained (weight-shared convolutional) network of scaled tanh
units, f(a) = 1.7159 tanh(2a/3), trained with MSE to +-1 targets (inside the
range of f, as in LeCun et al. 1989, so that the objective has a minimum at
finite weights), then, per seed:

- Figure 1a: training MSE (dB) against parameters remaining, deleting without
  retraining in order of OBD saliency (in small steps, the curvature of
  eq. 7 recomputed on the pruned network before each step; "obd_static" is
  the one-shot order of the trained network), of magnitude, and at random
  (mean of several draws);
- Figure 1b: the objective OBD predicts (the trained objective plus the
  saliencies of the deleted parameters, summed over the steps) against the
  actual one along the OBD order;
- Figure 2: training and test MSE (dB) and test accuracy against parameters
  remaining, for iterative deletion with retraining (obd_ext.OBDScheduler,
  --criterion, --schedule) and for the OBD deletions without retraining.

Curves are averaged over the seeds in dB (the mean of 10 log10 MSE, i.e. the
geometric mean of the MSE: the claims are stated in dB); accuracies are
arithmetic means. The claims check compares the means with the paper's four
claims and prints PASS/FAIL for each.

Writes fig1a.png, fig1b.png, fig2.png (means, with the per-seed range
shaded), results.json (means under the original keys, per-seed curves under
"per_seed", the claims check under "claims"), the saliency report of the first
seed's trained network (saliency_report.json, saliency_layers.png,
saliency_units.png) and that seed's scheduler rounds (rounds.png) into --out,
and prints the report, a summary table and the claims check.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .curvature import hessian_diag
from .ops import saliency
from .report import format_report, plot_rounds, saliency_report
from .scheduler import OBDScheduler, cubic
from .selection import prune_global_, select_scores

__all__ = ["ScaledTanh", "constrained_net", "load_data", "level_grid", "run_seed", "check_claims", "run_demo",
           "add_arguments", "DEFAULTS", "QUICK"]

# Full run: 4 seeds cost the same wall time as 3 on two cores (two at a time).
DEFAULTS: Dict[str, object] = {
    "seeds": 4, "epochs": 1500, "lr": 0.003, "retrain_steps": 100, "random_draws": 5, "levels": 17,
    "min_remaining": 0.2, "obd_step": 0.0125, "criterion": "obd", "schedule": "levels",
}
# --quick (CI): a shorter training and a 10% grid, which still has the 80%..50% and 40% levels of the claims.
QUICK: Dict[str, object] = {**DEFAULTS, "seeds": 2, "epochs": 800, "retrain_steps": 60, "random_draws": 3,
                            "levels": 9, "obd_step": 0.025}
CRITERIA = ("obd", "lm", "fisher", "magnitude")
SCHEDULES = ("levels", "cubic")
# The paper's claims (section 2.3), on the seed-averaged curves.
CLAIM_MARGIN_DB = 1.0          # OBD at least this far below magnitude ...
CLAIM_RANGE = (0.5, 0.8)       # ... at every level with this fraction of the parameters remaining
CLAIM_PREDICTED_UPTO = 0.3     # predicted within CLAIM_PREDICTION_DB of actual up to this fraction deleted
CLAIM_PREDICTION_DB = 1.0
CLAIM_RETRAIN_UPTO = 0.6       # with retraining, test accuracy within CLAIM_ACCURACY_POINTS of dense up to this deleted
CLAIM_ACCURACY_POINTS = 1.0
_EPS = 1e-9


class ScaledTanh(nn.Module):
    """LeCun's symmetric sigmoid f(a) = 1.7159 tanh(2a/3): f(+-1) = +-1, range +-1.7159.

    With +-1 targets inside the range the MSE has a minimum at finite weights;
    with plain tanh the targets are its asymptotes and training drives units
    into saturation without end (see the README).
    """

    A, S = 1.7159, 2.0 / 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A * torch.tanh(self.S * x)


def constrained_net() -> nn.Sequential:
    """Two shared-weight convolutional layers and two full layers, scaled tanh throughout (3,290 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), ScaledTanh(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), ScaledTanh(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 20), ScaledTanh(),
        nn.Linear(20, 10), ScaledTanh(),
    )


def load_data(seed: int):
    """sklearn's 1797 8x8 digits, a deterministic stratified 70/30 split, +-1 targets."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)

    def prep(a, b):
        xt = torch.tensor(a / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        t = -torch.ones(len(b), 10)
        t[torch.arange(len(b)), torch.tensor(b)] = 1.0
        return xt, t, torch.tensor(b)

    return prep(xtr, ytr), prep(xte, yte)


def level_grid(total: int, levels: int, min_remaining: float) -> List[int]:
    """``levels`` parameter counts from ``total`` down to ``min_remaining * total``, evenly spaced."""
    if levels < 2 or not 0 < min_remaining < 1:
        raise ValueError(f"need levels >= 2 and 0 < min_remaining < 1, got {levels}, {min_remaining}")
    fr = [1 - i * (1 - min_remaining) / (levels - 1) for i in range(levels)]
    return sorted({max(1, round(total * f)) for f in fr}, reverse=True)


def _db(mse: float) -> float:
    return 10.0 * math.log10(max(mse, 1e-30))


@torch.no_grad()
def _metrics(model, data) -> Dict[str, float]:
    x, t, labels = data
    out = model(x)
    return {"mse": float(((out - t) ** 2).mean()), "accuracy": float((out.argmax(1) == labels).float().mean())}


def _train(model, data, steps: int, lr: float) -> None:
    x, t, _ = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        opt.step()


def _restore(params, values) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def _delete_curve(model, scores: List[torch.Tensor], levels: List[int], train) -> List[float]:
    """Training MSE after deleting the lowest-scored entries down to each remaining count (no retraining)."""
    params = list(model.parameters())
    original = [p.detach().clone() for p in params]
    total = sum(p.numel() for p in params)
    out = []
    for remaining in levels:
        masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
        select_scores(scores, k=total - remaining, masks=masks)
        _restore(params, [o * m for o, m in zip(original, masks)])
        out.append(_metrics(model, train)["mse"])
    _restore(params, original)
    return out


def _obd_steps(model, names, train, test, levels: List[int], step: float):
    """Delete by OBD saliency down to each level without retraining, in steps of ``step`` of the parameters,
    recomputing the curvature (eq. 7) of the pruned network before each step.

    Returns the training MSE and the predicted objective (trained objective plus the summed saliencies of
    everything deleted) at each level, the test metrics there, and the most negative curvature entries
    seen in any step.
    """
    params = [model.get_parameter(n) for n in names]
    original = [p.detach().clone() for p in params]
    total = sum(p.numel() for p in params)
    masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    per_step = max(1, round(step * total))
    loss_fn = nn.MSELoss()
    actual, predicted, without, negative = [], [], [], 0
    predicted_total = _metrics(model, train)["mse"]
    deleted = 0
    for remaining in levels:
        while deleted < total - remaining:
            deleted = min(total - remaining, deleted + per_step)
            h = hessian_diag(model, loss_fn, (train[0], train[1]), method="obd", progress=False)
            negative = max(negative, h.total_negative)
            predicted_total += prune_global_(params, [h[n] for n in names], k=deleted, masks=masks).predicted_increase
        tr, te = _metrics(model, train), _metrics(model, test)
        actual.append(tr["mse"])
        predicted.append(predicted_total)
        without.append({"remaining": remaining, "train_mse": tr["mse"], "test_mse": te["mse"],
                        "test_accuracy": te["accuracy"]})
    _restore(params, original)
    return actual, predicted, without, negative


def run_seed(seed: int, cfg: Dict[str, object], out_dir: Optional[str] = None, threads: int = 0) -> Dict[str, object]:
    """The whole experiment for one seed (split, initialisation, random draws); ``cfg`` as :data:`DEFAULTS`.

    With ``out_dir`` it also writes the saliency report of the trained network there and returns it with
    the scheduler's log (the demo does this for its first seed).
    """
    t0 = time.time()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train, test = load_data(seed)
    model = constrained_net()
    _train(model, train, int(cfg["epochs"]), float(cfg["lr"]))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    params = [model.get_parameter(n) for n in names]
    total = sum(p.numel() for p in params)
    base, base_test = _metrics(model, train), _metrics(model, test)
    loss_fn = nn.MSELoss()
    levels = level_grid(total, int(cfg["levels"]), float(cfg["min_remaining"]))

    # Figure 1a/1b: deletion without retraining.
    h = hessian_diag(model, loss_fn, (train[0], train[1]), method="obd", progress=False)
    report = saliency_report(model, h, names, out_dir) if out_dir else None  # the paper's interactive tool
    static_scores = [saliency(p.detach(), h[n]) for n, p in zip(names, params)]
    curves = {"obd_static": _delete_curve(model, static_scores, levels, train),
              "magnitude": _delete_curve(model, [p.detach().abs() for p in params], levels, train)}
    gen = torch.Generator().manual_seed(seed)
    draws = int(cfg["random_draws"])
    rnd = [_delete_curve(model, [torch.rand(p.shape, generator=gen) for p in params], levels, train)
           for _ in range(draws)]
    curves["random"] = [sum(d[i] for d in rnd) / draws for i in range(len(levels))]
    flat = torch.cat([s.flatten() for s in static_scores]).double().sort().values
    static_sum = torch.cat([torch.zeros(1, dtype=torch.float64), flat.cumsum(0)])
    static_predicted = [base["mse"] + float(static_sum[total - r]) for r in levels]
    curves["obd"], predicted, without, negative = _obd_steps(model, names, train, test, levels,
                                                             float(cfg["obd_step"]))

    # Figure 2: iterative deletion with retraining, from the same trained network.
    model.load_state_dict(trained)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]) / 2)
    steps = int(cfg["retrain_steps"])

    def retrain(_round: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(train[0]), train[1]).backward()
            opt.step()

    final = 1 - levels[-1] / total
    schedule = ([1 - r / total for r in levels[1:]] if cfg["schedule"] == "levels"
                else cubic(final, len(levels) - 1))
    sched = OBDScheduler(model, loss_fn, (train[0], train[1]), retrain, schedule, optimizer=opt,
                         method=str(cfg["criterion"]), params=names, progress=False, seed=seed,
                         eval_fn=lambda: {f"test_{k}": v for k, v in _metrics(model, test).items()})
    log = sched.run()
    with_retrain = [{"remaining": total, "train_mse": base["mse"], "train_accuracy": base["accuracy"],
                     "test_mse": base_test["mse"], "test_accuracy": base_test["accuracy"]}]
    for entry in log:
        with_retrain.append({"remaining": total - round(entry["sparsity"] * total),
                             "train_mse": entry["loss_after_retrain"], "test_mse": entry["test_mse"],
                             "test_accuracy": entry["test_accuracy"]})
    out = {
        "seed": seed, "parameters": total, "trained": {"train": base, "test": base_test},
        "negative_curvature_entries": h.total_negative, "negative_curvature_entries_max_step": negative,
        "figure1a": {"remaining": levels, "train_mse": curves},
        "figure1b": {"remaining": levels, "predicted_mse": predicted, "actual_mse": curves["obd"],
                     "static_predicted_mse": static_predicted, "static_actual_mse": curves["obd_static"]},
        "figure2": {"with_retraining": with_retrain, "without_retraining": without},
        "seconds": time.time() - t0,
    }
    if out_dir:
        out["report"], out["rounds"] = report, log
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _mean_db(per_seed: Sequence[Sequence[float]]) -> List[float]:
    """Mean over seeds of each level's value in dB."""
    return [_mean([_db(v) for v in col]) for col in zip(*per_seed)]


def _aggregate(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Seed means under the single-seed result keys (MSE as the geometric mean, i.e. the mean in dB)."""
    f1 = [r["figure1a"] for r in runs]
    f1b = [r["figure1b"] for r in runs]
    mean_db = {k: _mean_db([f["train_mse"][k] for f in f1]) for k in ("obd", "obd_static", "magnitude", "random")}
    fig1b = {"remaining": f1b[0]["remaining"]}
    for key in ("predicted", "actual", "static_predicted", "static_actual"):
        d = _mean_db([f[f"{key}_mse"] for f in f1b])
        fig1b[f"{key}_db"] = d
        fig1b[f"{key}_mse"] = [10 ** (v / 10) for v in d]
    fig2 = {}
    for key in ("with_retraining", "without_retraining"):
        rows = [r["figure2"][key] for r in runs]
        fig2[key] = []
        for level in zip(*rows):
            e = {"remaining": level[0]["remaining"]}
            for m in ("train_mse", "test_mse"):
                e[m] = 10 ** (_mean([_db(x[m]) for x in level]) / 10)
            e["test_accuracy"] = _mean([x["test_accuracy"] for x in level])
            fig2[key].append(e)
    trained = {part: {m: (10 ** (_mean([_db(r["trained"][part][m]) for r in runs]) / 10) if m == "mse"
                          else _mean([r["trained"][part][m] for r in runs])) for m in ("mse", "accuracy")}
               for part in ("train", "test")}
    return {
        "parameters": runs[0]["parameters"], "seed": runs[0]["seed"], "seeds": [r["seed"] for r in runs],
        "trained": trained,
        "negative_curvature_entries": _mean([r["negative_curvature_entries"] for r in runs]),
        "figure1a": {"remaining": f1[0]["remaining"], "train_mse_db": mean_db},
        "figure1b": fig1b, "figure2": fig2,
    }


def check_claims(r: Dict[str, object]) -> Dict[str, object]:
    """The paper's four claims on the seed-averaged curves of ``r`` (as :func:`run_demo` returns).

    Levels are the grid's parameter counts: "from 80% to 50% remaining" is every level whose remaining
    fraction lies in [0.5, 0.8]; "random worst everywhere" is every level with something deleted (the grid
    stops at --min-remaining, where the figure stops); "up to 30% deleted" is every level with at least
    70% remaining; "with 60% deleted" is every retraining round with at least 40% remaining.
    """
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
          "remaining": [rem[i] for i in idx], "margin_db": margin,
          "min_margin_db": min(margin) if margin else float("nan"),
          "pass": bool(idx) and min(margin) >= CLAIM_MARGIN_DB}
    idx = [i for i, f in enumerate(frac) if f < 1 - _EPS]
    worst = [db["random"][i] - max(db["obd"][i], db["magnitude"][i]) for i in idx]
    c2 = {"claim": f"random deletion worst (above OBD and magnitude) at every level deleted, down to "
                   f"{min(frac):.0%} remaining",
          "remaining": [rem[i] for i in idx], "margin_db": worst,
          "min_margin_db": min(worst) if worst else float("nan"), "pass": bool(idx) and min(worst) > 0}
    b = r["figure1b"]
    idx = [i for i, f in enumerate(frac) if f >= 1 - CLAIM_PREDICTED_UPTO - _EPS]
    err = [b["predicted_db"][i] - b["actual_db"][i] for i in idx]
    c3 = {"claim": f"predicted objective within {CLAIM_PREDICTION_DB:g} dB of the actual one up to "
                   f"{CLAIM_PREDICTED_UPTO:.0%} deleted",
          "remaining": [rem[i] for i in idx], "error_db": err,
          "max_abs_error_db": max(abs(e) for e in err), "pass": max(abs(e) for e in err) <= CLAIM_PREDICTION_DB}
    rows = r["figure2"]["with_retraining"]
    dense = rows[0]["test_accuracy"]
    kept = [e for e in rows[1:] if e["remaining"] / total >= 1 - CLAIM_RETRAIN_UPTO - _EPS]
    drop = [100 * (dense - e["test_accuracy"]) for e in kept]
    c4 = {"claim": f"with retraining, test accuracy within {CLAIM_ACCURACY_POINTS:g} point of the dense "
                   f"network with up to {CLAIM_RETRAIN_UPTO:.0%} of the parameters deleted",
          "dense_accuracy": dense, "remaining": [e["remaining"] for e in kept],
          "accuracy": [e["test_accuracy"] for e in kept], "drop_points": drop,
          "max_drop_points": max(drop) if drop else float("nan"),
          "pass": bool(kept) and max(drop) <= CLAIM_ACCURACY_POINTS + _EPS}
    claims = {"obd_below_magnitude": c1, "random_worst": c2, "prediction": c3, "retraining": c4}
    return {**claims, "all_pass": all(c["pass"] for c in claims.values()),
            "averaging": f"means over seeds {r['seeds']}: MSE in dB (mean of 10 log10 MSE), accuracy arithmetic"}


def run_demo(out_dir: str, seed: int = 0, epochs: Optional[int] = None, retrain_steps: Optional[int] = None,
             random_draws: Optional[int] = None, levels: Optional[int] = None, progress: bool = True,
             lr: Optional[float] = None, *, seeds: Optional[int] = None, quick: Optional[bool] = None,
             min_remaining: Optional[float] = None, obd_step: Optional[float] = None,
             criterion: Optional[str] = None, schedule: Optional[str] = None,
             jobs: Optional[int] = None) -> Dict[str, object]:
    """Run the experiment for seeds ``seed .. seed + seeds - 1`` and write figures and results.json.

    An argument left as None takes the default of :data:`QUICK` (``quick``) or :data:`DEFAULTS`. ``jobs`` seeds run at once in worker processes
    (default: as many as there are CPU cores, at most one per seed).
    """
    t0 = time.time()
    explicit = {"seeds": seeds, "epochs": epochs, "lr": lr, "retrain_steps": retrain_steps,
                "random_draws": random_draws, "levels": levels, "min_remaining": min_remaining,
                "obd_step": obd_step, "criterion": criterion, "schedule": schedule}
    quick = bool(quick)
    cfg = dict(QUICK if quick else DEFAULTS)
    for k, v in explicit.items():
        if v is not None:
            cfg[k] = v
    if cfg["criterion"] not in CRITERIA or cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"criterion must be one of {CRITERIA} and schedule one of {SCHEDULES}, "
                         f"got {cfg['criterion']!r}, {cfg['schedule']!r}")
    n = int(cfg["seeds"])
    cores = os.cpu_count() or 1
    jobs = max(1, min(n, int(jobs) if jobs else cores))
    os.makedirs(out_dir, exist_ok=True)
    seed_list = [seed + i for i in range(n)]
    runs: Dict[int, Dict[str, object]] = {}

    def done(run: Dict[str, object]) -> None:
        runs[run["seed"]] = run
        if progress:
            print(f"seed {run['seed']}: {run['seconds']:.1f} s", flush=True)

    if jobs == 1:
        for s in seed_list:
            done(run_seed(s, cfg, out_dir if s == seed else None))
    else:
        # One process per seed at a time, one thread each: these small full-batch steps scale far better
        # across processes than across threads (and do not fight a loaded machine's other jobs).
        threads = max(1, cores // jobs)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_seed, s, cfg, out_dir if s == seed else None, threads) for s in seed_list]
            for f in concurrent.futures.as_completed(futures):
                done(f.result())
    ordered = [runs[s] for s in seed_list]
    first = ordered[0]
    plot_rounds(first.pop("rounds"), os.path.join(out_dir, "rounds.png"))
    report = first.pop("report")
    results = _aggregate(ordered)
    results["config"] = {**cfg, "quick": quick, "jobs": jobs}
    results["claims"] = check_claims(results)
    results["per_seed"] = ordered
    results["seconds"] = time.time() - t0
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, out_dir)
    print(format_report(report))
    _print_summary(results)
    return results


def _plot(r: Dict[str, object], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = r["per_seed"]

    def band(ax, x, per_seed, color) -> None:
        """The range over seeds, shaded."""
        if len(per_seed) > 1:
            cols = list(zip(*per_seed))
            ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.15, lw=0)

    def curves_figure(name: str, title: str, remaining, curves) -> None:
        """One panel: training MSE (dB) against parameters remaining, one line per (label, mean, per-seed, style)."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, values, per_seed, style in curves:
            line, = ax.plot(remaining, values, style, ms=3, label=label)
            band(ax, remaining, per_seed, line.get_color())
        ax.set(xlabel="parameters remaining", ylabel="training MSE (dB)",
               title=f"{title} (mean of {len(runs)} seeds)")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=80)
        plt.close(fig)

    f1 = r["figure1a"]
    curves_figure("fig1a.png", "Fig. 1a: deletion without retraining", f1["remaining"],
                  [(k, f1["train_mse_db"][k], [[_db(v) for v in s["figure1a"]["train_mse"][k]] for s in runs], st)
                   for k, st in (("obd", "-o"), ("obd_static", ":o"), ("magnitude", "-s"), ("random", "-^"))])
    f1b = r["figure1b"]
    curves_figure("fig1b.png", "Fig. 1b: predicted vs actual", f1b["remaining"],
                  [("predicted (OBD)", f1b["predicted_db"], [[_db(v) for v in s["figure1b"]["predicted_mse"]]
                                                             for s in runs], "-o"),
                   ("actual (OBD)", f1b["actual_db"], [[_db(v) for v in s["figure1b"]["actual_mse"]] for s in runs],
                    "-s"),
                   ("predicted, one-shot order", f1b["static_predicted_db"], [], ":o"),
                   ("actual, one-shot order", f1b["static_actual_db"], [], ":s")])

    f2 = r["figure2"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, style in (("with_retraining", "with retraining", "-"), ("without_retraining", "without", "--")):
        rows = f2[key]
        rem = [e["remaining"] for e in rows]
        for m, mk in (("train", "o"), ("test", "s")):
            line, = a1.plot(rem, [_db(e[f"{m}_mse"]) for e in rows], style + mk, ms=3, label=f"{m}, {label}")
            band(a1, rem, [[_db(e[f"{m}_mse"]) for e in s["figure2"][key]] for s in runs], line.get_color())
        line, = a2.plot(rem, [e["test_accuracy"] for e in rows], style + "o", ms=3, label=label)
        band(a2, rem, [[e["test_accuracy"] for e in s["figure2"][key]] for s in runs], line.get_color())
    crit = r["config"]["criterion"]
    a1.set(xlabel="parameters remaining", ylabel="MSE (dB)",
           title=f"Fig. 2: iterative {crit}, {r['config']['schedule']} (mean of {len(runs)} seeds)")
    a2.set(xlabel="parameters remaining", ylabel="test accuracy")
    for a in (a1, a2):
        a.invert_xaxis()
        a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig2.png"), dpi=80)
    plt.close(fig)


def _print_summary(r: Dict[str, object]) -> None:
    total = r["parameters"]
    f1 = r["figure1a"]
    db = f1["train_mse_db"]
    accs = ", ".join(f"{s['trained']['test']['accuracy']:.3f}" for s in r["per_seed"])
    print(f"constrained network: {total} parameters; seeds {r['seeds']} (means below: MSE in dB averaged over "
          f"seeds); trained: train MSE {_db(r['trained']['train']['mse']):.2f} dB, test accuracy "
          f"{r['trained']['test']['accuracy']:.3f} ({accs})")
    print("Figure 1 (no retraining; OBD recomputes the curvature every "
          f"{r['config']['obd_step']:.2%} of the parameters; pred = OBD's predicted objective):")
    print(f"{'remaining':>9} {'frac':>5} {'OBD dB':>7} {'static':>7} {'mag dB':>7} {'rand dB':>7} {'pred dB':>7} "
          f"{'test acc':>8}")
    nore = r["figure2"]["without_retraining"]
    for i, rem in enumerate(f1["remaining"]):
        print(f"{rem:>9} {rem / total:>5.2f} {db['obd'][i]:>7.2f} {db['obd_static'][i]:>7.2f} "
              f"{db['magnitude'][i]:>7.2f} {db['random'][i]:>7.2f} {r['figure1b']['predicted_db'][i]:>7.2f} "
              f"{nore[i]['test_accuracy']:>8.3f}")
    cfg = r["config"]
    print(f"Figure 2 (with retraining: {cfg['criterion']}, {cfg['schedule']} schedule, {cfg['retrain_steps']} "
          "steps per round):")
    print(f"{'remaining':>9} {'frac':>5} {'train dB':>8} {'test dB':>8} {'test acc':>8}")
    for e in r["figure2"]["with_retraining"]:
        print(f"{e['remaining']:>9} {e['remaining'] / total:>5.2f} {_db(e['train_mse']):>8.2f} "
              f"{_db(e['test_mse']):>8.2f} {e['test_accuracy']:>8.3f}")
    c = r["claims"]
    print(f"claims check ({c['averaging']}):")
    verdict = {True: "PASS", False: "FAIL"}
    c1, c2, c3, c4 = c["obd_below_magnitude"], c["random_worst"], c["prediction"], c["retraining"]
    print(f"  {verdict[c1['pass']]}  {c1['claim']}: smallest margin {c1['min_margin_db']:.2f} dB "
          f"(per level {', '.join(f'{m:.1f}' for m in c1['margin_db'])})")
    print(f"  {verdict[c2['pass']]}  {c2['claim']}: random at least {c2['min_margin_db']:.2f} dB above the others")
    print(f"  {verdict[c3['pass']]}  {c3['claim']}: largest error {c3['max_abs_error_db']:.2f} dB "
          f"(per level {', '.join(f'{e:+.2f}' for e in c3['error_db'])})")
    print(f"  {verdict[c4['pass']]}  {c4['claim']}: dense {c4['dense_accuracy']:.3f}, largest drop "
          f"{c4['max_drop_points']:.2f} points (lowest {min(c4['accuracy'], default=float('nan')):.3f})")
    print(f"all claims hold: {c['all_pass']}; done in {r['seconds']:.1f} s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, q = DEFAULTS, QUICK
    p.add_argument("--out", default="obd_demo_out", metavar="DIR", help="directory for the figures and results.json")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="first seed; each seed sets its run's split, initialisation and random draws (default 0)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help=f"number of seeds, S .. S + N - 1 are run and averaged (default {d['seeds']}, "
                        f"--quick {q['seeds']})")
    p.add_argument("--jobs", type=int, metavar="J",
                   help="seeds run at once, one process each (default: the number of CPU cores, at most --seeds)")
    p.add_argument("--epochs", type=int, help=f"full-batch Adam steps before pruning (default {d['epochs']}, "
                                              f"--quick {q['epochs']})")
    p.add_argument("--lr", type=float,
                   help=f"Adam learning rate of the training (default {d['lr']}; retraining uses half)")
    p.add_argument("--retrain-steps", type=int,
                   help=f"retraining steps after each deletion round of Fig. 2 (default {d['retrain_steps']}, "
                        f"--quick {q['retrain_steps']})")
    p.add_argument("--random-draws", type=int,
                   help=f"random deletion orders averaged in Fig. 1a (default {d['random_draws']}, "
                        f"--quick {q['random_draws']})")
    p.add_argument("--levels", type=int,
                   help=f"parameter counts on the figures' grid, evenly from all down to --min-remaining; also "
                        f"the rounds of Fig. 2 (default {d['levels']}: steps of 5%%, --quick {q['levels']})")
    p.add_argument("--min-remaining", type=float,
                   help=f"fraction of the parameters remaining where the grid stops (default {d['min_remaining']})")
    p.add_argument("--obd-step", type=float,
                   help=f"fraction of the parameters OBD deletes per step in Fig. 1, the curvature recomputed "
                        f"before each (default {d['obd_step']}, --quick {q['obd_step']})")
    p.add_argument("--criterion", choices=CRITERIA,
                   help="saliency of the Fig. 2 rounds with retraining (OBDScheduler's method): obd (eq. 7), "
                        "lm (Levenberg-Marquardt), fisher (empirical Fisher), magnitude (default obd)")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="Fig. 2 rounds: levels (one round per grid level) or cubic (obd_ext.scheduler.cubic to "
                        "the same final sparsity in the same number of rounds) (default levels)")
    p.add_argument("--quick", action="store_true",
                   help="reduced run for CI (fewer seeds, epochs, levels and steps; about a quarter of the time); "
                        "options given explicitly still apply")
    p.add_argument("--no-progress", action="store_true", help="hide the per-seed progress lines")
