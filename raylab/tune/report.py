"""A sweep's table and figures in the papers' layouts, rebuilt from MLflow alone.

Every trial is a nested run of the sweep's parent run; its params are the flat config, its metrics name what ran
(`eval_pgd{k}_acc`, `eval_aa_<version>_acc`, `eval_last_*`, `best_epoch`, `fd_scorer_features`). `report_sweep`
reads them back, prints the table, and logs table, Markdown report and figures to the parent run, where comparison
starts: the report is also the run's description (its Overview page, figures shown) and each arm's key metrics are
the run's metrics. `raylab report SWEEP` reproduces a report (and writes it to `<root>/reports/<sweep>/`) long after
the cluster is gone.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from raylab.config import TrackingConfig


@dataclass(frozen=True)
class Names:
    """The metric keys of what actually ran in a sweep's trials (from their params): `eval_pgd{k}_acc`,
    `eval_aa_<version>_acc`, and the table headers that say the same ("PGD-10", "AA (apgd-ce)")."""
    pgd_steps: int = 40
    aa: str = "eval_aa_standard_acc"
    aa_header: str = "AA"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "Names":
        from raylab.eval.report import aa_metric_name

        version = params.get("eval.autoattack", "standard")
        attacks = [a for a in params.get("eval.aa_attacks", "").split(",") if a]
        return cls(int(params.get("eval.pgd_steps", 40)), aa_metric_name(version, attacks), aa_label(params))

    def pgd(self, last: bool = False) -> str:
        from raylab.eval.report import pgd_metric_name

        return pgd_metric_name(self.pgd_steps, "eval_last_" if last else "eval_")


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[dict[str, Any], Names], Any]
    percent: bool = True
    count: str | None = None  # the metric holding the test images behind an accuracy: its 95% interval is printed


def _m(key: str | Callable[[Names], str]) -> Callable[[dict[str, Any], Names], Any]:
    return lambda row, names: row.get(key(names) if callable(key) else key, math.nan)


def _diff(a: Callable, b: Callable) -> Callable[[dict[str, Any], Names], Any]:
    return lambda row, names: a(row, names) - b(row, names)


CLEAN, CLEAN_LAST = _m("eval_clean_acc"), _m("eval_last_clean_acc")
PGD, PGD_LAST, AA = _m(lambda n: n.pgd()), _m(lambda n: n.pgd(last=True)), _m(lambda n: n.aa)
N_BEST, N_LAST = "eval_num_test", "eval_last_num_test"
BEST_LAST = [
    Column("Best epoch", _m("best_epoch"), percent=False),
    Column("Clean best", CLEAN, count=N_BEST), Column("Clean last", CLEAN_LAST, count=N_LAST),
    Column("Clean diff", _diff(CLEAN, CLEAN_LAST)),
    Column("PGD-40 best", PGD, count=N_BEST), Column("PGD-40 last", PGD_LAST, count=N_LAST),
    Column("PGD-40 diff", _diff(PGD, PGD_LAST)),
    Column("AA", AA, count=N_BEST),
]
PLAIN = [Column("Clean", CLEAN, count=N_BEST), Column("PGD-40", PGD, count=N_BEST), Column("AA", AA, count=N_BEST)]

# Wang et al. 2023 Table 7 (steps: FD + accuracies), Tables 4-5 (epochs, amount: best/last/diff), the rest plain.
LAYOUTS: dict[str, list[Column]] = {
    "steps": [Column("FD (scorer feats)", _m("fd_scorer_features"), percent=False), *PLAIN],
    "best_last": BEST_LAST,
    "plain": [Column("Best epoch", _m("best_epoch"), percent=False), *PLAIN],
}


def _cell(value: Any, column: Column, row: dict[str, Any]) -> str:
    """An accuracy with its 95% Wilson interval when the row says over how many test images it was measured (at
    300 digits the interval is about +-5 points: the reader sees which differences are noise)."""
    from raylab.eval.metrics import format_accuracy

    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "-"
    n = int(row.get(column.count, 0)) if column.count else 0
    if n > 0:
        return format_accuracy(value, n)
    return f"{100 * value:.2f}" if column.percent else f"{value:.4g}"


def _sort_key(value: str) -> tuple:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def _row_key(row: dict[str, Any], knobs: Sequence[str], order: Mapping[str, Sequence[Any]]) -> tuple:
    """The sweep's own order where it is known (`ablate_aug` reads none, crop, cutmix as swept), else numbers
    numerically and text alphabetically."""
    key = []
    for k in knobs:
        swept = [str(v) for v in order.get(k, ())]
        value = str(row[k])
        key.append((0, swept.index(value)) if value in swept else (1, *_sort_key(value)))
    return tuple(key)


def build_rows(runs: Sequence[Any], knobs: Sequence[str],
               order: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
    """One row per evaluated trial run: its swept knob values (from params), its metrics, id and name; rows in
    `order` (the sweep space, knob -> values as swept) where given."""
    rows = [{**{k: run.params.get(k, "?") for k in knobs}, **run.metrics, "run_id": run.run_id,
             "run_name": getattr(run, "name", run.run_id)} for run in runs if "eval_clean_acc" in run.metrics]
    return sorted(rows, key=lambda r: _row_key(r, knobs, order or {}))


def _cells(rows: Sequence[dict[str, Any]], knobs: Sequence[str], layout: str, names: Names):
    header = [*knobs, *(names.aa_header if c.header == "AA" else c.header.replace("PGD-40", f"PGD-{names.pgd_steps}")
                        for c in LAYOUTS[layout])]
    body = [[str(r[k]) for k in knobs] + [_cell(c.value(r, names), c, r) for c in LAYOUTS[layout]]
            for r in rows]
    return header, body


def format_table(rows: Sequence[dict[str, Any]], knobs: Sequence[str], layout: str, names: Names = Names()) -> str:
    """The table; headers name what actually ran: "PGD-40" the steps (tiny presets run fewer), "AA" the version
    when it is not the standard one (e.g. "AA (apgd-ce)"); accuracies carry their 95% interval, e.g.
    "84.00 [79.4, 87.7]"."""
    header, body = _cells(rows, knobs, layout, names)
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, body)])


def markdown_table(rows: Sequence[dict[str, Any]], knobs: Sequence[str], layout: str, names: Names) -> str:
    header, body = _cells(rows, knobs, layout, names)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])


def aa_label(params: dict[str, str]) -> str:
    """"AA" for standard AutoAttack; otherwise the version and, for custom, its attacks: a cheaper AA never passes
    for the papers' number."""
    version = params.get("eval.autoattack", "standard")
    if version == "standard":
        return "AA"
    if version != "custom":
        return f"AA ({version})"
    from raylab.eval.autoattack import Budget

    d = Budget()
    budget = Budget(int(params.get("eval.aa_iters", d.iters)), int(params.get("eval.aa_restarts", d.restarts)),
                    int(params.get("eval.aa_target_classes", d.target_classes))).label()
    return f"AA ({params.get('eval.aa_attacks', 'custom')}{'; ' + budget if budget else ''})"


def default_layout(knobs: Sequence[str]) -> str:
    if list(knobs) == ["generate.steps"]:
        return "steps"
    if list(knobs) in (["select.amount"], ["train.epochs"]):
        return "best_last"
    return "plain"


def arm(row: dict[str, Any], knobs: Sequence[str]) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in knobs)


def _figures(uri: str, rows: list[dict[str, Any]], knobs: Sequence[str], names: Names) -> dict[str, Any]:
    """{file name: figure}: clean vs robust per arm, validation robust accuracy per epoch with best and last
    marked (Wang et al. 2023 Fig. 2), the AutoAttack cascade, and selected vs rejected generated samples."""
    from raylab.tracking import get_run_metrics_history, plots

    labels = [arm(r, knobs) for r in rows]
    robust_key, robust_name = (names.aa, names.aa_header) if any(names.aa in r for r in rows) else \
        (names.pgd(), f"PGD-{names.pgd_steps}")
    figs = {"clean_vs_robust.png": plots.scatter_labelled(
        [100 * r.get(robust_key, math.nan) for r in rows], [100 * r.get("eval_clean_acc", math.nan) for r in rows],
        labels, f"{robust_name} accuracy (%)", "clean accuracy (%)", "clean vs robust accuracy, one point per arm")}
    val_key = next((k for k in rows[0] if k.startswith("val_pgd") and k.endswith("_acc")), None) if rows else None
    if val_key:
        curves = {label: [(s, 100 * v) for s, v in get_run_metrics_history(uri, r["run_id"], val_key)]
                  for label, r in zip(labels, rows)}
        best = {label: int(r["best_epoch"]) for label, r in zip(labels, rows)
                if math.isfinite(r.get("best_epoch", math.nan))}
        figs["val_robust_per_epoch.png"] = plots.best_last_curves(
            curves, best, f"validation PGD-{val_key[7:-4]} accuracy (%)", "validation robust accuracy per epoch")
    cascade = {label: [("clean", 100 * r["eval_clean_acc"])] + [
        (k[len("eval_aa_after_"):], 100 * v) for k, v in r.items() if k.startswith("eval_aa_after_")]
        for label, r in zip(labels, rows)}
    if any(len(c) > 1 for c in cascade.values()):
        figs["autoattack_cascade.png"] = plots.grouped_bars(
            cascade, "accuracy (%)", f"AutoAttack cascade ({names.aa_header}): accuracy after each attack")
    return figs


def _selection_figure(runs: Sequence[Any]) -> Any:
    """Selected vs rejected generated samples per class, from the first trial's view still on disk (None when
    no trial trained on generated data or its view is gone)."""
    from pathlib import Path

    from raylab.pipeline.select import SelectError, selection_samples
    from raylab.tracking import plots

    for run in reversed(runs):  # the newest arm (often the largest value of the swept key)
        view = run.tags.get("dataset.generated.source")
        if view and (Path(view) / "view.json").is_file():
            try:
                selected, rejected = selection_samples(view)
            except (SelectError, OSError, ValueError):
                continue
            return plots.selected_rejected_grid(selected, rejected, f"selected (left) vs rejected (right) "
                                                                      f"generated samples per class ({run.name})")
    return None


def report_sweep(tracking: TrackingConfig, parent_run_id: str, knobs: Sequence[str], layout: str | None = None,
                 out_dir: Any = None, status: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Read the trials back from MLflow, print the table, and log to the parent run: the table (CSV/JSON/text), the
    figures (`figures/`), `report.md`, the same report as the run's description (its Overview page, figures shown)
    and each arm's key metrics (`arm_metrics`). `status`: how the sweep ends, when the report is written before
    the parent run ends (its status then still says RUNNING). With `out_dir`, also `report.md` and `figures/` there."""
    from raylab.tracking import Tracker, child_runs, get_run, load_json_artifact, resolve_tracking_uri
    from raylab.tracking.views import artifact_link, run_link

    uri = resolve_tracking_uri(tracking)
    runs = [r for r in child_runs(uri, parent_run_id) if r.tags.get("raylab.stage") == "train"]
    rows = build_rows(runs, knobs, load_json_artifact(uri, parent_run_id, "sweep_space.json"))
    layout = layout or default_layout(knobs)
    names = Names.from_params(runs[0].params if runs else {})
    table = format_table(rows, knobs, layout, names)
    print(table, flush=True)
    tracker = Tracker.attach(uri, parent_run_id)
    tracker.log_text(table + "\n", "sweep_table.txt")
    figs = _figures(uri, rows, knobs, names) if rows else {}
    selection = _selection_figure(runs)
    if selection is not None:
        figs["selected_vs_rejected.png"] = selection
    parent = get_run(uri, parent_run_id)
    report = Report(parent, runs, rows, knobs, layout, names, list(figs), status or parent.status)
    markdown = report.markdown(lambda name: f"{FIGURES}/{name}")
    tracker.log_text(markdown, "report.md")
    if rows:
        tracker.log_table(rows, "sweep_table")
    for name, fig in figs.items():
        tracker.log_figure(fig, f"{FIGURES}/{name}")
    tracker.set_description(report.markdown(lambda name: artifact_link(parent_run_id, f"{FIGURES}/{name}"),
                                            lambda run: run_link(run.experiment_id, run.run_id), title=False),
                            more="the whole report is report.md, under Artifacts")
    tracker.log_metrics(arm_metrics(rows, knobs, names), step=0)
    if out_dir is not None:
        write_report(out_dir, markdown, figs)
    return rows, table


FIGURES = "figures"  # beside report.md, in the parent run's artifacts and in `raylab report`'s folder alike
ARM_METRICS = ("eval_clean_acc", "{pgd}", "{aa}", "fd_scorer_features", "best_epoch")


def arm_metrics(rows: Sequence[dict[str, Any]], knobs: Sequence[str], names: Names) -> dict[str, float]:
    """Each arm's key metrics under its name, for the parent run's Overview: `steps_8/eval_clean_acc`,
    `beta_2.0_ratio_0.5/eval_pgd10_acc` (MLflow metric names allow no `=` or `,`)."""
    out = {}
    for row in rows:
        prefix = re.sub(r"[^\w.\-]+", "_", arm(row, knobs))
        for key in (k.format(pgd=names.pgd(), aa=names.aa) for k in ARM_METRICS):
            value = row.get(key)
            if isinstance(value, float) and math.isfinite(value):
                out[f"{prefix}/{key}"] = value
    return out


def write_report(out_dir: Any, markdown: str, figs: dict[str, Any]) -> None:
    from pathlib import Path

    from raylab.io import atomic_write, atomic_write_text

    out = Path(out_dir)
    for name, fig in figs.items():
        atomic_write(out / FIGURES / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=100))
    atomic_write_text(out / "report.md", markdown)


@dataclass(frozen=True)
class Report:
    """The sweep's report: what ran (attacks, test images), the table, the figures, the trials' MLflow runs.
    `status` is how the sweep ends."""
    parent: Any
    runs: Sequence[Any]
    rows: list[dict[str, Any]]
    knobs: Sequence[str]
    layout: str
    names: Names
    figures: Sequence[str]
    status: str

    def markdown(self, figure: Callable[[str], str], run: Callable[[Any], str] | None = None,
                 title: bool = True) -> str:
        """`figure(name)`: where a figure is, seen from where the text is read; `run(trial)`: a link to a trial. The
        table comes first: the UI shows a run description's first lines until the reader asks for more."""
        params, rows, names = (self.runs[0].params if self.runs else {}), self.rows, self.names
        n_test = {int(r.get("eval_num_test", 0)) for r in rows}
        lines = [f"# Sweep {self.parent.tags.get('raylab.sweep', self.parent.name)}", ""] if title else []
        lines += [markdown_table(rows, self.knobs, self.layout, names), "",
                  f"MLflow parent run `{self.parent.run_id}` ({self.parent.name}), status {self.status}; "
                  f"{len(rows)} of {len(self.runs)} trials evaluated; swept: "
                  f"{', '.join(f'`{k}`' for k in self.knobs)}.", "",
                  f"Evaluation: clean, PGD-{names.pgd_steps} and {names.aa_header} on "
                  f"{', '.join(map(str, sorted(n_test))) or '?'} test images per trial; model "
                  f"`{params.get('model.name', '?')}`, `train.epochs` {params.get('train.epochs', '?')}, dataset "
                  f"`{params.get('data.dataset', '?')}`, {params.get('eval.norm', 'linf')} eps {_eps(params)}. "
                  "Accuracies in %, their 95% Wilson intervals in brackets.", "",
                  *[f"![{name}]({figure(name)})" for name in self.figures], "", "| arm | MLflow run | status |",
                  "|---|---|---|"]
        lines += [f"| {f'[{r.name}]({run(r)})' if run else r.name} | `{r.run_id}` | {r.status} |" for r in self.runs]
        return "\n".join(lines + [""])


def _eps(params: dict[str, str]) -> str:
    from raylab.eval.report import format_eps

    try:
        return format_eps(float(params["eval.eps"]), params.get("eval.norm", "linf"))
    except (KeyError, ValueError):
        return "?"


def report_by_name(tracking: TrackingConfig, sweep: str, layout: str | None = None) -> tuple[list, str, Any]:
    """`raylab report SWEEP`: find the sweep's parent run in MLflow by its name, rebuild the report, and write
    `report.md` and the figures into `<tracking.root>/reports/<sweep>/`. Returns (rows, table, that folder)."""
    from pathlib import Path

    from raylab.tracking import find_runs, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking)
    parents = [r for r in find_runs(uri, tracking.experiment, "tags.`raylab.stage` = 'sweep'")
               if r.tags.get("raylab.sweep") == sweep or r.tags.get("raylab.sweep", "").startswith(sweep + "-")]
    if not parents:
        raise ValueError(f"sweep {sweep!r}: no such sweep in experiment {tracking.experiment!r} of {uri} "
                         "(`raylab runs --sweeps` lists them)")
    parent = parents[-1]
    out = Path(tracking.root).resolve() / "reports" / parent.tags["raylab.sweep"]
    rows, table = report_sweep(tracking, parent.run_id, parent.tags["raylab.sweep_keys"].split(","), layout=layout,
                               out_dir=out)
    return rows, table, out
