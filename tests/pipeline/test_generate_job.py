"""The generation job end to end on Ray Data (CPU actors): exact, complete, verified, tracked."""
import shutil

import numpy as np

from raylab.config import override
from raylab.data.shards import load_manifest, read_numpy, verify_store
from raylab.io import sha256_file
from raylab.pipeline.generate_job import run_generate
from raylab.tracking import client_for, get_run
from tests.pipeline.helpers import job_config


def shard_hashes(store) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(store.glob("gen-*.parquet"))}


def test_every_plan_index_once_with_scores_and_a_sound_store(reference_run):
    cfg, out = reference_run
    assert verify_store(out.store) == []
    assert out.shards_written == 6 and out.images_written == 120 and out.shards_present == 0
    assert out.sample_seconds > 0 and out.score_seconds > 0 and 0 < out.sampler_utilization <= 1
    data = read_numpy(out.store, ["seed", "label", "class_cond", "score", "pred", "confidence"])
    np.testing.assert_array_equal(data["seed"], np.arange(120))  # each plan index exactly once, in order
    np.testing.assert_array_equal(data["class_cond"], np.arange(120) // 12)  # seed = class * per_class + j
    np.testing.assert_array_equal(data["label"], data["class_cond"])
    assert np.all((data["score"] > 0) & (data["score"] <= data["confidence"] + 1e-6))
    assert load_manifest(out.store)["identity"]["plan"]["per_class"] == 12


def test_one_actor_and_another_batch_size_give_identical_bytes(reference_run, assets, tmp_path):
    _, ref = reference_run
    cfg = job_config(assets, tmp_path, {"resources.sampler_actors": 1, "generate.batch_size": 5})
    out = run_generate(cfg, tmp_path / "store", track=False)
    assert out.identity_hash == ref.identity_hash  # batch size and actor count are not part of the identity
    assert shard_hashes(out.store) == shard_hashes(ref.store)
    assert len(shard_hashes(out.store)) == 6


def test_mlflow_run_has_throughput_identity_grids_balance_and_scores(reference_run, tmp_path, mlflow_uri):
    cfg, ref = reference_run
    store = shutil.copytree(ref.store, tmp_path / "store")  # complete: this run samples nothing, only reports
    cfg = override(cfg, {"tracking.uri": mlflow_uri})
    out = run_generate(cfg, store, track=True, fd_images=60)
    run = get_run(mlflow_uri, out.mlflow_run_id)
    assert run.status == "FINISHED" and run.tags["dataset.identity"] == out.identity_hash
    assert run.metrics["images_total"] == 120 and run.metrics["shards_present"] == 6
    assert {"images_per_s", "sampler_utilization", "sampler_busy_s"} <= set(run.metrics)
    assert run.metrics["class_count/3"] == 12 and run.metrics["fd_scorer_features"] >= 0
    assert run.params["generate.per_class"] == "12"
    client = client_for(mlflow_uri)
    listed = {a.path for folder in ("samples", "plots", "dataset", "tables")
              for a in client.list_artifacts(out.mlflow_run_id, folder)}
    assert {"samples/class_000.png", "samples/class_009.png", "plots/score_hist.png", "dataset/identity.json",
            "dataset/manifest.json"} <= listed


def test_a_corrupted_shard_is_reported_by_name(reference_run, tmp_path):
    _, ref = reference_run
    copy = shutil.copytree(ref.store, tmp_path / "copy")
    victim = sorted(copy.glob("gen-*.parquet"))[2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = verify_store(copy)
    assert len(problems) == 1 and victim.name in problems[0] and "corrupted" in problems[0]
