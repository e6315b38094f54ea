"""The same pipeline for the Gaussian baseline and an unconditional EDM; the CLI verbs; errors before compute."""
import json
import shutil

import numpy as np
import pytest

from raylab import cli
from raylab.config import EDMConfig
from raylab.data.shard_layout import load_manifest
from raylab.data.shards import read_numpy
from raylab.data.shard_verify import verify_store
from raylab.generate.checkpoint import save_edm
from raylab.generate.networks import build_edm
from raylab.pipeline import generate_job
from raylab.pipeline.gaussian import load_gaussian
from raylab.pipeline.generators import GenerateError
from raylab.pipeline.generate_job import plan_job, run_generate
from raylab.pipeline.scoring import score_store
from raylab.pipeline.select import SelectError, load_scores, scores_path
from raylab.pipeline.quality import scorer_identity
from tests.pipeline.helpers import TINY_EDM, job_config


@pytest.fixture()
def no_default_scorer(monkeypatch, tmp_path):
    """Pretend the committed digits scorer (raylab/assets/scorer-digits) is absent, as for a dataset without one."""
    monkeypatch.setattr(generate_job, "DEFAULT_SCORER", tmp_path / "absent" / "best.pt")


def test_gaussian_generator_runs_through_the_cli_without_a_scorer(assets, tmp_path, ray_session, capsys):
    store = tmp_path / "store"
    sets = ["generate.generator=gaussian", "generate.checkpoint=", "select.scorer_checkpoint=none",
            "select.policy=none",
            "generate.per_class=10", "generate.shard_size=50", f"tracking.root={tmp_path / 'runs'}"]
    rc = cli.main(["generate", "--out", str(store)] + [a for s in sets for a in ("--set", s)])
    assert rc == 0
    assert "scoring off" in capsys.readouterr().out
    assert verify_store(store) == []
    data = read_numpy(store)
    assert "score" not in data and len(data["seed"]) == 100
    np.testing.assert_array_equal(data["label"], np.arange(100) % 10)  # class-interleaved plan
    fit = load_gaussian(store / "gaussian-fit-rank256.npz")  # generate.gaussian_rank's default
    ident = load_manifest(store)["identity"]
    assert ident["generator"]["kind"] == "gaussian" and ident["sampler"] is None and ident["scorer"] is None
    # Samples sit around their class mean: closer to their own class's mean than to any other's, on average.
    flat = data["image"].reshape(100, -1).astype(np.float64)
    dist = ((flat[:, None, :] - fit.mean[None].astype(np.float64)) ** 2).sum(-1)
    assert (dist.argmin(1) == data["label"]).mean() > 0.8


def test_unconditional_edm_takes_scorer_pseudo_labels(assets, tmp_path, ray_session):
    cfg = job_config(assets, tmp_path, {"generate.checkpoint": str(assets["edm_uncond"]), "generate.per_class": 4,
                                        "resources.sampler_actors": 1})
    out = run_generate(cfg, tmp_path / "store", track=False)
    data = read_numpy(out.store)
    assert len(data["seed"]) == 40 and set(data["class_cond"].tolist()) == {-1}
    np.testing.assert_array_equal(data["label"], data["pred"])
    np.testing.assert_array_equal(data["score"], data["confidence"])
    assert load_manifest(out.store)["identity"]["generator"]["label_dim"] == 0


def test_agreement_selection_scores_the_store_a_second_time_via_the_cli(reference_run, assets, tmp_path, capsys):
    cfg, ref = reference_run
    store = shutil.copytree(ref.store, tmp_path / "store")
    view = tmp_path / "view"
    sets = ["select.policy=agreement", f"select.scorer_checkpoint={assets['scorer']}",
            f"select.second_checkpoint={assets['scorer2']}", "select.agreement_confidence=0.9"]
    assert cli.main(["select", str(view), "--store", str(store)] + [a for s in sets for a in ("--set", s)]) == 0
    described = json.loads(capsys.readouterr().out)
    second = load_scores(scores_path(store, scorer_identity(assets["scorer2"])["sha256"]))[1]
    first = read_numpy(store, ["seed", "pred", "confidence"])
    np.testing.assert_array_equal(second["seed"], first["seed"])
    drop = (first["pred"] != second["pred"]) & (first["confidence"] < 0.9) & (second["confidence"] < 0.9)
    assert described["rows"] == int((~drop).sum()) and described["policy"] == "agreement"
    assert cli.main(["data", "describe", str(view)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == described["rows"]
    cached = scores_path(store, scorer_identity(assets["scorer2"])["sha256"])
    stamp = cached.stat().st_mtime_ns
    assert score_store(cfg, store, assets["scorer2"]) == cached and cached.stat().st_mtime_ns == stamp


def test_empty_scorer_setting_means_the_committed_digits_scorer_if_there_is_one(assets, tmp_path, monkeypatch):
    spec = plan_job(job_config(assets, tmp_path, {"select.scorer_checkpoint": ""}), tmp_path / "a")
    if generate_job.DEFAULT_SCORER.is_file():
        assert spec.scorer["file"] == str(generate_job.DEFAULT_SCORER.resolve()) and spec.note == ""
    monkeypatch.setattr(generate_job, "DEFAULT_SCORER", tmp_path / "absent" / "best.pt")
    spec = plan_job(job_config(assets, tmp_path, {"select.scorer_checkpoint": "", "select.policy": "none"}),
                    tmp_path / "b")
    assert spec.scorer is None and "no scorer" in spec.note


def test_bad_generator_settings_fail_before_any_compute(assets, tmp_path, no_default_scorer):
    with pytest.raises(GenerateError, match="generates nothing"):
        plan_job(job_config(assets, tmp_path, {"generate.generator": "none"}), tmp_path / "a")
    with pytest.raises(GenerateError, match="does not exist"):
        plan_job(job_config(assets, tmp_path, {"generate.checkpoint": str(tmp_path / "nope")}), tmp_path / "b")
    with pytest.raises(GenerateError, match="pseudo-labels"):
        plan_job(job_config(assets, tmp_path, {"generate.checkpoint": str(assets["edm_uncond"]),
                                               "select.scorer_checkpoint": "", "select.policy": "none"}),
                 tmp_path / "c")
    five = save_edm(tmp_path / "edm5", build_edm(EDMConfig(**TINY_EDM), label_dim=5))
    with pytest.raises(GenerateError, match="5 classes"):
        plan_job(job_config(assets, tmp_path, {"generate.checkpoint": str(five)}), tmp_path / "d")
    assert cli.main(["select", str(tmp_path / "v"), "--store", str(tmp_path / "nostore")]) == 2
    for policy in ("topk", "pseudo"):  # ranking by a score nobody computes: refused before sampling
        with pytest.raises(SelectError, match=f"select.policy={policy}: ranks by the scorer"):
            plan_job(job_config(assets, tmp_path, {"select.scorer_checkpoint": "", "select.policy": policy}),
                     tmp_path / "e")
    assert not any((tmp_path / n / "manifest.json").exists() for n in "abcde")  # no store was created


def test_each_stage_gets_its_own_resources_and_device_in_the_built_pipeline(assets, tmp_path, ray_session):
    """GPU by configuration alone: the lazy plan (not executed, so no GPU is needed) carries the scorer's GPUs on
    the scorer stage only, and hands the scorer actors a spec that asks for a GPU device."""
    from raylab.pipeline.actors import SamplerActor, ScorerActor
    from raylab.pipeline.generate_job import build_pipeline

    cfg = job_config(assets, tmp_path, {"resources.scorer_gpus_per_actor": 0.5,
                                        "resources.scorer_cpus_per_actor": 2.0, "resources.max_failures": 3})
    spec = plan_job(cfg, tmp_path / "store")
    ops = {op.fn: op for op in build_pipeline(spec, [(0, 19)], cfg.resources)._logical_plan.dag.post_order_iter()
           if getattr(op, "fn", None) in (SamplerActor, ScorerActor)}
    sampler, scorer = ops[SamplerActor], ops[ScorerActor]
    assert scorer.ray_remote_args.items() >= {"num_cpus": 2.0, "num_gpus": 0.5}.items()
    # Restarts are Ray Data's defaults (unlimited), not the deprecated remote args (which only lowered them).
    assert not {"max_restarts", "max_task_retries"} & (scorer.ray_remote_args.keys() | sampler.ray_remote_args.keys())
    assert sampler.ray_remote_args.get("num_gpus") is None and sampler.ray_remote_args["num_cpus"] == 1.0
    assert scorer.fn_constructor_kwargs["spec"].use_gpu and not sampler.fn_constructor_kwargs["spec"].use_gpu


def test_a_sweep_view_with_the_agreement_policy_scores_the_set_a_second_time(reference_run, assets, tmp_path):
    """raylab.tune.artifacts.ensure_view: generation found in the artifact cache, second scorer run, view built
    like `raylab select` builds it, and the resolved config beside both artifacts."""
    from raylab.config import from_json, override
    from raylab.io import atomic_write_json
    from raylab.runs import GENERATION_KEYS
    from raylab.tune.artifacts import address, artifacts_root, ensure_view

    cfg, ref = reference_run
    cfg = override(cfg, {"tracking.root": str(tmp_path / "runs"), "select.policy": "agreement",
                         "select.second_checkpoint": str(assets["scorer2"])})
    folder = artifacts_root(cfg) / f"generate-{address(cfg, GENERATION_KEYS)}"
    store = shutil.copytree(ref.store, folder / "shards")
    atomic_write_json(folder / "generate.json", {"store": str(store), "identity_hash": ref.identity_hash, "fd": 1.0})
    view = ensure_view(cfg)
    first = read_numpy(store, ["seed", "pred", "confidence"])
    second = load_scores(scores_path(store, scorer_identity(assets["scorer2"])["sha256"]))[1]
    drop = (first["pred"] != second["pred"]) & (first["confidence"] < 0.9) & (second["confidence"] < 0.9)
    assert view.rows == int((~drop).sum()) and view.fd == 1.0
    assert json.loads((view.view_path / "view.json").read_text())["second_scorer"]["scorer"]["sha256"] == \
        scorer_identity(assets["scorer2"])["sha256"]
    assert from_json((view.view_path / "config.json").read_text()) == cfg
    assert from_json((folder / "config.json").read_text()) == cfg
