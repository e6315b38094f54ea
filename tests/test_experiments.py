"""Every experiments/ablate_*.py in its --smoke mode, end to end on the session Ray (CI runs these), plus the
sweep machinery they stand on: artifact reuse across trials and sweeps, lineage, restore without reruns."""
import json
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from raylab.config import TrackingConfig
from raylab.tracking import child_runs, find_runs, resolve_tracking_uri

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("ablate_*.py"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")  # shared: later sweeps reuse earlier generations


def ablation(path):
    return runpy.run_path(str(path), run_name="not_main")["ABLATION"]


def sweep_parents(root):
    uri = resolve_tracking_uri(TrackingConfig(root=str(root)))
    return uri, find_runs(uri, "raylab", "tags.`raylab.stage` = 'sweep'")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_composes_valid_configs_for_every_preset(path):
    from raylab.tune.experiment import compose
    from raylab.tune.sweep import check_space

    ab = ablation(path)
    for mode in ("tiny", "smoke", "paper"):
        run = compose(ab, mode, {})
        check_space(run.cfg, {ab.key: run.values}, run.coupled)
        assert run.values and not run.dropped
    paper = compose(ab, "paper", {}).cfg
    assert paper.model.name == "wrn-28-10"
    # The cluster preset: the scorer on a GPU, and a failure budget for spot nodes.
    assert paper.resources.scorer_gpus_per_actor >= 1 and paper.resources.max_failures >= 3


def test_the_amount_ablation_applies_the_papers_rule_per_amount():
    """Wang et al. 2023 §4.1 / Table 5: top 20% and ratio 0.3 up to 1M generated images, all of them and 0.2 above;
    the rule reaches Tune as a conditional search space."""
    from raylab.config import override
    from raylab.tune.experiment import compose
    from raylab.tune.sweep import _search

    ab = ablation(next(p for p in EXPERIMENTS if p.stem == "ablate_amount"))
    run = compose(ab, "paper", {})
    cfg, values, rule = run.cfg, run.values, run.coupled
    arms = {v: override(cfg, {ab.key: v, **rule(v)}) for v in values}
    assert {(c.select.policy, c.select.top_fraction, c.train.ratio) for v, c in arms.items() if v <= 1_000_000} == {
        ("topk", 0.2, 0.3)}
    assert {(c.select.policy, c.train.ratio) for v, c in arms.items() if v > 1_000_000} == {("none", 0.2)}
    assert cfg.generate.per_class * 10 >= max(values)  # one generation covers the largest amount
    from ray.tune.search.variant_generator import generate_variants

    entries, _ = _search(cfg, {ab.key: values}, rule)
    trials = [resolved for _, resolved in generate_variants(entries)]  # how Tune's grid search resolves them
    assert [(t[ab.key], t["select.policy"], t["train.ratio"]) for t in trials] == [
        (v, "topk" if v <= 1_000_000 else "none", 0.3 if v <= 1_000_000 else 0.2) for v in values]


@pytest.fixture(scope="module")
def steps_sweep(root):
    """The main job's smoke mode as a user runs it, in its own process with its own Ray, run once for this
    module's tests. The run root is relative, as the README's default `runs`: trials run in Tune's trial
    directories, so the driver must pin it."""
    import os
    import subprocess
    import sys

    ab = ablation(next(p for p in EXPERIMENTS if p.stem == "ablate_steps"))
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, f"{repo}/experiments/ablate_steps.py", "--smoke", "--set",
                           f"tracking.root={root.name}"], cwd=root.parent, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1500)
    uri, parents = sweep_parents(root)
    parent = [p for p in parents if p.tags["raylab.sweep_keys"] == ab.key][-1]
    trials = [r for r in child_runs(uri, parent.run_id) if r.tags.get("raylab.stage") == "train"]
    return SimpleNamespace(code=proc.returncode, out=proc.stdout, uri=uri, parent=parent, trials=trials, key=ab.key,
                           values=[str(v) for v in ab.values["smoke"]])


@pytest.mark.ray
def test_steps_smoke_runs_end_to_end(steps_sweep):
    assert steps_sweep.code == 0 and "raylab ui" in steps_sweep.out, steps_sweep.out[-3000:]
    assert steps_sweep.parent.status == "FINISHED" and steps_sweep.parent.end_time  # not RUNNING forever
    assert [r.params[steps_sweep.key] for r in steps_sweep.trials] == steps_sweep.values
    assert [r.name for r in steps_sweep.trials] == [f"steps={v}" for v in steps_sweep.values]  # the arm, not a hash
    for trial in steps_sweep.trials:
        assert trial.status == "FINISHED" and 0.0 <= trial.metrics["eval_clean_acc"] <= 1.0
        assert trial.tags["raylab.git_commit"] and trial.tags["raylab.version"]
        ledger = {k: trial.metrics[f"cost_{k}"] for k in ("generate_device_s", "train_device_s",
                                                           "eval_device_s", "per_kept_image_s")}
        assert all(v > 0 for v in ledger.values()), ledger  # the measured cost of the trial's stages


@pytest.mark.ray
def test_the_main_jobs_terminal_shows_each_arms_progress_and_the_table_in_at_most_100_lines(steps_sweep):
    """The terminal of `ablate_steps.py --smoke`: per arm its generation line, one line per epoch and its
    evaluation table, each line saying its arm, then the sweep's table; no Tune table, no Ray chatter (it ran to 278
    lines here, 872 for the default job)."""
    lines = steps_sweep.out.splitlines()
    assert len(lines) <= 100, steps_sweep.out
    epochs = int(steps_sweep.trials[0].params["train.epochs"])
    for value in steps_sweep.values:
        arm = [line for line in lines if f"[steps={value}] " in line]
        assert sum("generate: " in line for line in arm) == 1
        assert re.findall(r"\] (epoch \d+/\d+)  ", "\n".join(arm)) == [f"epoch {e}/{epochs}"
                                                                   for e in range(1, epochs + 1)]
        assert any("evaluation of " in line for line in arm) and any("AutoAttack" in line for line in arm)
    assert any(line.startswith(f"{steps_sweep.key} | FD (scorer feats) |") for line in lines)
    noise = [line for line in lines if any(s in line for s in ("Trial status", "╭", "TensorBoard", "Progress bars",
                                                                 "worker group", "max_restarts", "Traceback"))]
    assert not noise, "\n".join(noise)


@pytest.mark.ray
def test_metric_names_say_what_ran(steps_sweep):
    trial = steps_sweep.trials[0]
    p = trial.params  # smoke: validation PGD-2, evaluation PGD-2, AutoAttack APGD-CE only
    val, pgd = f"val_pgd{p['train.val_pgd_steps']}_acc", f"pgd{p['eval.pgd_steps']}"
    aa = f"eval_aa_{p['eval.aa_attacks'].replace(',', '.')}_acc" if p["eval.autoattack"] == "custom" else f"eval_aa_{p['eval.autoattack']}_acc"
    expected = {val, f"best_{val}", f"eval_{pgd}_acc", aa, f"eval_last_{pgd}_acc", "eval_last_clean_acc",
                "best_epoch", "fd_scorer_features"}
    assert expected <= set(trial.metrics)
    stale = [k for k in trial.metrics if k.startswith("final_") or "pgd40" in k or k in ("val_robust_acc",
                                                                                          "eval_aa_acc")]
    assert not stale


@pytest.mark.ray
def test_trial_logs_its_inputs_with_content_identity(steps_sweep):
    from raylab.tracking import client_for

    run = client_for(steps_sweep.uri).get_run(steps_sweep.trials[0].run_id)
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"original", "generated"}
    generated = json.loads(inputs["generated"].profile)
    assert generated["store"] and generated["scorer"] != "none" and generated["store_identity"]
    assert inputs["generated"].digest == generated["identity"][:36] and len(inputs["original"].digest) >= 32
    # ... and the trial's run directory is named by them (raylab.runs.run_identity): another view, another run
    assert run.data.tags["raylab.input.generated"] == generated["identity"]
    assert run.data.tags["raylab.input.scorer"] == generated["scorer"]


@pytest.mark.ray
def test_the_model_comes_back_from_mlflow_alone(steps_sweep, tmp_path):
    import torch

    from raylab.eval.export import load_robustbench_checkpoint
    from raylab.tracking.readback import download_artifacts

    trial = steps_sweep.trials[0]
    run_dir = Path(trial.tags["raylab.run_dir"])
    best = download_artifacts(steps_sweep.uri, trial.run_id, "checkpoints/best.pt", tmp_path / "dl")
    export = download_artifacts(steps_sweep.uri, trial.run_id, "robustbench/model.pt", tmp_path / "dl")
    assert best.is_file() and best.read_bytes() == (run_dir / "best.pt").read_bytes()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    name, data = trial.params["model.name"], trial.params["data.dataset"]
    act = trial.params["model.activation"]
    with torch.no_grad():
        local = load_robustbench_checkpoint(run_dir / "best.pt", name, data, activation=act)(x)
        for path in (best, export):
            assert torch.equal(load_robustbench_checkpoint(path, name, data, activation=act)(x), local)
    info = json.loads(download_artifacts(steps_sweep.uri, trial.run_id, "robustbench/model_info.json",
                                         tmp_path / "dl").read_text())
    assert info["raylab"]["test_images"] == int(trial.params["eval.num_test"])


@pytest.mark.ray
def test_report_writes_markdown_and_figures_and_export_writes_model_info(steps_sweep, root, tmp_path, capsys):
    from raylab import cli
    from raylab.tracking import client_for, load_json_artifact

    name = steps_sweep.parent.tags["raylab.sweep"]
    assert cli.main(["report", name.split("-")[0], "--set", f"tracking.root={root}"]) == 0
    out = Path(root) / "reports" / name
    report = (out / "report.md").read_text()
    assert all(f"steps={v}" in report for v in steps_sweep.values) and "status FINISHED" in report
    assert "PGD-2" in report and "AA (apgd-ce,apgd-t; 25 it, 1 restart, 3 targets)" in report
    figures = ["clean_vs_robust.png", "val_robust_per_epoch.png", "autoattack_cascade.png",
               "selected_vs_rejected.png"]
    for fig in figures:  # beside report.md under figures/, as in the parent run's artifacts
        png = out / "figures" / fig
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"![{fig}](figures/{fig})" in report
    # the rows' order comes from the parent's sweep space; a missing artifact reads as None, not an error
    assert load_json_artifact(steps_sweep.uri, steps_sweep.parent.run_id, "sweep_space.json") == {
        steps_sweep.key: [int(v) for v in steps_sweep.values]}  # as the experiment swept them, typed by the config
    assert load_json_artifact(steps_sweep.uri, steps_sweep.parent.run_id, "no_such.json") is None
    assert "Downloading artifacts" not in capsys.readouterr().err  # no MLflow progress bar in the report
    logged = {Path(a.path).name for a in client_for(steps_sweep.uri).list_artifacts(steps_sweep.parent.run_id,
                                                                                    "figures")}
    assert set(figures) <= logged
    print(report)  # the note quotes it
    run_dir = steps_sweep.trials[0].tags["raylab.run_dir"]
    assert cli.main(["export", "--robustbench", run_dir, str(tmp_path / "m.pt")]) == 0
    info = json.loads((tmp_path / "m.json").read_text())
    metrics = steps_sweep.trials[0].metrics
    assert info["threat_model"] == "Linf" and info["eps"] == "16/255" and info["dataset"] == "digits"
    assert info["architecture"].startswith("WideResNet-10-1")
    assert info["clean_acc"] == f"{100 * metrics['eval_clean_acc']:.2f}"
    assert info["autoattack_acc"] == f"{100 * metrics['eval_aa_apgd-ce.apgd-t_acc']:.2f}"
    assert info["raylab"]["test_images"] == 32 and "apgd-ce" in info["footnote"] + str(info["raylab"])


@pytest.mark.ray
def test_a_finished_sweep_restores_without_rerunning_and_generations_are_shared(ray_session, steps_sweep, root):
    from raylab.tune.experiment import run_ablation

    steps = ablation(next(p for p in EXPERIMENTS if p.stem == "ablate_steps"))
    uri, before = sweep_parents(root)
    runs_before = {p.run_id: len(child_runs(uri, p.run_id)) for p in before}
    assert run_ablation(steps, ["--smoke", "--set", f"tracking.root={root}"]) == 0
    _, after = sweep_parents(root)
    assert {p.run_id for p in after} == set(runs_before)  # same parent run: restored, not a new sweep
    assert {p.run_id: len(child_runs(uri, p.run_id)) for p in after} == runs_before  # no trial reran
    generations = sorted((Path(root) / "artifacts").glob("generate-*"))
    generations = [g for g in generations if g.is_dir()]
    assert len(generations) == len(steps.values["smoke"])  # one generation per step count


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom, flags=re.S)))


@pytest.mark.ray
def test_the_mlflow_ui_opens_on_the_sweep_in_a_real_browser(steps_sweep, root, tmp_path):
    """`raylab ui` on the smoke sweep's store, loaded in headless Debian chromium, as the README's "Compare runs"
    says: (1) the printed URL shows the sweep's trials, named by their swept values, with the swept param and their
    key metrics, without configuring columns or expanding the parent (MLflow 3 otherwise opens on its GenAI
    overview, with the trials under a collapsed parent and no metric column); (2) its chart view plots each
    evaluation accuracy against the swept param; (3) the parent run's Overview shows the report's table as its
    description with the figures (served by the tracking server) and each arm's key metrics. Screenshots are kept
    as test output."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from tests.tracking import browser
    from tests.tracking.test_ui import _group_gone, _line_matching

    if browser.chromium() is None:
        pytest.fail("Debian chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
    shots = browser.output_dir(tmp_path) / "mlflow-ui"
    parent, trials = steps_sweep.parent, steps_sweep.trials
    proc = subprocess.Popen([sys.executable, "-m", "raylab", "ui", "--port", "0", "--set", f"tracking.root={root}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = _line_matching(proc, r"^MLflow UI: (\S+) ", timeout_s=120)[1]
        assert "workflowType=machine_learning" in url and "viewStateShareKey=" in url
        text = _text(browser.dump_dom(url, until="eval_clean_acc"))
        assert "Model registry" in text and "Token Usage" not in text  # the ML side bar, not GenAI's overview
        assert parent.name in text and all(t.name in text for t in trials)  # trials shown, not under a collapsed row
        assert all(c in text for c in (steps_sweep.key, "eval_clean_acc", "eval_pgd2_acc"))  # columns, unasked
        assert all(str(t.metrics["eval_clean_acc"]) in text for t in trials)  # each trial's own value
        browser.screenshot(url, shots / "runs.png")

        aa = next(k for k in trials[0].metrics if k.startswith("eval_aa_") and "_after_" not in k)
        charts = f"{url}&compareRunsMode=CHART"
        text = _text(browser.dump_dom(charts, until=f"{steps_sweep.key} vs. {aa}", budget_ms=browser.CHARTS_BUDGET_MS))
        assert f"{steps_sweep.key} vs. {aa}" in text and f"{steps_sweep.key} vs. eval_clean_acc" in text
        browser.screenshot(charts, shots / "charts.png", budget_ms=browser.CHARTS_BUDGET_MS)

        base = url.split("#")[0]
        run_url = f"{base}#/experiments/{parent.experiment_id}/runs/{parent.run_id}?workflowType=machine_learning"
        dom = browser.dump_dom(run_url, until="get-artifact?path=figures")
        text = _text(dom)
        assert "Status Finished" in text and "status FINISHED" in text  # the run, and its report, say how it ended
        description = text.split("Description", 1)[1]
        assert f"{steps_sweep.key} FD (scorer feats) Clean PGD-2 AA" in description  # the table's header...
        assert all(f" {t.params[steps_sweep.key]} {t.metrics['fd_scorer_features']:.4g} " in description
                   for t in trials)  # ...and a row per arm
        for t in trials:  # each arm's key metrics in the Overview's metrics table
            assert f"steps_{t.params[steps_sweep.key]}/eval_clean_acc {t.metrics['eval_clean_acc']}" in text
        figures = re.findall(r'<img src="(get-artifact\?path=figures%2F[\w.]+\.png&amp;run_uuid=\w+)"', dom)
        assert len(figures) == 4
        with urllib.request.urlopen(base + figures[0].replace("&amp;", "&"), timeout=30) as resp:
            assert resp.read(8) == b"\x89PNG\r\n\x1a\n"  # the server shows them where the description links
        browser.screenshot(run_url, shots / "parent_run.png", size="1600,2400")
        assert all((shots / f).stat().st_size > 10_000 for f in ("runs.png", "charts.png", "parent_run.png"))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0 and _group_gone(proc.pid)


@pytest.mark.ray
def test_train_on_a_generated_view_logs_its_lineage(steps_sweep, root, capsys):
    """`raylab train --generated VIEW` records the view like a sweep trial does: content identity, store, scorer."""
    from raylab import cli
    from raylab.pipeline.generated_input import generated_lineage
    from raylab.tracking import client_for

    view = steps_sweep.trials[0].tags["dataset.generated.source"]
    assert cli.main(["train", "--preset", "smoke", "--generated", view, "--set", f"tracking.root={root}",
                     "--set", "train.seed=7"]) == 0
    run_id = re.search(r"MLflow run: (\w+)", capsys.readouterr().out)[1]
    run = client_for(steps_sweep.uri).get_run(run_id)
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    expected = generated_lineage(view)
    assert inputs["generated"].digest == expected["manifest_hash"][:36] and "original" in inputs
    profile = json.loads(inputs["generated"].profile)
    assert profile["store"] == str(expected["extra"]["store"]) and profile["scorer"] == expected["extra"]["scorer"]
    assert run.data.tags["dataset.generated.scorer"] == profile["scorer"] != "none"


def test_an_interrupted_sweep_exits_130_with_one_line(monkeypatch, capsys):
    from raylab.tune import sweep
    from raylab.tune.experiment import run_ablation

    def interrupted(*args, **kwargs):
        raise sweep.SweepInterrupted("sweep steps-x: interrupted after 1 of 2 trials; Tune state kept in /r/tune/x")
    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    ab = ablation(next(p for p in EXPERIMENTS if p.stem == "ablate_steps"))
    assert run_ablation(ab, ["--preset", "smoke"]) == 130
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("interrupted: sweep steps-x: interrupted after 1 of 2") and "resume with: python" in line
