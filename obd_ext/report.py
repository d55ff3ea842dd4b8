"""Saliency reports: the paper's interactive tool as a table and charts.

``saliency_report(model, curvature)`` summarises the OBD saliency ``h w^2 / 2``
per layer (parameter tensor) and per unit (output row or channel: the group
saliency), so a person can see which groups are expendable; with ``out_dir``
it also writes ``saliency_report.json``, ``saliency_layers.png`` (the
distribution of log10 saliency per layer) and ``saliency_units.png`` (per-unit
saliency, one row per layer). ``plot_rounds(log, path)`` draws the predicted
against the actual loss increase of an OBDScheduler run.

The charts are drawn on their own figures (:mod:`obd_ext.plotting`): neither
pyplot nor the user's matplotlib backend is touched.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .ops import group_saliency, saliency
from .plotting import new_figure, save_figure

__all__ = ["saliency_report", "format_report", "plot_rounds"]

_DPI = 120


def saliency_report(model: nn.Module, curvature: Dict[str, torch.Tensor], names: Optional[Sequence[str]] = None,
                    out_dir: Optional[str] = None) -> Dict[str, object]:
    """Per-layer and per-unit OBD saliency of ``model`` under ``curvature`` (name -> tensor).

    Args:
        model: the model whose weights are scored.
        curvature: parameter name -> curvature tensor of the parameter's shape, e.g. from
            :func:`obd_ext.hessian_diag`.
        names: the parameters to report (default: every parameter of ``model`` that ``curvature`` has).
        out_dir: with it, also write ``saliency_report.json``, ``saliency_layers.png`` and
            ``saliency_units.png`` there (created if missing).

    Returns:
        ``total_saliency`` and, per parameter, under ``layers``: ``name``, ``shape``, ``count``,
        ``sum``, ``share`` (of the total), ``mean``, ``median``, ``negative`` (entries with negative
        saliency), ``zero_weights``, ``unit_saliency`` (per output row / channel) and
        ``least_salient_units`` (the five lowest).

    Raises:
        ValueError: when a name is not a parameter of ``model``, has no curvature, or its curvature has
            another shape (checked before anything is computed or written).
    """
    params = dict(model.named_parameters())
    names = list(names) if names is not None else [n for n in curvature if n in params]
    if not names:
        raise ValueError("saliency_report: no parameter of the model has an entry in curvature "
                         f"(curvature holds {list(curvature)[:5]}, the model {list(params)[:5]})")
    for n in names:
        if n not in params:
            raise ValueError(f"saliency_report: names holds {n!r}, which is not a parameter of the model")
        if n not in curvature:
            raise ValueError(f"saliency_report: curvature has no entry for parameter {n!r}")
        if tuple(curvature[n].shape) != tuple(params[n].shape):
            raise ValueError(f"saliency_report: curvature[{n!r}] has shape {tuple(curvature[n].shape)}, "
                             f"the parameter {tuple(params[n].shape)}")
    layers: List[Dict[str, object]] = []
    total = 0.0
    sal = {}
    for n in names:
        w = model.get_parameter(n).detach()
        s = saliency(w, curvature[n].to(w.device)).cpu()
        sal[n] = s
        total += float(s.sum())
    for n in names:
        s = sal[n]
        w = model.get_parameter(n).detach()
        units = group_saliency(w, curvature[n].to(w.device), 0).cpu() if w.dim() >= 1 else s.reshape(1)
        layers.append({
            "name": n, "shape": list(w.shape), "count": s.numel(), "sum": float(s.sum()),
            "share": float(s.sum()) / total if total else 0.0, "mean": float(s.mean()) if s.numel() else 0.0,
            "median": float(s.median()) if s.numel() else 0.0, "negative": int((s < 0).sum()),
            "zero_weights": int((w == 0).sum()), "unit_saliency": units.tolist(),
            "least_salient_units": torch.argsort(units)[: min(5, units.numel())].tolist(),
        })
    report = {"total_saliency": total, "layers": layers}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "saliency_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        _plot(report, sal, out_dir)
    return report


def format_report(report: Dict[str, object]) -> str:
    """The per-layer table as text."""
    lines = [f"{'layer':<24} {'entries':>8} {'share':>7} {'mean':>10} {'median':>10} {'neg':>5} {'least salient units'}"]
    for e in report["layers"]:
        lines.append(f"{e['name']:<24} {e['count']:>8} {e['share']:>7.1%} {e['mean']:>10.3g} {e['median']:>10.3g} "
                     f"{e['negative']:>5} {e['least_salient_units']}")
    return "\n".join(lines)


def _plot(report: Dict[str, object], sal: Dict[str, torch.Tensor], out_dir: str) -> None:
    layers = report["layers"]
    fig = new_figure((7, 0.5 + 0.45 * len(layers)))
    ax = fig.subplots()
    data = [torch.log10(sal[e["name"]].abs().clamp_min(1e-30)).reshape(-1).numpy() for e in layers]
    try:
        ax.boxplot(data, orientation="horizontal", showfliers=False)
    except TypeError:  # matplotlib < 3.10 spells it vert=False (deprecated since 3.11)
        ax.boxplot(data, vert=False, showfliers=False)
    ax.set_yticks(range(1, len(layers) + 1), [e["name"] for e in layers])
    ax.set(xlabel="log10 |saliency|", title="Saliency per layer")
    save_figure(fig, os.path.join(out_dir, "saliency_layers.png"), _DPI)

    width = max(len(e["unit_saliency"]) for e in layers)
    grid = torch.full((len(layers), width), float("nan"))
    for i, e in enumerate(layers):
        u = torch.tensor(e["unit_saliency"]).abs().clamp_min(1e-30)
        grid[i, : u.numel()] = torch.log10(u)
    fig = new_figure((min(14, 2 + 0.12 * width), 0.6 + 0.45 * len(layers)))
    ax = fig.subplots()
    im = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(layers)), [e["name"] for e in layers])
    ax.set(xlabel="unit (output row / channel)", title="log10 saliency per unit (dark: expendable)")
    fig.colorbar(im, ax=ax)
    save_figure(fig, os.path.join(out_dir, "saliency_units.png"), _DPI)


def plot_rounds(log: Sequence[Dict[str, object]], path: str) -> None:
    """Predicted (sum of deleted saliencies) against actual loss increase per round of an OBDScheduler.

    Args:
        log: the rounds, as :meth:`obd_ext.OBDScheduler.run` returns them.
        path: the image to write (PNG, or any format matplotlib's Agg canvas writes).

    Raises:
        ValueError: when ``log`` is empty or holds a non-finite loss increase (nothing is written).
    """
    if not log:
        raise ValueError("plot_rounds: log is empty (no rounds to draw)")
    bad = [i for i, e in enumerate(log)
           if not (math.isfinite(e["actual_increase"]) and math.isfinite(e["predicted_increase"]))]
    if bad:
        raise ValueError(f"plot_rounds: rounds {bad} of log have non-finite loss increases "
                         f"(first: actual {log[bad[0]]['actual_increase']}, "
                         f"predicted {log[bad[0]]['predicted_increase']})")
    sp = [e["sparsity"] for e in log]
    fig = new_figure((6, 4))
    ax = fig.subplots()
    ax.plot(sp, [e["predicted_increase"] for e in log], "-o", ms=3, label="predicted")
    ax.plot(sp, [e["actual_increase"] for e in log], "-s", ms=3, label="actual")
    ax.set(xlabel="sparsity after the round", ylabel="loss increase of the round",
           title="OBD rounds: predicted vs actual", yscale="symlog" if any(
               abs(e["actual_increase"]) > 0 for e in log) else "linear")
    ax.legend()
    save_figure(fig, path, _DPI)
