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


def scatter_labelled(xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], xlabel: str, ylabel: str,
                     title: str) -> Figure:
    """One labelled point per sweep arm (clean vs robust accuracy)."""
    if not (len(xs) == len(ys) == len(labels)) or not len(xs):
        raise PlotError(f"scatter {title!r}: needs as many xs, ys and labels (got {len(xs)}, {len(ys)}, "
                        f"{len(labels)}), at least one")
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(xs, ys, s=36, zorder=3)
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize="small")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    return fig


def best_last_curves(curves: Mapping[str, Sequence[tuple[int, float]]], best: Mapping[str, int], ylabel: str,
                     title: str) -> Figure:
    """One line per arm over epochs, the best epoch starred and the last one squared (Wang et al. 2023 Fig. 2).
    `best`: each arm's best epoch as its training chose it (`best.pt`, the `best_epoch` metric), never re-derived
    from the curve here: one tie-break rule, the training's."""
    if not curves:
        raise PlotError(f"best_last_curves {title!r}: no curves")
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    for name, points in curves.items():
        if not points:
            continue
        steps, values = zip(*points)
        line, = ax.plot(steps, values, marker="o", markersize=3, label=str(name))
        if best.get(name) in steps:
            at = steps.index(best[name])
            ax.plot(steps[at], values[at], marker="*", markersize=14, color=line.get_color(), linestyle="none")
        ax.plot(steps[-1], values[-1], marker="s", markersize=8, fillstyle="none", color=line.get_color(),
                linestyle="none")
    ax.plot([], [], marker="*", color="gray", linestyle="none", label="best epoch")
    ax.plot([], [], marker="s", fillstyle="none", color="gray", linestyle="none", label="last epoch")
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def grouped_bars(groups: Mapping[str, Sequence[tuple[str, float]]], ylabel: str, title: str) -> Figure:
    """Bars per group (sweep arm) for each stage (clean, then after each AutoAttack attack)."""
    stages = list(dict.fromkeys(stage for bars in groups.values() for stage, _ in bars))
    if not stages:
        raise PlotError(f"grouped_bars {title!r}: no bars")
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        values = [dict(bars).get(stage, np.nan) for bars in groups.values()]
        ax.bar(np.arange(len(groups)) + i * width, values, width, label=stage)
    ax.set_xticks(np.arange(len(groups)) + width * (len(stages) - 1) / 2, list(groups))
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize="small")
    return fig


def selected_rejected_grid(selected: np.ndarray, rejected: np.ndarray, title: str) -> Figure:
    """Two panels of (classes, k, H, W, C) uint8 samples: one class per row, selected left, rejected right."""
    fig = _figure(6.0, max(2.0, 0.45 * selected.shape[0] + 0.6))
    for i, (images, name) in enumerate(((selected, "selected"), (rejected, "rejected"))):
        ax = fig.add_subplot(1, 2, i + 1)
        k = images.shape[1]
        grid = tile(images.reshape(-1, *images.shape[2:]), k, error=PlotError)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(name, fontsize="small")
    fig.suptitle(title, fontsize="small")
    return fig
