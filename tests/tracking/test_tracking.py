"""Tracking room: runs, nesting, params from the flat config, metric histories, artifacts, lineage, statuses.

Everything is read back through a plain `MlflowClient` on a temp SQLite store, not through raylab's helpers only.
"""
import io
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient

from raylab import config
from raylab.config import TrackingConfig
from raylab.presets import make_config
from raylab.images import tile
from raylab.tracking import plots
from raylab.tracking.mlflow_store import (PARAM_VALUE_LIMIT, Tracker, TrackingError, client_for, ensure_experiment,
                                          pin_tracking, resolve_tracking_uri)
from raylab.tracking.readback import child_runs, find_runs, get_run_metrics_history

HASH = "ab12" * 16


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory):
    """An empty, fully migrated SQLite store, built once: creating one costs seconds of schema migrations."""
    root = tmp_path_factory.mktemp("template")
    client_for(f"sqlite:///{root / 'mlflow.db'}")
    return root / "mlflow.db"


@pytest.fixture()
def tcfg(tmp_path, monkeypatch, migrated_db):
    """A TrackingConfig whose default store is a private copy of the migrated template under tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "runs").mkdir()
    shutil.copyfile(migrated_db, tmp_path / "runs" / "mlflow.db")
    return TrackingConfig(root=str(tmp_path / "runs"), experiment="unit")


def _start(tcfg, name, cfg, parent=None):
    return Tracker.start(tcfg, name, params=config.to_flat(cfg), config_json=config.to_json(cfg),
                         parent_run_id=parent)


def _artifacts(client, run_id, path=None):
    found = []
    for info in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, info.path) if info.is_dir else [info.path]
    return sorted(found)


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(TrackingConfig(root="runs")) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert resolve_tracking_uri(TrackingConfig(root="runs")) == "http://127.0.0.1:9"
    assert resolve_tracking_uri(TrackingConfig(root="runs", uri="sqlite:////x/y.db")) == "sqlite:////x/y.db"
    pinned = pin_tracking(TrackingConfig(root="runs"))
    assert (pinned.root, pinned.uri) == (str(tmp_path / "runs"), "http://127.0.0.1:9")


def test_sweep_hierarchy_roundtrip(tcfg, tmp_path):
    base = make_config("tiny")
    children = {}
    with _start(tcfg, "sweep:beta", base) as parent:
        for beta in (1.0, 6.0):
            cfg = config.override(base, {"train.beta": beta})
            with _start(tcfg, f"beta={beta}", cfg, parent.run_id) as child:
                for epoch in range(3):
                    child.log_metrics({"val_pgd5_acc": 0.1 * epoch + beta / 100, "loss": np.float32(1.5)},
                                      step=epoch)
                child.log_dataset_lineage(HASH, "generated", tmp_path / "shards", num_rows=600)
            children[child.run_id] = cfg
        curve = plots.line_plot([0, 1, 2], {"b1": [0.1, 0.2, 0.3], "b6": [0.2, 0.3, 0.4]}, "epoch", "acc", "t")
        parent.log_figure(curve, "plots/curve.png")
        parent.log_table([{"beta": 1.0, "acc": 0.21}, {"beta": 6.0, "acc": 0.26, "note": "x"}], "tables/beta")

    client = MlflowClient(resolve_tracking_uri(tcfg))
    for run_id, cfg in children.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert len(run.data.params) == len(config.to_flat(cfg)) > 100  # more than one 100-param batch
        assert config.from_flat(run.data.params) == cfg  # params parse back into the exact config
        assert json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path))).read_text()) \
            == json.loads(config.to_json(cfg))
        beta = cfg.train.beta
        steps, values = zip(*get_run_metrics_history(client.tracking_uri, run_id, "val_pgd5_acc"))
        assert steps == (0, 1, 2) and values == pytest.approx([beta / 100, 0.1 + beta / 100, 0.2 + beta / 100])
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2]
        assert run.data.tags["dataset.identity"] == HASH and run.data.tags["dataset.generated.rows"] == "600"
        (ds,) = run.inputs.dataset_inputs
        assert (ds.dataset.name, ds.dataset.digest) == ("generated", HASH[:36])

    assert client.get_run(parent.run_id).info.status == "FINISHED"
    assert _artifacts(client, parent.run_id) == ["config.json", "plots/curve.png", "tables/beta.csv",
                                                 "tables/beta.json"]
    table = Path(client.download_artifacts(parent.run_id, "tables/beta.csv", str(tmp_path))).read_text()
    assert table.splitlines() == ["beta,acc,note", "1.0,0.21,", "6.0,0.26,x"]
    assert sorted(r.run_id for r in child_runs(client.tracking_uri, parent.run_id)) == sorted(children)
    assert len(find_runs(client.tracking_uri, "unit")) == 3
    assert len(find_runs(client.tracking_uri, "unit", "params.`train.beta` = '6.0'")) == 1

    # Artifacts live under the run root, not in a Ray or system temp dir.
    exp = client.get_experiment_by_name("unit")
    assert exp.artifact_location.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    assert list((tmp_path / "runs" / "mlartifacts").rglob("curve.png"))


def test_body_raising_ends_failed(tcfg):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker.start(tcfg, "bad", params={"a": 1}, config_json="{}") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("boom")
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["raylab.error"] == "RuntimeError: boom"
    with pytest.raises(KeyboardInterrupt):
        with Tracker.start(tcfg, "interrupted", params={}, config_json="{}") as tracker:
            raise KeyboardInterrupt
    assert MlflowClient(tracker.uri).get_run(tracker.run_id).info.status == "KILLED"


def test_long_params_clipped_full_config_kept(tcfg, tmp_path):
    full = {"long": "x" * 2000}
    with Tracker.start(tcfg, "long", params=full, config_json=json.dumps(full)) as tracker:
        pass
    client = MlflowClient(tracker.uri)
    value = client.get_run(tracker.run_id).data.params["long"]
    assert len(value) == PARAM_VALUE_LIMIT and value.endswith("...")
    assert json.loads(Path(client.download_artifacts(tracker.run_id, "config.json", str(tmp_path))).read_text()) \
        == full


def test_resume_and_pickle_reattach(tcfg):
    with Tracker.start(tcfg, "r", params={}, config_json="{}") as first:
        first.log_metrics({"acc": 0.1}, step=0)
    again = Tracker.resume(first.uri, first.run_id)
    assert MlflowClient(first.uri).get_run(first.run_id).info.status == "RUNNING"
    clone = pickle.loads(pickle.dumps(again))  # what a Ray worker receives
    clone.log_metrics({"acc": 0.2}, step=1)
    again.end()
    assert get_run_metrics_history(first.uri, first.run_id, "acc") == [(0, 0.1), (1, 0.2)]
    assert MlflowClient(first.uri).get_run(first.run_id).info.status == "FINISHED"


def test_files_dicts_and_explicit_status(tcfg, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"weights")
    (tmp_path / "notes.txt").write_text("hello")
    with Tracker.start(tcfg, "files", params={}, config_json="{}") as tracker:
        tracker.log_dict({"clean_acc": 0.9}, "eval/summary.json")
        tracker.log_artifact(tmp_path / "notes.txt")
        tracker.log_artifact(tmp_path / "ckpt", "checkpoints")
        with pytest.raises(TrackingError, match="does not exist"):
            tracker.log_artifact(tmp_path / "missing.pt")
        tracker.end("KILLED")
    client = MlflowClient(tracker.uri)
    assert _artifacts(client, tracker.run_id) == ["checkpoints/model.pt", "config.json", "eval/summary.json",
                                                  "notes.txt"]
    assert client.get_run(tracker.run_id).info.status == "KILLED"  # not overwritten by the context exit


RACER = """
import sys
from raylab.config import TrackingConfig
from raylab.presets import make_config
from raylab.tracking.mlflow_store import ensure_experiment
print("ready", flush=True)
sys.stdin.readline()  # start signal, so the processes overlap on the fresh store
print(ensure_experiment(TrackingConfig(root=sys.argv[1], experiment="raced")), flush=True)
"""


def test_experiment_idempotent_and_race_safe(tmp_path, tcfg):
    assert ensure_experiment(tcfg) == ensure_experiment(tcfg)
    # Two processes create the same experiment on a *fresh* store, the second starting while the first is
    # mid-migration. Without the store lock this failed 5 of 6 tries (alembic 'expected to match one row').
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "raced")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
        time.sleep(0.3)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-1500:] + outs[1][1][-1500:]
    assert outs[0][0].split() == outs[1][0].split() == ["1"]


def test_bad_inputs_fail_clearly(tcfg):
    with pytest.raises(TrackingError, match="config_json"):
        Tracker.start(tcfg, "x", params={}, config_json="{not json")
    with pytest.raises(TrackingError, match="not found"):
        Tracker.start(tcfg, "x", params={}, config_json="{}", parent_run_id="0" * 32)
    assert find_runs(resolve_tracking_uri(tcfg), "unit") == []  # neither attempt left a run behind
    with pytest.raises(TrackingError, match="nope.*known: .*unit"):
        find_runs(resolve_tracking_uri(tcfg), "nope")
    gone = TrackingConfig(root=tcfg.root, experiment="gone")
    MlflowClient(resolve_tracking_uri(gone)).delete_experiment(ensure_experiment(gone))
    with pytest.raises(TrackingError, match="'gone' is deleted"):
        Tracker.start(gone, "x", params={}, config_json="{}")
    with Tracker.start(tcfg, "x", params={}, config_json="{}") as tracker:
        with pytest.raises(TrackingError, match="metric acc"):
            tracker.log_metrics({"acc": "high"}, step=0)
        with pytest.raises(TrackingError, match="status"):
            tracker.end("DONE")
        with pytest.raises(TrackingError, match="rows"):
            tracker.log_table([[1, 2]], "t")


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_plots_render_and_validate():
    images = np.stack([np.full((4, 4, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = tile(images, 3, pad=2)
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    assert grid[2, 2, 0] == 10 and grid[8, 2 + 6, 0] == 50 and grid[8, 14, 0] == 255  # 5th image; empty slot
    for fig in (plots.image_grid(images, nrow=3), plots.histogram(np.arange(100.0), bins=10, title="h"),
                plots.line_plot([0, 1], {"a": [1, 2], "b": [2, 3]}, "x", "y", "t")):
        assert _png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plots.line_plot([0, 1], {"a": [1, 2], "b": [2, 3]}, "x", "y", "t").axes[0].lines) == 2
    with pytest.raises(plots.PlotError, match="uint8 NHWC"):
        plots.image_grid(images.astype(np.float32), nrow=2)
    with pytest.raises(plots.PlotError, match="'a' has 1 values for 2 xs"):
        plots.line_plot([0, 1], {"a": [1]}, "x", "y", "t")
    with pytest.raises(plots.PlotError, match="no values"):
        plots.histogram([], title="h")
