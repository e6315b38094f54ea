"""What a user sees of a run in MLflow without Ray: code version tags, the training-runs experiment kind, honest
end statuses (also of a sweep's parent), `raylab runs`, `--config`, `config --explain`, one-line errors and
Ctrl-C, on a real SQLite store."""
import json
import subprocess
from pathlib import Path

import pytest

from raylab import cli
from raylab.config import TrackingConfig, to_json
from raylab.presets import make_config
from raylab.tracking import get_run
from raylab.tracking import mlflow_store
from raylab.tracking.mlflow_store import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker, client_for,
                                          code_version_tags, ensure_experiment, package_version)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tcfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return TrackingConfig(root=str(tmp_path / "runs"))


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def test_every_run_records_commit_dirty_flag_and_package_version(tcfg):
    code_version_tags.cache_clear()  # read the checkout now (the cache holds it for the life of a process)
    with Tracker.start(tcfg, "r", params={}, config_json="{}") as tracker:
        pass
    tags = get_run(tracker.uri, tracker.run_id).tags
    assert tags["raylab.version"] == package_version() == __import__("importlib.metadata").metadata.version("raylab")
    if (REPO / ".git").exists():
        assert tags["raylab.git_commit"] == _git("rev-parse", "HEAD") == tags["mlflow.source.git.commit"]
        assert tags["raylab.git_dirty"] == str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
        assert tags["raylab.code_version"].startswith(f"{package_version()}+g{tags['raylab.git_commit'][:10]}")


def test_outside_a_git_checkout_the_tags_say_unknown(monkeypatch):
    code_version_tags.cache_clear()
    monkeypatch.setattr(mlflow_store, "_git", lambda root, *args: None)
    try:
        tags = code_version_tags()
        assert tags["raylab.git_commit"] == tags["raylab.git_dirty"] == "unknown"
        assert tags["raylab.version"] == package_version()
    finally:
        code_version_tags.cache_clear()


def test_the_experiment_is_marked_as_model_training_for_the_ui(tcfg):
    client = client_for(mlflow_store.resolve_tracking_uri(tcfg))
    eid = ensure_experiment(tcfg)
    assert client.get_experiment(eid).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    client.delete_experiment_tag(eid, EXPERIMENT_KIND_TAG)  # an experiment made before this raylab
    assert ensure_experiment(tcfg) == eid
    assert client.get_experiment(eid).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (RuntimeError("trial failed"), "FAILED"),
                                            (KeyboardInterrupt(), "KILLED")])
def test_a_sweeps_parent_run_ends_with_an_honest_status(tcfg, raised, status):
    from raylab.tune.sweep import _parent_status

    cfg = make_config("tiny", {"tracking.root": tcfg.root})
    parent = Tracker.start(cfg.tracking, "sweep:s", params={}, config_json="{}")
    trial = Tracker.start(cfg.tracking, "beta=2.0", params={}, config_json="{}", parent_run_id=parent.run_id)
    with pytest.raises(type(raised)) if raised else __import__("contextlib").nullcontext():
        with _parent_status(cfg, parent.run_id):
            if raised:
                raise raised
            trial.end()
    run = get_run(parent.uri, parent.run_id)
    assert run.status == status and run.end_time is not None
    assert get_run(parent.uri, trial.run_id).status == ("FINISHED" if raised is None else "KILLED")


def test_trial_names_carry_the_swept_values():
    from raylab.tune.sweep import trial_label

    cfg = make_config("tiny", {"train.beta": 2, "train.ratio": 0.5, "generate.steps": 8, "generate.s_max": "inf"})
    assert trial_label(cfg, ["generate.steps"]) == "steps=8"
    assert trial_label(cfg, ["train.ratio", "train.beta"]) == "beta=2.0,ratio=0.5"
    assert trial_label(cfg, ["generate.s_max"]) == "s_max=inf"


def test_runs_listing_shows_names_metrics_and_the_report_name(tcfg, capsys):
    with Tracker.start(tcfg, "sweep:steps", params={}, config_json="{}",
                       tags={"raylab.stage": "sweep", "raylab.sweep": "steps-abc", "raylab.sweep_keys": "generate.steps"}) as p:
        with Tracker.start(tcfg, "steps=4", params={}, config_json="{}", parent_run_id=p.run_id,
                           tags={"raylab.stage": "train", "raylab.sweep": "steps-abc"}) as t:
            t.log_metrics({"eval_clean_acc": 0.75, "eval_pgd2_acc": 0.5, "eval_aa_apgd-ce_acc": 0.25}, step=1)
    assert cli.main(["runs", "--set", f"tracking.root={tcfg.root}"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("steps=4"))
    assert "eval_clean_acc=0.75" in line and "eval_aa_apgd-ce_acc=0.25" in line and t.run_id in line
    assert "FINISHED" in line and "sweep steps-abc" in line
    assert cli.main(["runs", "--sweeps", "--set", f"tracking.root={tcfg.root}"]) == 0
    sweeps = capsys.readouterr().out.splitlines()
    assert len(sweeps) == 1 and sweeps[0].startswith("steps-abc") and "1 trials" in sweeps[0]
    assert "raylab report steps-abc" in sweeps[0]


def _sweep(tcfg, name="steps-abc"):
    """A sweep as the driver logs it: parent, two trials, a shared generation (no sweep tag), an older sweep."""
    with Tracker.start(tcfg, "sweep:beta", params={}, config_json="{}",
                       tags={"raylab.stage": "sweep", "raylab.sweep": "beta-old", "raylab.sweep_keys": "train.beta"}):
        pass
    with Tracker.start(tcfg, f"sweep:{name}", params={}, config_json="{}",
                       tags={"raylab.stage": "sweep", "raylab.sweep": name, "raylab.sweep_keys": "generate.steps"}) as p:
        for steps in (2, 4):
            with Tracker.start(tcfg, f"steps={steps}", params={"generate.steps": steps}, config_json="{}",
                               parent_run_id=p.run_id, tags={"raylab.stage": "train", "raylab.sweep": name}) as t:
                t.log_metrics({"eval_clean_acc": 0.75, "eval_pgd2_acc": 0.5, "eval_aa_apgd-ce_acc": 0.25,
                               "eval_aa_after_apgd-ce": 0.25, "best_epoch": 3, "val_pgd2_acc": 0.4,
                               "fd_scorer_features": 9.0, "cost_total_device_s": 7.0}, step=1)
        with Tracker.start(tcfg, "generate-x", params={}, config_json="{}", parent_run_id=p.run_id,
                           tags={"raylab.stage": "generate"}):
            pass
    return p


def test_the_ui_opens_on_the_newest_sweep_its_trials_metrics_and_charts(tcfg):
    """`raylab ui` writes MLflow's shared view of the newest sweep and prints its URL: the sweep's parent and trials
    only, flat in one group (a collapsed parent would hide the trials), the swept param and the key metrics as
    columns, and per swept key and evaluation accuracy a scatter plot (the compare view). The real UI renders it
    in tests/test_experiments.py's browser test."""
    import json

    from raylab.tracking.ui import ui_lines
    from raylab.tracking.views import SHARE_TAG, sweep_view

    parent = _sweep(tcfg)
    uri = mlflow_store.resolve_tracking_uri(tcfg)
    view = sweep_view(uri, tcfg.experiment)
    assert (view.sweep, view.parent_run_id, view.knobs) == ("steps-abc", parent.run_id, ("generate.steps",))
    assert view.metrics == ("eval_clean_acc", "eval_pgd2_acc", "eval_aa_apgd-ce_acc", "fd_scorer_features",
                            "best_epoch")
    lines = ui_lines("http://127.0.0.1:5000", uri, tcfg, view, Path("ui.log"))
    page = lines[0].split()[2]
    assert page.endswith("/runs?workflowType=machine_learning&viewStateShareKey=raylab-steps-abc")
    assert f"{page}&compareRunsMode=CHART" in lines[1] and f"/runs/{parent.run_id}?" in lines[2]
    state = json.loads(client_for(uri).get_experiment(view.experiment_id).tags[SHARE_TAG + "raylab-steps-abc"])
    assert state["searchFilter"] == "tags.`raylab.sweep` = 'steps-abc'"
    assert [r.info.run_name for r in client_for(uri).search_runs([view.experiment_id], state["searchFilter"])] \
        == ["steps=4", "steps=2", "sweep:steps-abc"]
    assert state["selectedColumns"][:3] == ["params.`generate.steps`", "metrics.`eval_clean_acc`",
                                            "metrics.`eval_pgd2_acc`"]
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "raylab.sweep"}]
    assert [(c["type"], c["xaxis"]["key"], c["yaxis"]["key"]) for c in state["compareRunCharts"]] == [
        ("SCATTER", "generate.steps", m) for m in ("eval_clean_acc", "eval_pgd2_acc", "eval_aa_apgd-ce_acc")]
    assert sweep_view(uri, tcfg.experiment, "beta").knobs == ("train.beta",)  # --sweep, as `raylab report` takes it
    with pytest.raises(mlflow_store.TrackingError, match="--sweep nope: no such sweep"):
        sweep_view(uri, tcfg.experiment, "nope")


def test_a_long_description_ends_on_a_whole_line_saying_where_the_rest_is(tcfg):
    with Tracker.start(tcfg, "r", params={}, config_json="{}") as tracker:
        tracker.set_description("| a | b |\n" * 2000, more="the whole report is report.md")
    text = get_run(tracker.uri, tracker.run_id).tags["mlflow.note.content"]
    assert len(text) <= mlflow_store.TAG_VALUE_LIMIT and text.endswith("\n\n... the whole report is report.md\n")
    assert text.split("\n\n")[0].splitlines()[-1] == "| a | b |"


def test_config_file_with_set_on_top_and_explain(tmp_path, capsys):
    cfg = make_config("smoke", {"train.beta": 3.0})
    path = tmp_path / "config.json"
    path.write_text(to_json(cfg))
    assert cli.main(["config", "--config", str(path), "--set", "train.lr=0.05"]) == 0
    flat = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert flat["train.beta"] == "3.0" and flat["train.lr"] == "0.05" and flat["eval.num_test"] == "32"
    path.write_text(json.dumps({"nonsense": 1}))
    assert cli.main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["config", "--explain", "eval.autoattack"]) == 0
    text = capsys.readouterr().out
    assert "one of standard, plus, custom, none" in text and "default (paper): 'standard'" in text
    assert cli.main(["config", "--explain", "tracking.ui_port"]) == 0
    assert ">= 1 and <= 65535" in capsys.readouterr().out
    assert cli.main(["config", "--explain", "train.nope"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_verbs_and_experiment_scripts_share_preset_names():
    from raylab.tune.experiment import Ablation, parse_args

    ab = Ablation("train.beta", {"tiny": [1], "smoke": [1], "paper": [1]}, "t")
    for preset in ("tiny", "smoke", "paper"):
        assert parse_args(ab, ["--preset", preset]).preset == preset
        assert cli.build_parser().parse_args(["config", "--preset", preset]).preset == preset


def test_ctrl_c_on_a_verb_prints_one_line_with_what_was_kept_and_the_resume_command(monkeypatch, capsys):
    import raylab.pipeline.generate_job as job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(job, "run_generate", interrupted)
    assert cli.main(["generate", "--preset", "smoke", "--out", "/tmp/x y"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "shard" in err[0]
    assert err[0].endswith("resume with: raylab generate --preset smoke --out '/tmp/x y'")


def test_a_sweep_with_failed_trials_exits_1_with_one_line(monkeypatch, capsys):
    from raylab.tune import sweep

    def failed(*args, **kwargs):
        raise sweep.SweepError("sweep beta-x: 1 of 2 trials failed; first error: RuntimeError: boom")
    monkeypatch.setattr(sweep, "run_sweep", failed)
    assert cli.main(["sweep", "--preset", "smoke", "--key", "train.beta", "--values", "2,3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["raylab sweep: sweep beta-x: 1 of 2 trials failed; first error: RuntimeError: boom"]


def test_a_hostile_checkpoint_through_generate_is_one_line(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))
    bad = tmp_path / "hostile.pkl"
    bad.write_bytes(pickle.dumps(Hostile()))
    code = cli.main(["generate", "--preset", "smoke", "--out", str(tmp_path / "store"),
                     "--set", f"generate.checkpoint={bad}", "--set", f"tracking.root={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(bad.name) in err[0] and not marker.exists()
