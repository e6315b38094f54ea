"""The scorer: `raylab scorer train` on Ray Train gives a CE classifier whose checkpoint the scoring code loads."""
import json
import re

import numpy as np
import pytest

from raylab import cli
from raylab.config import to_flat
from raylab.presets import make_config
from raylab.data.datasets import load_splits
from raylab.eval.export import read_state_dict
from raylab.pipeline.generate_job import resolve_scorer
from raylab.pipeline.quality import Scorer, score_columns
from raylab.train.job import scorer_config

FIXED = {"model.name", "train.loss", "train.ratio", "train.label_smoothing", "train.augment"}


@pytest.mark.parametrize("preset, dataset, model, augment", [
    ("paper", "cifar10", "wrn-28-10", "crop_flip"),   # Wang et al. 2023 App. A: a standard WRN-28-10
    ("paper", "cifar100", "wrn-28-10", "crop_flip"),
    ("paper", "svhn", "wrn-28-10", "crop"),          # digits are never mirrored
    ("tiny", "digits", "wrn-16-2", "crop"),
])
def test_scorer_config_is_plain_ce_with_the_preset_model(preset, dataset, model, augment):
    cfg = make_config(preset, {"data.dataset": dataset})
    scorer = scorer_config(cfg)
    assert (scorer.model.name, scorer.train.augment) == (model, augment) == (cfg.select.scorer_model, augment)
    assert (scorer.train.loss, scorer.train.ratio, scorer.train.label_smoothing) == ("ce", 1.0, 0.0)
    before, after = to_flat(cfg), to_flat(scorer)
    assert {k for k in before if before[k] != after[k]} <= FIXED  # everything else is the experiment's own


def test_scorer_train_verb_gives_a_checkpoint_the_scorer_loads(ray_session, tmp_path, capsys):
    sets = {"train.epochs": 1, "data.max_train": 128, "data.val_size": 32, "train.batch_size": 32,
            "train.val_pgd_steps": 1, "eval.batch_size": 128, "resources.num_workers": 1,
            "tracking.root": tmp_path / "runs"}
    argv = ["scorer", "train"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert cli.main(argv) == 0
    run_path = tmp_path / "runs" / re.search(r"run dir: \S+/(scorer/scorer-\w+)", capsys.readouterr().out)[1]

    trained = json.loads((run_path / "config.json").read_text())
    assert trained["train"]["loss"] == "ce" and trained["train"]["label_smoothing"] == 0.0
    assert trained["train"]["augment"] == "crop" and trained["train"]["ratio"] == 1.0
    assert trained["model"]["name"] == trained["select"]["scorer_model"] == "wrn-16-2"

    state, meta = read_state_dict(run_path / "best.pt")  # the safe (weights_only) loader
    assert meta["epoch"] == 1 and 0.0 <= meta["metrics"]["val_clean_acc"] <= 1.0
    assert "logits.weight" in state and state["logits.weight"].shape[0] == 10

    cfg = make_config("tiny", {"select.scorer_checkpoint": str(run_path)})
    identity, note = resolve_scorer(cfg)
    assert note == "" and identity["file"] == str((run_path / "best.pt").resolve())
    assert (identity["model"], identity["dataset"]) == ("wrn-16-2", "digits")
    test = load_splits(cfg.data).test
    probs = Scorer.load(identity).probs(test.images[:20])
    assert probs.shape == (20, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    cols = score_columns(probs, test.labels[:20])
    assert np.array_equal(cols["label"], test.labels[:20]) and (cols["score"] <= cols["confidence"]).all()
