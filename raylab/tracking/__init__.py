"""Tracking room: the only part of raylab that imports mlflow (and matplotlib for report figures).

- `mlflow_store`: store location, experiments, the `Tracker` for one run.
- `readback`: runs, metric histories and artifacts read back as plain data (reports, listings, tests).
- `plots`: Agg-only figures (learning curves, sample grids, histograms).
- `ui`: `raylab ui`, the MLflow server on the run root's store.
- `views`: what the UI opens on (the view of a sweep), links into its pages.
"""
from raylab.tracking.mlflow_store import (Tracker, TrackingError, artifact_root, client_for, ensure_experiment,
                                          pin_tracking, resolve_tracking_uri)
from raylab.tracking.plots import PlotError, histogram, image_grid, line_plot
from raylab.tracking.readback import (RunSummary, child_runs, find_runs, get_run, get_run_metrics_history,
                                      load_json_artifact, logged_steps)
from raylab.tracking.ui import serve_ui, stop_ui

__all__ = ["PlotError", "RunSummary", "Tracker", "TrackingError", "artifact_root", "child_runs",
           "client_for", "ensure_experiment", "find_runs", "get_run", "get_run_metrics_history", "histogram",
           "image_grid", "line_plot", "load_json_artifact", "logged_steps", "pin_tracking", "resolve_tracking_uri",
           "serve_ui", "stop_ui"]
