"""`raylab rehearse`: the refusal lines, the start commands read from cluster.yaml, the contract checks, and a real
cluster whose worker node does not see the shared root. (The full rehearsal, with the node-loss fault on the default
smoke job, runs in .ci/run.)"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylab.rehearse.checks import TrialEpochs, contract_lines, outputs_under, stray_outputs
from raylab.rehearse.run import missing_privilege
from raylab.rehearse.spec import load_spec, resources_env

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"ip": True, "nsenter": True, "unshare": True, "mount": True}


def test_without_root_it_stops_at_once_with_one_line():
    assert "needs root" in missing_privilege(1000, TOOLS, None)
    assert "missing tool(s) nsenter" in missing_privilege(0, {**TOOLS, "nsenter": False}, None)
    assert "cannot create namespaces" in missing_privilege(0, TOOLS, (1, "unshare: unshare failed: Operation "
                                                                        "not permitted\n"))
    assert missing_privilege(0, TOOLS, (0, "")) is None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop privileges")
def test_an_unprivileged_user_gets_one_line_and_exit_2_fast():
    start = time.monotonic()
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                          "raylab.cli", "rehearse", "--", "true"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2 and lines == [lines[0]] and lines[0].startswith("rehearse: needs root")
    assert time.monotonic() - start < 60


def test_start_commands_come_from_cluster_yaml():
    spec = load_spec(ROOT / "cluster.yaml")
    assert "--head" in spec.head.options and spec.head.resources["CPU"] == 0  # the head takes no work
    assert spec.head.resources["trial_driver"] >= 1 and spec.head.env["RAY_AUTH_MODE"] == "token"
    assert not any(o.startswith("--autoscaling-config") for o in spec.head.options)
    assert any("mlflow server" in line for line in spec.head.before)
    lines = spec.worker.script(("--node-ip-address=10.0.0.2",), {"X": "1"}, {"$RAY_HEAD_IP": "10.0.0.1"})
    assert "env RAY_AUTH_MODE=token X=1 ray start --address=10.0.0.1:6379 --node-ip-address=10.0.0.2 && break" \
        in lines[-2] and lines[-1] == "exec sleep infinity"
    assert resources_env({"CPU": 0.0, "trial_driver": 16.0}) == '{"CPU": 0, "trial_driver": 16}'


def test_the_cluster_commands_put_both_roots_on_the_shared_mount():
    """`ray job submit --working-dir .` ships only what git tracks (data/ is ignored): a data.root left in the
    job's working directory exists on no worker, so the commands that launch a cluster job name it on the mount."""
    from raylab.rehearse.run import DEFAULT_JOB

    readme = (ROOT / "README.md").read_text().split("## Scale out")[1].split("```")[1]
    header = " ".join(line.lstrip("#") for line in (ROOT / "cluster.yaml").read_text().split("cluster_name:")[0]
                      .splitlines())
    for command in (readme, header):
        assert "--set tracking.root=/mnt/raylab/runs" in command and "--set data.root=/mnt/raylab/data" in command
    assert {"tracking.root={shared}/runs", "data.root={shared}/data"} <= set(DEFAULT_JOB)


def test_contract_lines_count_epochs_twice_and_lost():
    good = [TrialEpochs("a", 3, [1, 2, 3]), TrialEpochs("b", 3, [1, 2, 3])]
    shared = {"shards": 2, "views": 2, "checkpoints": 4, "ray storage": 2}
    assert contract_lines(good, shared, [], 2) == []
    bad = contract_lines([TrialEpochs("a", 3, [1, 2, 2])], {**shared, "views": 0}, [Path("/n/tmp/x.parquet")], 2)
    assert "trial a: 1 epoch(s) logged twice, 1 missing" in bad[0]
    assert any("1 trial run(s)" in b for b in bad) and "shared root: no views" in bad
    assert any("private disk: /n/tmp/x.parquet" in b for b in bad)


def test_outputs_on_a_private_disk_are_found_but_rays_code_cache_is_not(tmp_path):
    disk = tmp_path / "tmp"
    (disk / "ray/session_1/runtime_resources/working_dir_files/pkg/raylab/assets").mkdir(parents=True)
    (disk / "ray/session_1/runtime_resources/working_dir_files/pkg/raylab/assets/best.pt").write_bytes(b"x")
    assert stray_outputs([disk]) == []
    (disk / "ray/session_1/artifacts/run/checkpoint_1").mkdir(parents=True)
    (disk / "home/runs/artifacts/gen").mkdir(parents=True)
    (disk / "home/runs/artifacts/gen/gen-0-9.parquet").write_bytes(b"x")
    assert sorted(p.name for p in outputs_under(disk)) == ["checkpoint_1", "gen-0-9.parquet"]


needs_namespaces = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root")


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_worker_that_does_not_see_the_shared_root_stops_the_job_in_one_line():
    """A real 3-node cluster where worker2 has an empty local directory at the shared root's path: the job's
    shared-root check names that node and the path, before any compute; the cluster is torn down."""
    out = subprocess.run([sys.executable, "-m", "raylab.cli", "rehearse", "--no-fault", "--unshared-node", "worker2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=1700)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    line = next(line for line in text.splitlines() if "shared root: node" in line)
    assert "worker2" in line and "does not see" in line and "/shared" in line
    assert "FAILED auth" not in text  # the head refused a request without the cluster's Ray token
    base = next(line.split()[-1] for line in text.splitlines() if line.startswith("rehearsal: logs and disks kept"))
    assert not list(Path(base, "shared").rglob("*.parquet"))  # stopped before any compute
    tag = Path(base).name.rsplit("-", 1)[-1]
    assert tag not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout  # torn down
    shutil.rmtree(base, ignore_errors=True)


def test_recovery_counts_only_a_checkpoint_created_after_the_kill():
    """A checkpoint the lost worker group wrote just before the kill can be registered after it (the 1-second
    "recovery" of a past rehearsal); only one created after the kill is the restarted group's."""
    import datetime

    from raylab.rehearse.run import created_at

    kill = datetime.datetime(2026, 12, 7, 19, 36, 22).timestamp()
    assert created_at("checkpoint_2026-12-07_19-36-21.657682") < kill < created_at("checkpoint_2026-12-07_19-37-05.230867")


def test_a_runs_checkpoints_are_its_checkpoint_directories_once_registered(tmp_path):
    """The controller's snapshot file (`checkpoint_manager_snapshot.json`) matches `checkpoint_*` too: it is no
    checkpoint (the watcher once died parsing its name as a timestamp)."""
    from raylab.rehearse.run import SNAPSHOT, checkpoints

    run = tmp_path / "runs" / "ray_results" / "steps-1"
    (run / "checkpoint_2026-12-07_21-00-31.099059").mkdir(parents=True)
    assert checkpoints(tmp_path) == {}  # nothing registered yet: a directory alone may be in flight
    (run / SNAPSHOT).write_text("{}")
    assert checkpoints(tmp_path) == {"steps-1": {"checkpoint_2026-12-07_21-00-31.099059"}}
