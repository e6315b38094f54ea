"""Figures for run reports: learning curves, sample grids, histograms.

Figures are built on `matplotlib.figure.Figure` with an explicit Agg canvas, never through pyplot, so no display
is needed, no global figure registry grows in long sweeps, and the process-wide backend is left alone.
Log them with `Tracker.log_figure(fig, "plots/name.png")`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raylab.images import tile


class PlotError(ValueError):
    """Bad plot input: names the argument and what is allowed."""


def _figure(width: float = 5.0, height: float = 3.5) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def line_plot(xs: Sequence[float], ys_by_name: Mapping[str, Sequence[float]], xlabel: str, ylabel: str,
              title: str) -> Figure:
    """One line per name over the shared `xs` (e.g. robust accuracy per epoch for each sweep value)."""
    if not ys_by_name:
        raise PlotError(f"line_plot {title!r}: ys_by_name is empty")
    for name, ys in ys_by_name.items():
        if len(ys) != len(xs):
            raise PlotError(f"line_plot {title!r}: series {name!r} has {len(ys)} values for {len(xs)} xs")
    fig = _figure()
    ax = fig.add_subplot()
    marker = "o" if len(xs) <= 30 else None  # markers show individual epochs on short tiny-preset runs
    for name, ys in ys_by_name.items():
        ax.plot(list(xs), list(ys), marker=marker, label=str(name))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(ys_by_name) > 1:
        ax.legend(fontsize="small")
    return fig


def image_grid(images: np.ndarray, nrow: int = 8, title: str = "") -> Figure:
    """A sample grid (e.g. generated images, one class per row), drawn 4x (25 image pixels per inch at dpi 100)."""
    grid = tile(images, nrow, error=PlotError)
    fig = _figure(max(grid.shape[1] / 25, 2.0), max(grid.shape[0] / 25, 2.0) + (0.3 if title else 0.0))
    ax = fig.add_subplot()
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def histogram(values: Sequence[float], bins: int = 50, title: str = "", xlabel: str = "") -> Figure:
    """Distribution of e.g. scorer confidences of generated images."""
    data = np.asarray(values, dtype=float).ravel()
    if data.size == 0:
        raise PlotError(f"histogram {title!r}: no values")
    if bins < 1:
        raise PlotError(f"histogram {title!r}: bins={bins} must be >= 1")
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(data[np.isfinite(data)], bins=bins)
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    return fig
