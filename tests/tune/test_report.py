"""Sweep tables in the papers' layouts (pure: rows as MLflow returns them)."""
from types import SimpleNamespace

from raylab.tune.report import Names, build_rows, default_layout, format_table


def run(steps, clean, pgd, aa, fd=None, finished=True):
    metrics = {"eval_clean_acc": clean, "eval_pgd40_acc": pgd, "eval_aa_standard_acc": aa,
               "best_epoch": 3.0, "eval_last_clean_acc": clean - 0.01, "eval_last_pgd40_acc": pgd - 0.05}
    if fd is not None:
        metrics["fd_scorer_features"] = fd
    return SimpleNamespace(params={"generate.steps": str(steps)}, metrics=metrics if finished else {"lr": 0.1}, name=f"steps={steps}",
                           run_id=f"r{steps}")


def test_steps_table_is_sorted_numerically_and_has_table7_columns():
    rows = build_rows([run(20, 0.9, 0.6, 0.55, 2.1), run(5, 0.8, 0.5, 0.45, 9.0), run(10, 0.85, 0.55, 0.5)],
                      ["generate.steps"])
    assert [r["generate.steps"] for r in rows] == ["5", "10", "20"]
    table = format_table(rows, ["generate.steps"], default_layout(["generate.steps"]))
    header, _, first, second, _ = table.splitlines()
    assert [c.strip() for c in header.split("|")] == ["generate.steps", "FD (scorer feats)", "Clean", "PGD-40", "AA"]
    assert [c.strip() for c in first.split("|")] == ["5", "9", "80.00", "50.00", "45.00"]
    assert second.split("|")[1].strip() == "-"  # no FD measured: a dash, never a made-up number


def test_rows_follow_the_sweep_order_where_it_is_known():
    def aug(value):
        return SimpleNamespace(params={"train.augment": value}, metrics={"eval_clean_acc": 0.9}, name=value,
                               run_id=value)

    runs = [aug("cutmix"), aug("none"), aug("crop")]
    assert [r["train.augment"] for r in build_rows(runs, ["train.augment"])] == ["crop", "cutmix", "none"]
    swept = {"train.augment": ["none", "crop", "cutmix"]}
    assert [r["train.augment"] for r in build_rows(runs, ["train.augment"], swept)] == ["none", "crop", "cutmix"]
    # a value the space does not list (a trial of an older sweep) goes after the listed ones
    assert [r["train.augment"] for r in build_rows(runs, ["train.augment"], {"train.augment": ["crop"]})] == [
        "crop", "cutmix", "none"]
    # numbers compare as the space wrote them: 0.2 in JSON is "0.2" in MLflow's params
    ratio = [SimpleNamespace(params={"train.ratio": v}, metrics={"eval_clean_acc": 0.9}, run_id=v) for v in
             ("1.0", "0.2")]
    assert [r["train.ratio"] for r in build_rows(ratio, ["train.ratio"], {"train.ratio": [1.0, 0.2]})] == ["1.0", "0.2"]


def test_best_last_layout_has_diffs_and_unfinished_trials_are_left_out():
    rows = build_rows([run(1, 0.9, 0.6, 0.5), run(2, 0.9, 0.6, 0.5, finished=False)], ["generate.steps"])
    assert len(rows) == 1
    table = format_table(rows, ["generate.steps"], "best_last")
    cells = [c.strip() for c in table.splitlines()[2].split("|")]
    assert cells[1:] == ["3", "90.00", "89.00", "1.00", "60.00", "55.00", "5.00", "50.00"]
    assert default_layout(["select.amount"]) == "best_last" and default_layout(["train.beta"]) == "plain"


def test_headers_name_the_attacks_that_actually_ran():
    from raylab.tune.report import aa_label

    assert aa_label({}) == "AA" and aa_label({"eval.autoattack": "plus"}) == "AA (plus)"
    cheap = {"eval.autoattack": "custom", "eval.aa_attacks": "apgd-ce,apgd-t", "eval.aa_iters": "25",
             "eval.aa_restarts": "1", "eval.aa_target_classes": "3"}
    assert aa_label(cheap) == "AA (apgd-ce,apgd-t; 25 it, 1 restart, 3 targets)"
    assert Names.from_params(cheap).aa == "eval_aa_apgd-ce.apgd-t_acc"
    params = {"eval.autoattack": "custom", "eval.aa_attacks": "apgd-ce", "eval.pgd_steps": "10"}
    names = Names.from_params(params)
    assert names.aa == "eval_aa_apgd-ce_acc" and names.pgd() == "eval_pgd10_acc"
    assert names.pgd(last=True) == "eval_last_pgd10_acc" and names.aa_header == aa_label(params) == "AA (apgd-ce)"
    trial = run(2, 0.9, 0.6, 0.5)
    trial.metrics.update({"eval_pgd10_acc": 0.3, "eval_aa_apgd-ce_acc": 0.25})
    table = format_table(build_rows([trial], ["generate.steps"]), ["generate.steps"], "plain", names)
    header = [c.strip() for c in table.splitlines()[0].split("|")]
    assert header[-2:] == ["PGD-10", "AA (apgd-ce)"] and "AA" not in header and "PGD-40" not in header
    assert [c.strip() for c in table.splitlines()[2].split("|")][-2:] == ["30.00", "25.00"]  # the keys that ran


def test_accuracies_carry_their_wilson_interval_over_the_test_images_they_were_measured_on():
    trial = run(2, 0.8, 0.45, 0.0)
    trial.metrics.update({"eval_num_test": 300.0, "eval_last_num_test": 100.0})
    rows = build_rows([trial], ["generate.steps"])
    cells = [c.strip() for c in format_table(rows, ["generate.steps"], "best_last").splitlines()[2].split("|")]
    # 80% of 300: [75.1, 84.1]; the last checkpoint's 79% over only 100 images: wider; diffs and epochs: bare
    assert cells[2:5] == ["80.00 [75.1, 84.1]", "79.00 [70.0, 85.8]", "1.00"]
    assert cells[1] == "3" and cells[-1] == "0.00 [0.0, 1.3]"  # 0 of 300 is still at most 1.3%, not "exactly 0"
    plain = [c.strip() for c in format_table(build_rows([run(2, 0.8, 0.45, 0.0)], ["generate.steps"]),
                                             ["generate.steps"], "plain").splitlines()[2].split("|")]
    assert plain[2] == "80.00"  # runs that never logged their test count: no made-up interval


def test_one_best_epoch_the_training_keeps_the_latest_of_tied_scores_and_the_figure_stars_it(tmp_path):
    """Tied validation scores: the training keeps the later epoch (`>=` in raylab.train.worker._keep_best, written to
    best.pt and logged as best_epoch); the per-epoch figure stars that same epoch, not the first maximum (it starred
    steps=2's epoch 7 while the trial reported 12)."""
    from raylab.config import TrackingConfig
    from raylab.tracking.mlflow_store import Tracker
    from raylab.train.worker import _keep_best
    from raylab.tune.report import _figures

    curve = [0.2, 0.5, 0.4, 0.5, 0.3]
    best = {"metric": "val_pgd5_acc", "score": float("-inf"), "epoch": 0}
    for epoch, acc in enumerate(curve, start=1):
        best = _keep_best(tmp_path, None, epoch, {"val_pgd5_acc": acc}, best, write=False)
    assert best["epoch"] == 4
    with Tracker.start(TrackingConfig(root=str(tmp_path)), "steps=2", params={}, config_json="{}") as run:
        for epoch, acc in enumerate(curve, start=1):
            run.log_metrics({"val_pgd5_acc": acc}, step=epoch)
    rows = [{"generate.steps": "2", "run_id": run.run_id, "val_pgd5_acc": curve[-1], "eval_clean_acc": 0.9,
             "best_epoch": float(best["epoch"])}]
    fig = _figures(run.uri, rows, ["generate.steps"], Names(pgd_steps=5))["val_robust_per_epoch.png"]
    stars = [(x, y) for line in fig.axes[0].lines if line.get_marker() == "*"
             for x, y in zip(line.get_xdata(), line.get_ydata())]
    assert stars == [(4, 50.0)]


def test_the_report_says_how_the_sweep_ended_and_links_figures_where_they_are(tmp_path):
    """report.md is written before the parent run ends: it says the status the sweep ends with, and links figures
    under figures/, where the parent run's artifacts and `raylab report`'s folder both keep them; the parent's
    description (its Overview) shows them from the tracking server and links each trial's run."""
    from raylab.tune.report import Report, arm_metrics, write_report
    from raylab.tracking.plots import line_plot

    trials = [SimpleNamespace(name="steps=2", run_id="r2", status="FINISHED", experiment_id="1",
                              params={"generate.steps": "2", "eval.pgd_steps": "40"})]
    parent = SimpleNamespace(run_id="p", name="sweep:steps-x", status="RUNNING", tags={"raylab.sweep": "steps-x"})
    rows = build_rows([run(2, 0.8, 0.5, 0.45, 9.0)], ["generate.steps"])
    report = Report(parent, trials, rows, ["generate.steps"], "steps", Names(), ["curve.png"], "FINISHED")
    text = report.markdown(lambda name: f"figures/{name}")
    assert "status FINISHED" in text and "RUNNING" not in text and "![curve.png](figures/curve.png)" in text
    overview = report.markdown(lambda name: f"get-artifact?path=figures%2F{name}&run_uuid=p",
                               lambda trial: f"#/experiments/1/runs/{trial.run_id}")
    assert "![curve.png](get-artifact?path=figures%2Fcurve.png&run_uuid=p)" in overview
    assert "| [steps=2](#/experiments/1/runs/r2) |" in overview
    write_report(tmp_path, text, {"curve.png": line_plot([0, 1], {"a": [1, 2]}, "x", "y", "t")})
    assert (tmp_path / "figures" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert arm_metrics(rows, ["generate.steps"], Names()) == {
        "steps_2/eval_clean_acc": 0.8, "steps_2/eval_pgd40_acc": 0.5, "steps_2/eval_aa_standard_acc": 0.45,
        "steps_2/fd_scorer_features": 9.0, "steps_2/best_epoch": 3.0}
    assert arm_metrics(build_rows([SimpleNamespace(params={"train.beta": "2.0", "train.ratio": "0.5"},
                                                   metrics={"eval_clean_acc": 0.7}, name="b", run_id="b")],
                                  ["train.beta", "train.ratio"]), ["train.beta", "train.ratio"], Names()) == {
        "beta_2.0_ratio_0.5/eval_clean_acc": 0.7}
