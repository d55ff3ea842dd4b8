"""The demo's runs: train the network of one seed, delete without and with retraining, and average seeds.

One seed (:func:`run_seed`) gives the curves of Figures 1a, 1b and 2 as raw MSE; :func:`aggregate`
averages seeds in dB (the mean of 10 log10 MSE, i.e. the geometric mean of the MSE, because the claims
are stated in dB) and accuracies arithmetically.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..curvature import hessian_diag
from ..models import constrained_net
from ..ops import saliency
from ..report import saliency_report
from ..scheduler import OBDScheduler, cubic
from ..selection import prune_global_, select_scores
from .data import Split, load_data

__all__ = ["level_grid", "db", "run_seed", "aggregate"]


def level_grid(total: int, levels: int, min_remaining: float) -> List[int]:
    """``levels`` parameter counts from ``total`` down to ``min_remaining * total``, evenly spaced."""
    if levels < 2 or not 0 < min_remaining < 1:
        raise ValueError(f"need levels >= 2 and 0 < min_remaining < 1, got {levels}, {min_remaining}")
    fr = [1 - i * (1 - min_remaining) / (levels - 1) for i in range(levels)]
    return sorted({max(1, round(total * f)) for f in fr}, reverse=True)


def db(mse: float) -> float:
    """``10 log10 mse`` (MSE in decibels), with the MSE floored at 1e-30."""
    return 10.0 * math.log10(max(mse, 1e-30))


@torch.no_grad()
def _metrics(model: nn.Module, data: Split) -> Dict[str, float]:
    x, t, labels = data
    out = model(x)
    return {"mse": float(((out - t) ** 2).mean()), "accuracy": float((out.argmax(1) == labels).float().mean())}


def _train(model: nn.Module, data: Split, steps: int, lr: float) -> None:
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


def _delete_curve(model: nn.Module, scores: List[torch.Tensor], levels: List[int], train: Split) -> List[float]:
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


def _obd_steps(model: nn.Module, names: List[str], train: Split, test: Split, levels: List[int], step: float):
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
    """The whole experiment for one seed (split, initialisation, random draws).

    Args:
        seed: sets the split, the initialisation and the random deletion orders.
        cfg: the settings, as :func:`obd_ext.demo.config.resolve_config` returns them.
        out_dir: where to write the saliency report of the trained network; with it the result also
            holds that report (``"report"``) and the scheduler's log (``"rounds"``). The demo does this
            for its first seed.
        threads: torch threads for this run (0: leave as is).

    Returns:
        The seed's curves as raw MSE under ``figure1a``, ``figure1b`` and ``figure2``.
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
                         method=str(cfg["method"]), params=names, progress=False, seed=seed,
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
    return [_mean([db(v) for v in col]) for col in zip(*per_seed)]


def aggregate(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Seed means under the single-seed result keys (MSE as the geometric mean, i.e. the mean in dB).

    Args:
        runs: :func:`run_seed` results, the first seed first.
    """
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
                e[m] = 10 ** (_mean([db(x[m]) for x in level]) / 10)
            e["test_accuracy"] = _mean([x["test_accuracy"] for x in level])
            fig2[key].append(e)
    trained = {part: {m: (10 ** (_mean([db(r["trained"][part][m]) for r in runs]) / 10) if m == "mse"
                          else _mean([r["trained"][part][m] for r in runs])) for m in ("mse", "accuracy")}
               for part in ("train", "test")}
    return {
        "parameters": runs[0]["parameters"], "seed": runs[0]["seed"], "seeds": [r["seed"] for r in runs],
        "trained": trained,
        "negative_curvature_entries": _mean([r["negative_curvature_entries"] for r in runs]),
        "figure1a": {"remaining": f1[0]["remaining"], "train_mse_db": mean_db},
        "figure1b": fig1b, "figure2": fig2,
    }
