"""`raylab slurm`: the sbatch script of both modes (valid bash, Slurm's signal and requeue, per-job ports, a short
temp dir, the root checked on every node), refusals in one line, and the helpers the script runs on the nodes."""
import re
import subprocess
import sys

import pytest

from raylab import slurm
from raylab.cli import main
from raylab.cluster import root_token

COMMAND = ["python", "experiments/ablate_steps.py", "--smoke"]


def _job(tmp_path, mode="shared", **kw):
    return slurm.SlurmJob(mode=mode, nodes=3, root=str(tmp_path), command=COMMAND, workdir=str(tmp_path), **kw)


@pytest.mark.parametrize("mode", sorted(slurm.MODES))
def test_both_modes_write_a_valid_script_that_requeues_on_sigterm(tmp_path, mode):
    text = slurm.script(_job(tmp_path, mode, signal_s=120, gpus_per_node=8, nccl_ifname="ib0"))
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    for line in ("#SBATCH --nodes=3", "#SBATCH --signal=B:TERM@120", "#SBATCH --requeue", "#SBATCH --gpus-per-node=8",
                 "export NCCL_SOCKET_IFNAME=ib0", "scontrol requeue", "python -m raylab.slurm probe",
                 "--num-cpus=${SLURM_CPUS_ON_NODE:-1} --num-gpus=${SLURM_GPUS_ON_NODE:-0}", "trap "):
        assert line in text, line
    assert text.index("trap ") < text.index(" ".join(COMMAND))  # a SIGTERM during start-up is a stop request too
    assert ("#SBATCH --exclusive" in text) == (mode == "exclusive")
    assert ("ray symmetric-run --address $head_ip:6379 --min-nodes 3" in text) == (mode == "exclusive")
    assert ("ray start --block" in text) == (mode == "shared") and "ray stop" not in text


def _ports(text: str, job_id: int) -> set[int]:
    """Every port the shared mode's `ray start` lines name, for a job id, as bash computes them."""
    base = next(line for line in text.splitlines() if line.startswith("export base="))
    echo = " ".join(re.findall(r"--[a-z-]+port=(\$\(\(base \+ \d+\)\))", text))
    out = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; {base}; echo {echo}"], capture_output=True,
                         text=True, check=True).stdout.split()
    return set(map(int, out))


def test_shared_mode_gives_each_job_its_own_ports_and_a_short_temp_dir(tmp_path):
    text = slurm.script(_job(tmp_path))
    first, second = _ports(text, 4101), _ports(text, 4102)
    assert first and second and not first & second and all(1024 < p < 65536 for p in first | second)
    assert "--temp-dir=/tmp/rl-$SLURM_JOB_ID" in text
    socket = "/tmp/rl-99999999/session_2026-12-07_23-59-59_999999_99999/sockets/plasma_store"
    assert len(socket.encode()) < 107  # Unix socket path limit (ray #7724)


def test_bad_input_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    assert main(["slurm", "--root", str(tmp_path / "missing"), "--out", str(out), "--", *COMMAND]) == 2
    assert capsys.readouterr().out.count("\n") == 1 and not out.exists()
    assert main(["slurm", "--root", str(tmp_path), "--mode", "mpi", "--out", str(out), "--", *COMMAND]) == 2
    assert "--mode mpi" in capsys.readouterr().out and not out.exists()
    assert main(["slurm", "--root", str(tmp_path), "--out", str(out)]) == 2 and not out.exists()
    with pytest.raises(SystemExit):
        main(["slurm", "--", *COMMAND])  # --root is required


def test_the_verb_writes_an_executable_script(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    assert main(["slurm", "--root", str(tmp_path), "--nodes", "2", "--workdir", str(tmp_path), "--out", str(out),
                 "--", *COMMAND]) == 0
    assert out.stat().st_mode & 0o111 and "sbatch" in capsys.readouterr().out
    assert out.read_text() == slurm.script(slurm.SlurmJob(mode="shared", nodes=2, root=str(tmp_path),
                                                          command=COMMAND, workdir=str(tmp_path)))


def _helper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raylab.slurm", *args], capture_output=True, text=True)


def test_the_node_probe_passes_on_the_root_and_names_the_node_elsewhere(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    root.mkdir(), other.mkdir()
    token = _helper("token", str(root)).stdout.strip()
    assert token == root_token(root).token
    assert _helper("probe", str(root), token).returncode == 0
    root_token(other)  # another directory with a token of its own: the node sees the wrong filesystem
    wrong = _helper("probe", str(other), token)
    assert wrong.returncode == 1 and "sees another directory at" in wrong.stdout
    missing = _helper("probe", str(tmp_path / "absent"), token)
    assert missing.returncode == 1 and "does not see" in missing.stdout
