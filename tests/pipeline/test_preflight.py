"""Refused in one line before compute: the original dataset and the scorer's stated architecture (generation and
sweep drivers), and the shared-root check every sampler, scorer and writer runs where Ray placed it."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from raylab.cluster import RootToken, SharedRootError, root_token
from raylab.data.datasets import DatasetError, get_dataset
from raylab.models import create_model
from raylab.pipeline.generate_job import build_pipeline, plan_job, run_generate
from raylab.pipeline.quality import QualityError, Scorer, scorer_identity
from tests.pipeline.helpers import job_config


def _external(tmp_path, assets, config=None):
    """The test scorer's weights alone (as from another codebase), with `config` as its config.json if given."""
    folder = tmp_path / "external"
    folder.mkdir(exist_ok=True)
    shutil.copy(assets["scorer"] / "best.pt", folder / "best.pt")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder / "best.pt"


def _nothing_written(tmp_path) -> bool:
    return not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


def test_generation_refuses_a_missing_dataset_before_the_store_exists(assets, tmp_path):
    """The quality report reads the test set only after sampling every shard: hours in, at paper scale."""
    cfg = job_config(assets, tmp_path, {"data.dataset": "cifar10", "data.root": str(tmp_path / "data")})
    with pytest.raises(DatasetError) as err:
        run_generate(cfg, track=False)  # into its run directory under tracking.root
    assert "\n" not in str(err.value) and str(tmp_path / "data" / "cifar-10-python.tar.gz") in str(err.value)
    assert "data.download=true" in str(err.value) and _nothing_written(tmp_path)


def test_a_scorer_whose_architecture_is_not_stated_is_refused_before_the_store_exists(assets, tmp_path):
    best = _external(tmp_path, assets)
    cfg = job_config(assets, tmp_path, {"select.scorer_checkpoint": str(best)})
    with pytest.raises(QualityError) as err:
        run_generate(cfg, track=False)  # into its run directory under tracking.root
    assert str(err.value) == (
        f"scorer checkpoint {best}: its architecture is not stated ({best.parent / 'config.json'} is missing); put a "
        'config.json beside it that states them, e.g. {"model": {"name": "wrn-28-10", "activation": "relu"}, '
        '"data": {"dataset": "cifar10"}} (raylab\'s training runs write one)')
    assert _nothing_written(tmp_path)
    _external(tmp_path, assets, {"model": {"name": "wrn-10-1"}})  # the activation would be guessed: refused
    with pytest.raises(QualityError, match="config.json does not state model.activation, data.dataset; put"):
        plan_job(cfg, tmp_path / "store")
    assert _nothing_written(tmp_path)


def test_a_relu_scorer_is_built_as_its_config_states(tmp_path):
    """The paper's scorer is a ReLU WRN-28-10: its weights load strictly into raylab's SiLU network too (same names
    and shapes) and score differently, which is why the architecture is never guessed."""
    spec = get_dataset("digits")
    torch.manual_seed(0)
    relu = create_model("wrn-10-1", num_classes=10, mean=spec.mean, std=spec.std, activation="relu").eval()
    torch.save({"model": relu.state_dict()}, tmp_path / "best.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "wrn-10-1", "activation": "relu"},
                                                      "data": {"dataset": "digits"}}))
    scorer = Scorer.load(scorer_identity(tmp_path / "best.pt"))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        np.testing.assert_allclose(scorer.probs(images), relu(x).softmax(1).numpy(), atol=1e-6)
        silu = create_model("wrn-10-1", num_classes=10, mean=spec.mean, std=spec.std, activation="silu").eval()
        silu.load_state_dict(relu.state_dict(), strict=True)  # what the old guess did, without an error
        assert not np.allclose(silu(x).softmax(1).numpy(), relu(x).softmax(1).numpy(), atol=1e-3)


def test_weights_of_another_architecture_than_stated_are_one_line(tmp_path):
    spec = get_dataset("digits")
    torch.save({"model": create_model("wrn-16-2", num_classes=10, mean=spec.mean, std=spec.std).state_dict()},
               tmp_path / "best.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "wrn-10-1", "activation": "silu"},
                                                      "data": {"dataset": "digits"}}))
    with pytest.raises(QualityError) as err:
        scorer_identity(tmp_path)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"scorer checkpoint {tmp_path / 'best.pt'}: its weights are not a wrn-10-1 of "
                                     "digits as its config.json states (Unexpected key(s) in state_dict:")


def test_a_sweep_refuses_its_inputs_before_tune_starts(assets, tmp_path):
    from raylab.tune.sweep import run_sweep

    space = {"train.beta": [1.0, 2.0]}
    cfg = job_config(assets, tmp_path, {"data.dataset": "cifar10", "data.root": str(tmp_path / "data")})
    with pytest.raises(DatasetError, match="data.dataset=cifar10 on node "):
        run_sweep(cfg, space)
    best = _external(tmp_path, assets)
    with pytest.raises(QualityError, match="its architecture is not stated"):
        run_sweep(job_config(assets, tmp_path, {"select.scorer_checkpoint": str(best)}), space)
    agreement = {"select.policy": "agreement", "select.second_checkpoint": str(best)}
    with pytest.raises(QualityError, match=f"scorer checkpoint {best}: its architecture is not stated"):
        run_sweep(job_config(assets, tmp_path, agreement), space)
    assert _nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The shared-root check of each piece of work (a node that joined after the job's start-up probe).

def _elsewhere(tmp_path, token: RootToken) -> RootToken:
    """The token as a node sees it that mounts nothing at the root's path."""
    return replace(token, root=str(tmp_path / "not-shared"), path=str(tmp_path / "not-shared" / "x" / "root-id"))


def test_samplers_scorers_and_writers_check_the_root_before_any_work(assets, tmp_path):
    from raylab.pipeline.actors import SamplerActor, ScorerActor, ShardScorerActor, write_shards

    spec = plan_job(job_config(assets, tmp_path), tmp_path / "store")
    bad = replace(spec, root=_elsewhere(tmp_path, root_token(tmp_path / "runs")))
    for start in (lambda: SamplerActor(bad), lambda: ScorerActor(bad),
                  lambda: ShardScorerActor(spec.store, spec.scorer, False, root=bad.root),
                  lambda: write_shards(None, spec.store, spec.plan, root=bad.root)):
        with pytest.raises(SharedRootError, match=f"does not see {tmp_path / 'not-shared'}: mount the same"):
            start()
    good = replace(spec, root=root_token(tmp_path / "runs"))
    assert SamplerActor(good).sampled == [] and ScorerActor(good).scorer.num_classes == 10


def test_on_ray_a_node_without_the_root_stops_the_job_before_a_shard_is_written(ray_session, assets, tmp_path):
    spec = plan_job(job_config(assets, tmp_path), tmp_path / "store")
    spec = replace(spec, root=_elsewhere(tmp_path, root_token(tmp_path / "runs")))
    with pytest.raises(Exception) as err:
        build_pipeline(spec, spec.plan.shards(), job_config(assets, tmp_path).resources).take_all()
    assert f"does not see {tmp_path / 'not-shared'}" in str(err.value)
    assert not list((tmp_path / "store").glob("gen-*.parquet"))
