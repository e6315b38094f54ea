"""Fault drills of the generation job: a sampler actor killed mid-job (after shards were written), and a running
`raylab generate` interrupted for real (its driver SIGKILLed) then rerun. Each must end with exactly the store an
undisturbed run writes, the rerun writing only the missing shards; no shard already on disk is ever touched."""
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from raylab.data.shard_layout import MANIFEST_NAME, load_manifest, shard_name, temp_files
from raylab.data.shards import read_numpy
from raylab.data.shard_verify import verify_store
from raylab.pipeline.actors import SamplerActor, ScorerActor, write_shards
from raylab.pipeline.generate_job import DEFAULT_SCORER, plan_job, run_generate
from tests.pipeline.test_generate_job import digits_config, shard_hashes

REPO = Path(__file__).resolve().parents[2]
# 80 images in 8 shards of 10: shards small enough that the drills strike with most of the job still to do. One
# sampler actor: on 2 cores every extra actor mostly adds start-up time.
DRILL = {"generate.per_class": 8, "generate.shard_size": 10, "generate.batch_size": 10, "resources.sampler_actors": 1}
SHARDS = 8


def drill_config(tmp_path: Path, overrides: dict | None = None):
    return digits_config(tmp_path, DRILL | (overrides or {}))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, str]:
    """sha256 per shard of an undisturbed run: the job's own stage UDFs called one shard at a time in this
    process, without Ray (so no fault of the pipeline can hide in the reference)."""
    if not DEFAULT_SCORER.is_file():
        pytest.skip("the committed digits scorer is not in this checkout")
    root = tmp_path_factory.mktemp("clean")
    spec = plan_job(drill_config(root), root / "store")
    sampler, scorer = SamplerActor(spec), ScorerActor(spec)
    for first, last in spec.plan.shards():
        write_shards(scorer(sampler({"first": np.array([first]), "last": np.array([last])})), spec.store, spec.plan)
    return shard_hashes(root / "store")


def recorded(store: Path) -> dict[str, tuple[int, int, str]]:
    """(mtime_ns, inode, sha256 in the manifest) of every shard the manifest records now."""
    if not (store / MANIFEST_NAME).exists():
        return {}
    entries = load_manifest(store)["shards"]
    return {n: (os.stat(store / n).st_mtime_ns, os.stat(store / n).st_ino, e["sha256"]) for n, e in entries.items()}


@contextlib.contextmanager
def watch(store: Path) -> Iterator[dict[str, tuple[int, int, str]]]:
    """Each shard's `recorded` stamp as first seen, polled every 20 ms while the block runs."""
    seen: dict[str, tuple[int, int, str]] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.02):
            seen.update({k: v for k, v in recorded(store).items() if k not in seen})

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def assert_exact(store: Path, clean: dict[str, str]) -> None:
    """Sound store, every seed of the plan exactly once, bytes of the undisturbed run."""
    assert verify_store(store) == []
    np.testing.assert_array_equal(read_numpy(store, ["seed"])["seed"], np.arange(SHARDS * 10))
    assert shard_hashes(store) == clean


def _wait(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.02)


def _job_workers() -> list[int]:
    """Ray Data workers (sampler / scorer actors, writer tasks) of this test session's Ray: processes titled
    `ray::…MapBatches(…` whose parent is a raylet started by this process (other Ray instances may share the box)."""
    def parent(pid: str) -> int:
        with contextlib.suppress(OSError):
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return -1

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"MapBatches(" in title and parent(str(parent(pid))) == os.getpid():
                found.append(int(pid))
    return found


def _interrupt_cli_job(ray_session, store: Path, tmp_path: Path) -> None:
    """Start `raylab generate` as a user runs it, on this session's Ray (RAY_ADDRESS), and SIGKILL its driver once
    the store records a shard: Ray ends the driver's job, killing its actors and tasks wherever they are."""
    sets = {k: str(v) for k, v in DRILL.items()} | {"generate.checkpoint": "", "select.scorer_checkpoint": "",
                                                    "generate.steps": "2", "generate.solver": "euler",
                                                    "tracking.root": str(tmp_path / "runs")}
    argv = [sys.executable, "-m", "raylab", "generate", "--out", str(store)]
    argv += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: len(recorded(store)) >= 1 or driver.poll() is not None, 120, "the first shard")
        assert driver.poll() is None and _job_workers(), log.read_text()[-2000:]  # the job is running
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    _wait(lambda: not _job_workers(), 30, "Ray to end the killed job's workers")


def test_a_sampler_actor_killed_mid_job_is_restarted_and_the_set_is_exact(clean, ray_session, tmp_path):
    marker, store = tmp_path / "killed", tmp_path / "store"
    with watch(store) as seen:
        # The sampler actor dies as it starts its 3rd shard, once its first 2 are recorded (actors._fault_drill);
        # one actor, so the job can only finish through Ray restarting it and retrying that shard.
        out = run_generate(drill_config(tmp_path), store, track=False, fault_after_shards=(str(marker), 2))
    assert int(marker.read_text()) >= 2  # the actor really died, mid-job, with >= 2 shards on disk
    assert (out.shards_written, out.images_written) == (SHARDS, SHARDS * 10)
    assert seen == recorded(store)  # no shard, written before or after the crash, was ever rewritten
    assert_exact(store, clean)


def test_an_interrupted_job_reruns_only_missing_shards_and_leaves_the_rest_untouched(clean, ray_session, tmp_path):
    store = tmp_path / "store"
    _interrupt_cli_job(ray_session, store, tmp_path)
    kept = recorded(store)
    assert 1 <= len(kept) < SHARDS  # interrupted mid-job
    # Whatever the kill left: the recorded shards are sound; only a temp file or an unrecorded (orphan) shard may
    # be reported. A writer is cut mid-file only by chance, so one such temp file is added as it would be left.
    (store / f".{shard_name(70, 79)}.cut.tmp").write_bytes(b"PAR1 half a shard")
    assert all(p.endswith(("(orphan)", "interrupted write")) for p in verify_store(store))

    out = run_generate(drill_config(tmp_path, {"generate.batch_size": 7}), store, track=False)
    assert (out.shards_written, out.shards_present) == (SHARDS - len(kept), len(kept))  # temp files not counted
    assert {n: v for n, v in recorded(store).items() if n in kept} == kept  # same mtime, inode and sha256
    assert temp_files(store) == []
    assert_exact(store, clean)
    again = run_generate(drill_config(tmp_path), store, track=False)
    assert (again.shards_written, again.shards_present) == (0, SHARDS)
