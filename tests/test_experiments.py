"""Every experiments/ablate_*.py in its --smoke mode, end to end on the session Ray (CI runs these), plus the
sweep machinery they stand on: artifact reuse across trials and sweeps, lineage, restore without reruns."""
import runpy
from pathlib import Path

import pytest

from raylab.config import make_config
from raylab.config import TrackingConfig
from raylab.tracking import child_runs, find_runs, resolve_tracking_uri

SMOKE_STEPS = "4"
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
    for mode in ("default", "smoke", "paper"):
        cfg, values = compose(ab, mode, {})
        check_space(cfg, {ab.key: values}, ab.coupled.get(mode))
    paper = compose(ab, "paper", {})[0]
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
    cfg, values = compose(ab, "paper", {})
    rule = ab.coupled["paper"]
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


@pytest.mark.ray
def test_steps_smoke_runs_end_to_end(ray_session, root, capsys, monkeypatch):
    """The main job's smoke mode, one step count of its two (.ci/run runs every experiment's full --smoke as its
    own process; one trial here keeps the suite short). The run root is relative, as the README's default `runs`:
    trials run in Tune's trial directories, so the driver must pin it."""
    from raylab.tune.experiment import run_ablation

    ab = ablation(next(p for p in EXPERIMENTS if p.stem == "ablate_steps"))
    monkeypatch.chdir(root.parent)
    assert run_ablation(ab, ["--smoke", "--values", SMOKE_STEPS, "--set", f"tracking.root={root.name}"]) == 0
    out = capsys.readouterr().out
    assert "raylab ui" in out
    uri, parents = sweep_parents(root)
    parent = [p for p in parents if p.tags["raylab.sweep_keys"] == ab.key][-1]
    trials = [r for r in child_runs(uri, parent.run_id) if r.tags.get("raylab.stage") == "train"]
    assert [r.params[ab.key] for r in trials] == [SMOKE_STEPS]
    for trial in trials:
        assert 0.0 <= trial.metrics["final_eval_clean_acc"] <= 1.0
        ledger = {k: trial.metrics[f"final_cost_{k}"] for k in ("generate_device_s", "train_device_s",
                                                                 "eval_device_s", "per_kept_image_s")}
        assert all(v > 0 for v in ledger.values()), ledger  # the measured cost of the trial's stages
        if make_config("tiny", {ab.key: trial.params[ab.key]}).train.ratio < 1:
            assert trial.tags["dataset.identity"]  # lineage: the generated set's manifest hash


@pytest.mark.ray
def test_a_finished_sweep_restores_without_rerunning_and_generations_are_shared(ray_session, root):
    from raylab.tune.experiment import run_ablation

    steps = ablation(next(p for p in EXPERIMENTS if p.stem == "ablate_steps"))
    uri, before = sweep_parents(root)
    runs_before = {p.run_id: len(child_runs(uri, p.run_id)) for p in before}
    assert run_ablation(steps, ["--smoke", "--values", SMOKE_STEPS, "--set", f"tracking.root={root}"]) == 0
    _, after = sweep_parents(root)
    assert {p.run_id for p in after} == set(runs_before)  # same parent run: restored, not a new sweep
    assert {p.run_id: len(child_runs(uri, p.run_id)) for p in after} == runs_before  # no trial reran
    generations = sorted((Path(root) / "artifacts").glob("generate-*"))
    generations = [g for g in generations if g.is_dir()]
    assert len(generations) == 1  # one generation per step count
