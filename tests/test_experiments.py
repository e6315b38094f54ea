"""Every experiments/ablate_*.py in its --smoke mode, end to end on the session Ray (CI runs these), plus the
sweep machinery they stand on: artifact reuse across trials and sweeps, lineage, restore without reruns."""
import runpy
from pathlib import Path

import pytest

from raylab.config import make_config
from raylab.tune.experiment import SMOKE
from raylab.tracking import child_runs, find_runs, resolve_tracking_uri, TrackingConfig

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("ablate_*.py"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")  # shared: later sweeps reuse earlier generations


def ablation(path):
    return runpy.run_path(str(path), run_name="not_main")["ABLATION"]


def sweep_parents(root):
    uri = resolve_tracking_uri(TrackingConfig(root=str(root)))
    return uri, find_runs(uri, "raylab", "tags.`raylab.stage` = 'sweep'")


@pytest.mark.ray
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_smoke_mode_runs_end_to_end(ray_session, root, path, capsys):
    from raylab.tune.experiment import run_ablation

    ab = ablation(path)
    assert run_ablation(ab, ["--smoke", "--set", f"tracking.root={root}"]) == 0
    out = capsys.readouterr().out
    assert "raylab ui" in out
    uri, parents = sweep_parents(root)
    parent = [p for p in parents if p.tags["raylab.sweep_keys"] == ab.key][-1]
    trials = [r for r in child_runs(uri, parent.run_id) if r.tags.get("raylab.stage") == "train"]
    assert sorted(r.params[ab.key] for r in trials) == sorted(str(v) for v in ab.values["smoke"])
    for trial in trials:
        assert 0.0 <= trial.metrics["final_eval_clean_acc"] <= 1.0
        if make_config("tiny", {ab.key: trial.params[ab.key]}).train.ratio < 1:
            assert trial.tags["dataset.identity"]  # lineage: the generated set's manifest hash


@pytest.mark.ray
def test_a_finished_sweep_restores_without_rerunning_and_generations_are_shared(ray_session, root):
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
    # one generation per distinct steps value; every other smoke sweep shares the one at SMOKE's step count
    assert len(generations) == len(set(steps.values["smoke"]) | {SMOKE["generate.steps"]})
