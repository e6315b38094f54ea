"""What the MLflow UI opens on: links into its pages, and the view of a sweep that `raylab ui` prints.

The view is MLflow's own shared view (what the UI's Share button writes): an experiment tag
`mlflow.sharedViewState.<key>` holding the runs page's state as JSON, opened by the page's `viewStateShareKey=<key>`
query (mlflow/server/js `useSharedExperimentViewState`, MLflow 3.17 and 3.18; the UI reads plain JSON as well as
its compressed form). It shows one sweep: its parent run and trials (a filter on the `raylab.sweep` tag), grouped
by sweep, because the UI otherwise nests trials under their collapsed parent and a shared view cannot expand rows;
each trial's swept params and key metrics as columns; and in the page's chart view one scatter plot per swept key
and evaluation metric, the compare view the README's "Compare runs" opens.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional
from urllib.parse import quote

from raylab.tracking.mlflow_store import TrackingError, client_for
from raylab.tracking.readback import child_runs, find_runs

SHARE_TAG = "mlflow.sharedViewState."
# A trial's key metrics in table order: clean, PGD and AutoAttack accuracies (not AutoAttack's per-attack steps) of
# the best checkpoint, the last checkpoint's, the generation's FD, the best epoch (raylab.eval.report names them).
KEY_METRICS = (r"eval_clean_acc", r"eval_pgd\d+_acc", r"eval_aa_(?!after_).+_acc", r"eval_last_clean_acc",
               r"eval_last_pgd\d+_acc", r"fd_scorer_features", r"best_epoch")
CHARTED = 3  # the first three: accuracies of the best checkpoint, each charted against every swept key


def artifact_link(run_id: str, path: str) -> str:
    """A run's artifact file as the tracking server serves it, relative to the UI's page (so it also works behind a
    port-forward or a static prefix): what a run description's Markdown embeds."""
    return f"get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"


def run_link(experiment_id: str, run_id: str) -> str:
    """A run's page, relative to the UI's page."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def key_metrics(names: Iterable[str]) -> list[str]:
    """The key metrics among `names`, in KEY_METRICS order."""
    names = sorted(set(names))
    return [name for pattern in KEY_METRICS for name in names if re.fullmatch(pattern, name)]


@dataclass(frozen=True)
class SweepView:
    experiment_id: str
    sweep: str              # the sweep's name (the parent run's `raylab.sweep` tag)
    parent_run_id: str
    knobs: tuple[str, ...]  # its swept keys
    metrics: tuple[str, ...]  # its trials' key metrics

    @property
    def key(self) -> str:
        return f"raylab-{self.sweep}"

    def state(self) -> dict[str, Any]:
        """The runs page's state: search facets and UI state (mlflow/server/js ExperimentPageUIState)."""
        section = "raylab-sweep"
        charts = [{"uuid": f"raylab-{i}", "type": "SCATTER", "runsCountToCompare": 100, "metricSectionId": section,
                   "deleted": False, "isGenerated": False, "xaxis": {"key": knob, "type": "PARAM"},
                   "yaxis": {"key": metric, "type": "METRIC"}}
                  for i, (knob, metric) in enumerate((k, m) for m in self.metrics[:CHARTED] for k in self.knobs)]
        columns = [f"params.`{k}`" for k in self.knobs] + [f"metrics.`{m}`" for m in self.metrics]
        return {"searchFilter": f"tags.`raylab.sweep` = '{self.sweep}'", "orderByKey": "attributes.start_time",
                "orderByAsc": True, "runsHiddenMode": "SHOW_ALL", "selectedColumns": columns,
                "columnOrder": ["attributes.`Run Name`", "attributes.`Created`", *columns],
                "groupBy": {"aggregateFunction": "average",
                            "groupByKeys": [{"mode": "tag", "groupByData": "raylab.sweep"}]},
                # the sweep's section first: the UI adds sections for other metrics after it, not alphabetically
                "useGroupedValuesInCharts": False, "hideEmptyCharts": True, "isAccordionReordered": True,
                "compareRunSections": [{"uuid": section, "name": f"sweep {self.sweep}: evaluation against "
                                        f"{', '.join(self.knobs)}", "display": True, "isReordered": False,
                                        "deleted": False, "isGenerated": False}],
                "compareRunCharts": charts}


def sweep_view(uri: str, experiment: str, sweep: Optional[str] = None) -> Optional[SweepView]:
    """The view of sweep `sweep` (its name, or the part before the hash as `raylab report` takes it), by default of
    the experiment's newest sweep; None when the experiment has no sweep yet."""
    parents = find_runs(uri, experiment, "tags.`raylab.stage` = 'sweep'")
    if sweep:
        parents = [p for p in parents if p.tags.get("raylab.sweep") == sweep
                   or p.tags.get("raylab.sweep", "").startswith(sweep + "-")]
        if not parents:
            raise TrackingError(f"--sweep {sweep}: no such sweep in experiment {experiment!r} of {uri} "
                                "(`raylab runs --sweeps` lists them)")
    if not parents:
        return None
    parent = parents[-1]
    trials = [r for r in child_runs(uri, parent.run_id) if r.tags.get("raylab.stage") == "train"]
    knobs = tuple(k for k in parent.tags.get("raylab.sweep_keys", "").split(",") if k)
    return SweepView(parent.experiment_id, parent.tags.get("raylab.sweep", parent.name), parent.run_id, knobs,
                     tuple(key_metrics(m for t in trials for m in t.metrics)))


def publish(uri: str, view: SweepView) -> str:
    """Write the view to its experiment (rewritten on every call: the sweep may have more trials now); its key."""
    client_for(uri).set_experiment_tag(view.experiment_id, SHARE_TAG + view.key, json.dumps(view.state()))
    return view.key
