"""The dress rehearsal's own logic (`raylab.rehearse.dress`): what its job may set, and how it reads back what the
trials ran against `--preset paper`. The job itself runs on the rehearsal cluster (`raylab rehearse --dress`)."""
import pytest

from raylab.config import override, to_flat
from raylab.rehearse import dress
from raylab.tracking.mlflow_store import _param_text
from raylab.tune.experiment import compose

INPUTS = {"generate.checkpoint": "/shared/runs/edm/x/network", "select.scorer_checkpoint": "/shared/runs/s/best.pt",
          "data.root": "/shared/data", "tracking.root": "/shared/runs"}


def logged_trials(name, sets, change=None):
    """What the miniature sweep's trials log as MLflow params (strings), as the job would read them back."""
    import runpy

    ablation = runpy.run_path(f"experiments/{name}.py", run_name="not_main")["ABLATION"]
    small = compose(ablation, "paper", sets, dress.EXPERIMENTS[name], small=True)
    arms = [override(small.cfg, {ablation.key: v, **small.coupled(v)} if small.coupled else {ablation.key: v})
            for v in small.values]
    return [{k: _param_text(v) for k, v in to_flat(override(arm, change or {})).items()} for arm in arms]


@pytest.mark.parametrize("name", sorted(dress.EXPERIMENTS))
def test_a_miniature_trial_differs_from_its_paper_arm_only_in_sizes(name):
    found, wrong = dress.differences(name, INPUTS, logged_trials(name, INPUTS))
    assert wrong == [] and {"model.name", "train.epochs", "generate.per_class"} <= set(found)
    assert found["model.name"] == ({"wrn-28-10"}, {"wrn-10-1"})


def test_anything_but_a_size_that_differs_fails_the_rehearsal():
    found, wrong = dress.differences("ablate_amount", INPUTS, logged_trials("ablate_amount", INPUTS,
                                                                            {"train.lr": 0.1}))
    assert wrong == ["train.lr"] and found["train.lr"] == ({0.2}, {0.1})
    # The amount arms keep their full-size rules: a trial selecting differently than its arm would is caught.
    _, wrong = dress.differences("ablate_amount", INPUTS, logged_trials("ablate_amount", INPUTS,
                                                                        {"select.policy": "none"}))
    assert wrong == ["select.policy"]


def test_the_job_takes_locations_only():
    assert dress.locations(["--set", "data.root=/x", "--set", "tracking.uri=http://h:5000"]) == {
        "data.root": "/x", "tracking.uri": "http://h:5000"}
    with pytest.raises(SystemExit, match="--set train.epochs: the dress rehearsal keeps every paper knob"):
        dress.locations(["--set", "train.epochs=1"])
