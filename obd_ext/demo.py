"""The paper's experiment (LeCun, Denker & Solla, 1989, section 2.3) on the
handwritten digits bundled with scikit-learn.

A small constrained (weight-shared convolutional) tanh network trained with
MSE to +-1 targets, then:

- Figure 1a: training MSE (dB) against parameters remaining, deleting in
  order of OBD saliency (step by step, the curvature recomputed on the pruned
  network after each step; "obd_static" is the one-shot order of the trained
  network), of magnitude, and at random (mean of several draws), without
  retraining;
- Figure 1b: the objective predicted by OBD (the trained objective plus the
  sum of the deleted saliencies, step by step) against the actual one, along
  the OBD order;
- Figure 2: training and test MSE (dB) and test accuracy against parameters
  remaining, for iterative OBD with retraining (obd_ext.OBDScheduler) and
  without retraining.

Writes fig1a.png, fig1b.png, fig2.png, results.json, the saliency report of
the trained network (saliency_report.json, saliency_layers.png,
saliency_units.png) and the scheduler's predicted-vs-actual rounds
(rounds.png) into --out, and prints the report and a summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List

import torch
import torch.nn as nn

from .curvature import hessian_diag
from .ops import saliency
from .report import format_report, plot_rounds, saliency_report
from .scheduler import OBDScheduler
from .selection import prune_global_, select_scores

__all__ = ["constrained_net", "load_data", "run_demo", "add_arguments"]


def constrained_net() -> nn.Sequential:
    """Two shared-weight convolutional layers and two full layers, tanh throughout (about 3,300 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 20), nn.Tanh(),
        nn.Linear(20, 10), nn.Tanh(),
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


def _delete_curve(model, scores: List[torch.Tensor], levels: List[int], train) -> List[float]:
    """Training MSE after deleting the lowest-scored entries down to each remaining count (no retraining)."""
    params = list(model.parameters())
    original = [p.detach().clone() for p in params]
    total = sum(p.numel() for p in params)
    out = []
    for remaining in levels:
        masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
        select_scores(scores, k=total - remaining, masks=masks)
        with torch.no_grad():
            for p, o, m in zip(params, original, masks):
                p.copy_(o * m)
        out.append(_metrics(model, train)["mse"])
    with torch.no_grad():
        for p, o in zip(params, original):
            p.copy_(o)
    return out


def run_demo(out_dir: str, seed: int = 0, epochs: int = 1500, retrain_steps: int = 150, random_draws: int = 5,
             levels: int = 20, progress: bool = True, lr: float = 0.01) -> Dict[str, object]:
    """Run the experiment and write its figures and results.json into ``out_dir``."""
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    train, test = load_data(seed)
    model = constrained_net()
    _train(model, train, epochs, lr)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    params = [model.get_parameter(n) for n in names]
    total = sum(p.numel() for p in params)
    base = _metrics(model, train)
    loss_fn = nn.MSELoss()
    h = hessian_diag(model, loss_fn, (train[0], train[1]), method="obd", progress=progress)
    report = saliency_report(model, h, names, out_dir)  # the paper's interactive tool, as a table and charts
    # OBD: delete step by step in order of saliency, recomputing the curvature
    # of the pruned network after each step (no retraining); the one-shot order
    # from the trained network is kept as "obd_static" for comparison.
    remaining_levels = sorted({max(1, round(total * (1 - i / levels))) for i in range(levels)}, reverse=True)
    obd_scores = [saliency(p.detach(), h[n]) for n, p in zip(names, params)]
    curves = {"obd_static": _delete_curve(model, obd_scores, remaining_levels, train),
              "magnitude": _delete_curve(model, [p.detach().abs() for p in params], remaining_levels, train)}
    gen = torch.Generator().manual_seed(seed)
    draws = [_delete_curve(model, [torch.rand(p.shape, generator=gen) for p in params], remaining_levels, train)
             for _ in range(random_draws)]
    curves["random"] = [sum(d[i] for d in draws) / random_draws for i in range(len(remaining_levels))]
    masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    obd_curve, predicted, without = [], [], []
    predicted_total = base["mse"]
    for remaining in remaining_levels:
        hk = hessian_diag(model, loss_fn, (train[0], train[1]), method="obd", progress=False)
        sel = prune_global_(params, [hk[n] for n in names], k=total - remaining, masks=masks)
        predicted_total += sel.predicted_increase
        tr, te = _metrics(model, train), _metrics(model, test)
        obd_curve.append(tr["mse"])
        predicted.append(predicted_total)
        without.append({"remaining": remaining, "train_mse": tr["mse"], "test_mse": te["mse"],
                        "test_accuracy": te["accuracy"]})
    curves["obd"] = obd_curve

    # Figure 2: iterative OBD with retraining, against the same deletions without retraining.
    model.load_state_dict(trained)
    opt = torch.optim.Adam(model.parameters(), lr=lr / 2)

    def retrain(_round: int) -> None:
        for _ in range(retrain_steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(train[0]), train[1]).backward()
            opt.step()

    model.load_state_dict(trained)
    schedule = [1 - r / total for r in remaining_levels[1:]]
    sched = OBDScheduler(model, loss_fn, (train[0], train[1]), retrain, schedule, optimizer=opt, method="obd",
                         params=names, progress=progress, seed=seed,
                         eval_fn=lambda: {f"test_{k}": v for k, v in _metrics(model, test).items()})
    log = sched.run()
    plot_rounds(log, os.path.join(out_dir, "rounds.png"))
    with_retrain = [{"remaining": total, **{f"train_{k}": v for k, v in base.items()},
                     **{f"test_{k}": v for k, v in _metrics_at(trained, test).items()}}]
    for entry, remaining in zip(log, remaining_levels[1:]):
        with_retrain.append({"remaining": remaining, "train_mse": entry["loss_after_retrain"],
                             "test_mse": entry["test_mse"], "test_accuracy": entry["test_accuracy"]})
    results = {
        "parameters": total, "seed": seed, "trained": {"train": base, "test": _metrics_at(trained, test)},
        "negative_curvature_entries": h.total_negative,
        "figure1a": {"remaining": remaining_levels,
                     "train_mse_db": {k: [_db(v) for v in c] for k, c in curves.items()}},
        "figure1b": {"remaining": remaining_levels, "predicted_mse": predicted, "actual_mse": curves["obd"]},
        "figure2": {"with_retraining": with_retrain, "without_retraining": without},
        "seconds": time.time() - t0,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, out_dir)
    print(format_report(report))
    _print_summary(results)
    return results


def _metrics_at(state, data) -> Dict[str, float]:
    model = constrained_net()
    model.load_state_dict(state)
    return _metrics(model, data)


def _plot(r: Dict[str, object], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curves_figure(name: str, title: str, remaining, curves) -> None:
        """One panel: training MSE (dB) against parameters remaining, one line per (label, values, style)."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, values, style in curves:
            ax.plot(remaining, values, style, ms=3, label=label)
        ax.set(xlabel="parameters remaining", ylabel="training MSE (dB)", title=title)
        ax.invert_xaxis()
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)

    f1 = r["figure1a"]
    curves_figure("fig1a.png", "Fig. 1a: deletion without retraining", f1["remaining"],
                  [(k, f1["train_mse_db"][k], st) for k, st in
                   (("obd", "-o"), ("obd_static", ":o"), ("magnitude", "-s"), ("random", "-^"))])
    f1b = r["figure1b"]
    curves_figure("fig1b.png", "Fig. 1b: predicted vs actual objective", f1b["remaining"],
                  [("predicted (OBD)", [_db(v) for v in f1b["predicted_mse"]], "-o"),
                   ("actual", [_db(v) for v in f1b["actual_mse"]], "-s")])

    f2 = r["figure2"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, style in (("with_retraining", "with retraining", "-"), ("without_retraining", "without", "--")):
        rows = f2[key]
        rem = [e["remaining"] for e in rows]
        a1.plot(rem, [_db(e["train_mse"]) for e in rows], style + "o", ms=3, label=f"train, {label}")
        a1.plot(rem, [_db(e["test_mse"]) for e in rows], style + "s", ms=3, label=f"test, {label}")
        a2.plot(rem, [e["test_accuracy"] for e in rows], style + "o", ms=3, label=label)
    a1.set(xlabel="parameters remaining", ylabel="MSE (dB)", title="Fig. 2: iterative OBD")
    a2.set(xlabel="parameters remaining", ylabel="test accuracy")
    for a in (a1, a2):
        a.invert_xaxis()
        a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig2.png"), dpi=120)
    plt.close(fig)


def _print_summary(r: Dict[str, object]) -> None:
    f1 = r["figure1a"]
    print(f"constrained network: {r['parameters']} parameters; trained: train MSE {r['trained']['train']['mse']:.4f}, "
          f"test accuracy {r['trained']['test']['accuracy']:.3f}")
    print(f"{'remaining':>9} {'OBD dB':>8} {'mag dB':>8} {'rand dB':>8} {'pred dB':>8} "
          f"{'retrain test acc':>16} {'no-retrain test acc':>19}")
    retr = {e["remaining"]: e for e in r["figure2"]["with_retraining"]}
    nore = {e["remaining"]: e for e in r["figure2"]["without_retraining"]}
    for i, rem in enumerate(f1["remaining"]):
        print(f"{rem:>9} {f1['train_mse_db']['obd'][i]:>8.2f} {f1['train_mse_db']['magnitude'][i]:>8.2f} "
              f"{f1['train_mse_db']['random'][i]:>8.2f} {_db(r['figure1b']['predicted_mse'][i]):>8.2f} "
              f"{retr[rem]['test_accuracy'] if rem in retr else float('nan'):>16.3f} "
              f"{nore[rem]['test_accuracy']:>19.3f}")
    print(f"done in {r['seconds']:.1f} s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="obd_demo_out", help="directory for the figures and results.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the draws")
    p.add_argument("--epochs", type=int, default=1500, help="full-batch training steps before pruning")
    p.add_argument("--retrain-steps", type=int, default=150, help="retraining steps after each deletion round")
    p.add_argument("--random-draws", type=int, default=5, help="random deletion orders averaged in Fig. 1a")
    p.add_argument("--levels", type=int, default=20, help="sparsity levels (rounds)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
