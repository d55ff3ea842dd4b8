"""Figures without side effects: matplotlib's object API, never pyplot or ``matplotlib.use``.

Every chart obd_ext draws (saliency reports, scheduler rounds, the demo's figures) is a
:class:`matplotlib.figure.Figure` rendered by its own Agg canvas, so drawing one neither changes the
user's global backend nor opens a window nor registers a figure with pyplot's figure manager.
"""

from __future__ import annotations

from typing import Tuple

__all__ = ["new_figure", "save_figure"]


def new_figure(figsize: Tuple[float, float]):
    """A :class:`matplotlib.figure.Figure` of ``figsize`` inches on its own Agg canvas (matplotlib is imported here,
    so obd_ext works without it until a chart is asked for)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str, dpi: int) -> None:
    """Lay ``fig`` out and write it to ``path`` (the format from the extension, e.g. PNG)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
