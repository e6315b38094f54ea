"""Faults: a sampler actor killed mid-job, and a job interrupted then rerun (resume)."""
import os
import shutil

from raylab.data.shards import load_manifest, verify_store
from raylab.io import atomic_write_json
from raylab.pipeline.generate_job import run_generate
from tests.pipeline.helpers import job_config
from tests.pipeline.test_generate_job import shard_hashes


def test_a_killed_sampler_actor_is_restarted_and_the_set_is_exact(reference_run, assets, tmp_path):
    _, ref = reference_run
    marker = tmp_path / "crashed"
    cfg = job_config(assets, tmp_path)
    out = run_generate(cfg, tmp_path / "store", track=False, crash_marker=str(marker))
    assert marker.exists()  # the first sampler call really did os._exit() its actor
    assert verify_store(out.store) == []
    assert out.shards_written == 6
    assert shard_hashes(out.store) == shard_hashes(ref.store)


def test_interrupted_job_reruns_only_missing_shards_and_leaves_the_rest_untouched(reference_run, assets, tmp_path):
    _, ref = reference_run
    store = shutil.copytree(ref.store, tmp_path / "store")
    names = sorted(p.name for p in store.glob("gen-*.parquet"))
    # The states a crash can leave: a shard file lost, a shard renamed into place but never recorded in the
    # manifest (crash between rename and manifest update), a half-written temp file.
    (store / names[1]).unlink()
    manifest = load_manifest(store)
    del manifest["shards"][names[4]]
    atomic_write_json(store / "manifest.json", manifest)
    (store / f".{names[2]}.abc.tmp").write_bytes(b"partial")
    kept = [n for i, n in enumerate(names) if i not in (1, 4)]
    before = {n: (os.stat(store / n).st_mtime_ns, os.stat(store / n).st_ino) for n in kept}

    out = run_generate(job_config(assets, tmp_path, {"resources.sampler_actors": 1}), store, track=False)
    assert (out.shards_written, out.shards_present, out.images_written) == (2, 4, 40)
    assert {n: (os.stat(store / n).st_mtime_ns, os.stat(store / n).st_ino) for n in kept} == before
    assert shard_hashes(store) == shard_hashes(ref.store)
    assert verify_store(store) == []  # the stale temp file is gone too
    again = run_generate(job_config(assets, tmp_path), store, track=False)
    assert again.shards_written == 0 and again.shards_present == 6
