"""The demo's figures: Fig. 1a, Fig. 1b and Fig. 2 of the paper from a run's seed means.

Drawn with :mod:`obd_ext.plotting` (a Figure on its own Agg canvas), so the user's matplotlib backend is
left as it was.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from ..plotting import new_figure, save_figure
from .experiment import db

__all__ = ["FIGURES", "plot_figures"]

FIGURES = ("fig1a.png", "fig1b.png", "fig2.png")
_DPI = 80


def _band(ax, x: Sequence[float], per_seed: Sequence[Sequence[float]], color) -> None:
    """The range over seeds, shaded."""
    if len(per_seed) > 1:
        cols = list(zip(*per_seed))
        ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.15, lw=0)


def _curves_figure(path: str, title: str, remaining: Sequence[int],
                   curves: List[Tuple[str, List[float], List[List[float]], str]], seeds: int) -> None:
    """One panel: training MSE (dB) against parameters remaining, one line per (label, mean, per-seed, style)."""
    fig = new_figure((6, 4))
    ax = fig.subplots()
    for label, values, per_seed, style in curves:
        line, = ax.plot(remaining, values, style, ms=3, label=label)
        _band(ax, remaining, per_seed, line.get_color())
    ax.set(xlabel="parameters remaining", ylabel="training MSE (dB)", title=f"{title} (mean of {seeds} seeds)")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    save_figure(fig, path, _DPI)


def plot_figures(r: Dict[str, object], out_dir: str) -> None:
    """Write :data:`FIGURES` into ``out_dir`` from ``r`` (as :func:`obd_ext.demo.run_demo` returns it):
    lines are the seed means, shaded bands the range over the seeds."""
    runs = r["per_seed"]
    n = len(runs)
    f1 = r["figure1a"]
    _curves_figure(os.path.join(out_dir, "fig1a.png"), "Fig. 1a: deletion without retraining", f1["remaining"],
                   [(k, f1["train_mse_db"][k], [[db(v) for v in s["figure1a"]["train_mse"][k]] for s in runs], st)
                    for k, st in (("obd", "-o"), ("obd_static", ":o"), ("magnitude", "-s"), ("random", "-^"))], n)
    f1b = r["figure1b"]
    _curves_figure(os.path.join(out_dir, "fig1b.png"), "Fig. 1b: predicted vs actual", f1b["remaining"],
                   [("predicted (OBD)", f1b["predicted_db"],
                     [[db(v) for v in s["figure1b"]["predicted_mse"]] for s in runs], "-o"),
                    ("actual (OBD)", f1b["actual_db"], [[db(v) for v in s["figure1b"]["actual_mse"]] for s in runs],
                     "-s"),
                    ("predicted, one-shot order", f1b["static_predicted_db"], [], ":o"),
                    ("actual, one-shot order", f1b["static_actual_db"], [], ":s")], n)

    f2 = r["figure2"]
    fig = new_figure((10, 4))
    a1, a2 = fig.subplots(1, 2)
    for key, label, style in (("with_retraining", "with retraining", "-"), ("without_retraining", "without", "--")):
        rows = f2[key]
        rem = [e["remaining"] for e in rows]
        for m, mk in (("train", "o"), ("test", "s")):
            line, = a1.plot(rem, [db(e[f"{m}_mse"]) for e in rows], style + mk, ms=3, label=f"{m}, {label}")
            _band(a1, rem, [[db(e[f"{m}_mse"]) for e in s["figure2"][key]] for s in runs], line.get_color())
        line, = a2.plot(rem, [e["test_accuracy"] for e in rows], style + "o", ms=3, label=label)
        _band(a2, rem, [[e["test_accuracy"] for e in s["figure2"][key]] for s in runs], line.get_color())
    cfg = r["config"]
    a1.set(xlabel="parameters remaining", ylabel="MSE (dB)",
           title=f"Fig. 2: iterative {cfg['method']}, {cfg['schedule']} (mean of {n} seeds)")
    a2.set(xlabel="parameters remaining", ylabel="test accuracy")
    for a in (a1, a2):
        a.invert_xaxis()
        a.legend()
    save_figure(fig, os.path.join(out_dir, "fig2.png"), _DPI)
