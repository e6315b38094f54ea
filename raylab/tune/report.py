"""A sweep's table and figures in the papers' layouts, rebuilt from MLflow alone.

Every trial is a nested run of the sweep's parent run; its params are the flat config and its `final_*` metrics
the evaluation. `report_sweep` reads them back, prints the table, and logs table + figures to the parent run, so
`raylab report SWEEP` reproduces a report long after the cluster is gone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from raylab.config import TrackingConfig


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[dict[str, Any]], Any]
    percent: bool = True


def _m(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row.get(f"final_{key}", math.nan)


def _diff(a: str, b: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: _m(a)(row) - _m(b)(row)


BEST_LAST = [
    Column("Best epoch", _m("best_epoch"), percent=False),
    Column("Clean best", _m("eval_clean_acc")), Column("Clean last", _m("last_clean_acc")),
    Column("Clean diff", _diff("eval_clean_acc", "last_clean_acc")),
    Column("PGD-40 best", _m("eval_pgd40_acc")), Column("PGD-40 last", _m("last_pgd40_acc")),
    Column("PGD-40 diff", _diff("eval_pgd40_acc", "last_pgd40_acc")),
    Column("AA", _m("eval_aa_acc")),
]
PLAIN = [Column("Clean", _m("eval_clean_acc")), Column("PGD-40", _m("eval_pgd40_acc")), Column("AA", _m("eval_aa_acc"))]

# Wang et al. 2023 Table 7 (steps: FD + accuracies), Tables 4-5 (epochs, amount: best/last/diff), the rest plain.
LAYOUTS: dict[str, list[Column]] = {
    "steps": [Column("FD (scorer feats)", _m("fd"), percent=False), *PLAIN],
    "best_last": BEST_LAST,
    "plain": [Column("Best epoch", _m("best_epoch"), percent=False), *PLAIN],
}


def _cell(value: Any, percent: bool) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{100 * value:.2f}" if percent else f"{value:.4g}"
    return str(value)


def _sort_key(value: str) -> tuple:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def build_rows(runs: Sequence[Any], knobs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per finished trial run: its swept knob values (from params) and its metrics."""
    rows = [{**{k: run.params.get(k, "?") for k in knobs}, **run.metrics, "run_id": run.run_id}
            for run in runs if any(k.startswith("final_") for k in run.metrics)]
    return sorted(rows, key=lambda r: tuple(_sort_key(str(r[k])) for k in knobs))


def format_table(rows: Sequence[dict[str, Any]], knobs: Sequence[str], layout: str, pgd_steps: int = 40,
                 aa_label: str = "AA") -> str:
    """The table; headers name what actually ran: "PGD-40" the steps (tiny presets run fewer), "AA" the version
    when it is not the standard one (e.g. "AA (apgd-ce)")."""
    columns = LAYOUTS[layout]
    names = {"AA": aa_label}
    header = [*knobs, *(names.get(c.header, c.header).replace("PGD-40", f"PGD-{pgd_steps}") for c in columns)]
    body = [[str(r[k]) for k in knobs] + [_cell(c.value(r), c.percent) for c in columns] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, body)])


def aa_label(params: dict[str, str]) -> str:
    """"AA" for standard AutoAttack; otherwise the version and, for custom, its attacks: a cheaper AA never passes
    for the papers' number."""
    version = params.get("eval.autoattack", "standard")
    if version == "standard":
        return "AA"
    return f"AA ({params.get('eval.aa_attacks', 'custom')})" if version == "custom" else f"AA ({version})"


def default_layout(knobs: Sequence[str]) -> str:
    if list(knobs) == ["generate.steps"]:
        return "steps"
    if list(knobs) in (["select.amount"], ["train.epochs"]):
        return "best_last"
    return "plain"


def _figures(tracker: Any, uri: str, rows: list[dict[str, Any]], knobs: Sequence[str]) -> None:
    """Metric vs knob, and per-epoch train/validation robust accuracy per trial (Wang et al. 2023 Figure 2)."""
    from raylab.tracking import get_run_metrics_history, line_plot

    xs = [str(r[knobs[0]]) for r in rows]
    ys = {name: [100 * r.get(f"final_{key}", math.nan) for r in rows]
          for name, key in (("Clean", "eval_clean_acc"), ("PGD-40", "eval_pgd40_acc"), ("AA", "eval_aa_acc"))}
    tracker.log_figure(line_plot(xs, ys, knobs[0], "accuracy (%)", "accuracy vs " + knobs[0]), "metric_vs_knob.png")
    for metric in ("train_robust_acc", "val_robust_acc"):
        curves = {}
        for r in rows:
            hist = get_run_metrics_history(uri, r["run_id"], metric)
            curves[f"{knobs[0]}={r[knobs[0]]}"] = [100 * v for _, v in hist]
        longest = max((len(c) for c in curves.values()), default=0)
        if longest:
            padded = {k: v + [math.nan] * (longest - len(v)) for k, v in curves.items()}
            tracker.log_figure(line_plot(list(range(1, longest + 1)), padded, "epoch", f"{metric} (%)", metric),
                               f"curves_{metric}.png")


def report_sweep(tracking: TrackingConfig, parent_run_id: str, knobs: Sequence[str],
                 layout: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Read the trials back from MLflow, print the table, log it (CSV/JSON/text) and figures to the parent run."""
    from raylab.tracking import Tracker, child_runs, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking)
    runs = [r for r in child_runs(uri, parent_run_id) if r.tags.get("raylab.stage") == "train"]
    rows = build_rows(runs, knobs)
    layout = layout or default_layout(knobs)
    params = runs[0].params if runs else {}
    table = format_table(rows, knobs, layout, pgd_steps=int(params.get("eval.pgd_steps", 40)),
                         aa_label=aa_label(params))
    print(table, flush=True)
    tracker = Tracker.attach(uri, parent_run_id)
    tracker.log_text(table + "\n", "sweep_table.txt")
    if rows:
        tracker.log_table(rows, "sweep_table")
        _figures(tracker, uri, rows, knobs)
    return rows, table


def report_by_name(tracking: TrackingConfig, sweep: str, layout: str | None = None) -> tuple[list, str]:
    """`raylab report SWEEP`: find the sweep's parent run in MLflow by its name and rebuild the report."""
    from raylab.tracking import find_runs, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking)
    parents = [r for r in find_runs(uri, tracking.experiment, "tags.`raylab.stage` = 'sweep'")
               if r.tags.get("raylab.sweep") == sweep or r.tags.get("raylab.sweep", "").startswith(sweep + "-")]
    if not parents:
        raise ValueError(f"sweep {sweep!r}: no such sweep in experiment {tracking.experiment!r} of {uri}")
    parent = parents[-1]
    return report_sweep(tracking, parent.run_id, parent.tags["raylab.sweep_keys"].split(","), layout=layout)
