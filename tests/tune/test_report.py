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
