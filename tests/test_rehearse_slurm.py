"""`raylab rehearse --slurm`: slurm.conf as the rehearsal writes it, and (root, Debian's slurm-wlm and munge) the
whole rehearsal: a real slurmctld and slurmd per node, the main job's smoke sbatched, SIGTERMed after a trial's
first checkpoint, requeued, resumed, the contract checked (about 5 minutes on 2 cores)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raylab.rehearse import nodes
from raylab.rehearse.slurm import TOOLS, Progress, job_problems, slurm_conf, summary


def test_slurm_conf_names_every_worker_at_its_address_and_keeps_state_on_private_disks(tmp_path):
    layout = nodes.make_layout(Path("/var/tmp/raylab-test-conf"), "rs0a0b")
    conf = slurm_conf(layout, ["worker1", "worker2"])
    assert f"SlurmctldHost=head({layout.ip(0)})" in conf
    for i, name in enumerate(["worker1", "worker2"], start=1):
        assert f"NodeName={name} NodeAddr={layout.ip(i)} CPUs=4" in conf
    assert "JobRequeue=1" in conf and "AuthType=auth/munge" in conf
    paths = re.findall(r"(?:Location|Dir|File)=(\S+)", conf)
    assert paths and all(p.startswith("/tmp/") for p in paths)  # each node's own /tmp


def test_a_job_that_was_not_requeued_or_did_not_resume_fails_the_rehearsal():
    done = Progress(signalled=10.0, resumed=40.0, restarts=1, state="COMPLETED", exit_code="0:0")
    log = "raylab slurm: command exited 75 (stopped on request: 75)\nraylab slurm: requeued to resume\n"
    assert job_problems(done, log) == []
    line = summary(3, [], done, log, "shared")
    assert "resumed in 30 s" in line and "1 requeue(s)" in line
    assert any("requeue" in p for p in job_problems(done, log.replace("exited 75", "exited 0")))
    never = Progress(signalled=None, restarts=0, state="COMPLETED", exit_code="0:0")
    assert len(job_problems(never, "")) == 3 and "SIGTERM NOT sent" in summary(3, [], never, "", "shared")
    failed = Progress(signalled=10.0, resumed=40.0, restarts=1, state="FAILED", exit_code="1:0")
    assert job_problems(failed, log) == ["job: ended FAILED with exit code 1:0"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS),
                    reason="needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)")
def test_the_slurm_rehearsal_stops_requeues_and_resumes_the_main_job_with_nothing_trained_twice_or_lost():
    out = subprocess.run([sys.executable, "-m", "raylab.cli", "rehearse", "--slurm", "--expect-trials", "2"],
                         capture_output=True, text=True, timeout=2400)
    line = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert line.startswith("rehearsal (slurm, shared): 3 nodes (slurmctld + 2 slurmd), 2 trials, SIGTERM -> "
                           "checkpoint, exit 75, requeue, resumed in "), line
    assert "1 requeue(s), 0 epochs logged twice, 0 lost" in line
