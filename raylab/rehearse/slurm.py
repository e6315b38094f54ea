"""`raylab rehearse --slurm`: a real Slurm on one machine, in the namespaces `raylab rehearse` builds (raylab.rehearse
.nodes): munged and slurmctld on the head node, munged and slurmd on each worker node (Debian's slurm-wlm and
munge). The job is `raylab slurm`'s sbatch script (shared mode: explicit `ray start` steps, per-job ports) of the
main job's smoke, with its code and runs under the shared root. Once a trial has a registered Train checkpoint the
batch shell gets SIGTERM (`scancel --signal=TERM --batch`, what `--signal=B:TERM@<s>` sends before a time limit);
the job must checkpoint, exit 75, requeue itself and finish on its second start; then the contract of the Ray
rehearsal is checked (raylab.rehearse.checks: every epoch in MLflow exactly once, outputs on the shared root).

Every node's Slurm and munge state (spool, state, sockets, logs) lives in its private /tmp; the munge key and
slurm.conf sit in `base/slurm`, which every node sees (on a real cluster: the same files installed on each node).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from raylab import slurm as launch
from raylab.jobdir import JobDirError, stage
from raylab.rehearse import checks, nodes
from raylab.rehearse.run import Options, checkpoints, preflight
from raylab.rehearse.spec import WORKER_CPUS

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo")
MUNGE = "/tmp/munge"      # each node's own munged: socket, pid, log, seed (its private /tmp)
STATE = "/tmp/slurm"      # each node's slurmctld/slurmd state, spool, pid and log files
SOCKET = f"{MUNGE}/munge.socket.2"
UP_TIMEOUT_S, JOB_TIMEOUT_S, POLL_S = 300.0, 3600.0, 2.0
# The main job's smoke on the Slurm allocation: 3 epochs so the SIGTERM lands between two checkpoints; the trainer's
# 2 workers spread over the 2 nodes; runs, data and MLflow's SQLite store under the shared root.
JOB = ["python", "experiments/ablate_steps.py", "--smoke", "--set", "train.epochs=3",
       "--set", "resources.num_workers=2", "--set", "resources.placement=SPREAD",
       "--set", "tracking.root={shared}/runs", "--set", "data.root={shared}/data"]


@dataclass
class Progress:
    start: float = field(default_factory=time.monotonic)
    nodes_up: float = float("nan")
    signalled: float | None = None   # when the batch shell got SIGTERM
    resumed: float | None = None     # when the requeued job's first checkpoint appeared
    restarts: int = 0
    state: str = ""
    exit_code: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Configuration files.

def slurm_conf(layout: nodes.Layout, workers: list[str]) -> str:
    """A cluster of `workers` (WORKER_CPUS each, as the Ray rehearsal's nodes) run by slurmctld on the head; no
    cgroups (the nodes are namespaces of one machine), processes tracked by parent id, requeue allowed."""
    lines = ["ClusterName=rehearsal", f"SlurmctldHost=head({layout.ip(0)})", "SlurmUser=root", "SlurmdUser=root",
             "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={SOCKET}",
             "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
             "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
             "SelectTypeParameters=CR_CPU", "SlurmdParameters=config_overrides", "ReturnToService=2",
             "MpiDefault=none", "JobRequeue=1", "MinJobAge=3600", "KillWait=30", "MessageTimeout=60",
             "SlurmdTimeout=600", f"StateSaveLocation={STATE}/state", f"SlurmdSpoolDir={STATE}/spool",
             f"SlurmctldPidFile={STATE}/slurmctld.pid", f"SlurmdPidFile={STATE}/slurmd.pid",
             f"SlurmctldLogFile={STATE}/slurmctld.log", f"SlurmdLogFile={STATE}/slurmd.log"]
    lines += [f"NodeName={name} NodeAddr={layout.ip(i)} CPUs={WORKER_CPUS} RealMemory=4000 State=UNKNOWN"
              for i, name in enumerate(workers, start=1)]
    lines.append(f"PartitionName=rehearsal Nodes={','.join(workers)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def conf_dir(layout: nodes.Layout) -> Path:
    return layout.base / "slurm"


def write_conf(layout: nodes.Layout, workers: list[str]) -> Path:
    """slurm.conf and the munge key (root only: munged refuses a key others can read)."""
    folder = conf_dir(layout)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    (folder / "slurm.conf").write_text(slurm_conf(layout, workers))
    key = folder / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    return folder / "slurm.conf"


def daemon_lines(layout: nodes.Layout, name: str) -> list[str]:
    """After the node's mounts: its munged, then slurmctld (head) or slurmd (worker) in the foreground; bash stays
    PID 1 (`wait`) and reaps what the job steps leave behind."""
    conf = conf_dir(layout) / "slurm.conf"
    munged = (f"munged --force --socket={SOCKET} --key-file={conf_dir(layout) / 'munge.key'} "
              f"--pid-file={MUNGE}/munged.pid --log-file={MUNGE}/munged.log --seed-file={MUNGE}/munged.seed")
    daemon = f"slurmctld -D -f {conf}" if name == "head" else f"slurmd -D -f {conf} -N {name}"
    return [f"mkdir -p {MUNGE} {STATE}/state {STATE}/spool && chmod 700 {MUNGE}", munged, f"{daemon} &", "wait"]


# ---------------------------------------------------------------------------------------------------------------
# The cluster.

class SlurmCluster:
    def __init__(self, layout: nodes.Layout, count: int, checkout: Path):
        self.layout, self.count, self.checkout = layout, count, checkout
        self.names = nodes.node_names(count)
        self.running: list[nodes.Node] = []
        self.network = False

    @property
    def workers(self) -> list[str]:
        return self.names[1:]

    def script(self, index: int, name: str) -> list[str]:
        keep = [(sys.prefix, True)] + ([(str(self.checkout), False)] if index == 0 else [])
        mounts = nodes.mount_lines(self.layout, name, nodes.hidden_paths(self.layout, name, self.checkout), keep)
        return mounts + daemon_lines(self.layout, name)

    def up(self) -> None:
        self.layout.shared.mkdir(parents=True, exist_ok=True)
        write_conf(self.layout, self.workers)
        nodes.delete_network(self.layout, self.count)
        self.network = True
        nodes.create_network(self.layout, self.count)
        nodes.write_hosts(self.layout, self.names)
        env = self.env()
        for index, name in enumerate(self.names):
            self.running.append(nodes.start_node(self.layout, index, name, self.script(index, name), env))
        self.wait_idle()

    def env(self) -> dict[str, str]:
        """What the daemons and the clients (sbatch: the job's environment) run with: this Python first on PATH,
        the cluster's slurm.conf, a HOME on the node's private disk, nothing of Ray's."""
        keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TERM")}
        return {**keep, "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp/home",
                "SLURM_CONF": str(conf_dir(self.layout) / "slurm.conf"), "PYTHONUNBUFFERED": "1"}

    def on_head(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A Slurm client on the head node (its network, its munged)."""
        cmd = nodes.on_node(self.running[0], list(argv), str(self.layout.shared))
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def wait_idle(self) -> None:
        """Until every slurmd has registered with slurmctld and is idle."""
        deadline, states = time.monotonic() + UP_TIMEOUT_S, ""
        while time.monotonic() < deadline:
            out = self.on_head("sinfo", "-h", "-N", "-o", "%N %T")
            states = " ".join(out.stdout.split()) or out.stderr.strip()
            if out.returncode == 0 and out.stdout.count("idle") == len(self.workers):
                return
            time.sleep(POLL_S)
        raise nodes.NodeError(f"Slurm not ready after {UP_TIMEOUT_S:.0f} s: {states} (logs: {self.layout.base})")

    def down(self) -> None:
        nodes.stop_nodes(self.running)
        if self.network:
            nodes.delete_network(self.layout, self.count)


# ---------------------------------------------------------------------------------------------------------------
# The job.

def code_dir(layout: nodes.Layout) -> Path:
    """The job's code: the checkout's tracked files on the shared root (where a Slurm user keeps a checkout)."""
    return layout.shared / "code"


def write_job(cluster: SlurmCluster, command: list[str], mode: str) -> Path:
    shared = str(cluster.layout.shared)
    job = launch.SlurmJob(mode=mode, nodes=len(cluster.workers), root=shared, workdir=str(code_dir(
        cluster.layout)), command=[part.replace("{shared}", shared) for part in command], time="2:00:00",
        signal_s=120, cpus_per_task=WORKER_CPUS, name="rehearsal")
    return launch.write(job, cluster.layout.shared / "rehearsal.sbatch")


def submit(cluster: SlurmCluster, script: Path) -> str:
    out = cluster.on_head("sbatch", "--parsable", str(script))
    if out.returncode:
        raise nodes.NodeError(f"sbatch: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout.strip().split(";")[0]


def job_fields(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (JobState, Restarts, ExitCode, ...)."""
    out = cluster.on_head("scontrol", "-o", "show", "job", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def signal_and_follow(cluster: SlurmCluster, job_id: str, progress: Progress) -> None:
    """SIGTERM to the batch shell after the first registered Train checkpoint; then until the job ends, noting
    when the requeued job's training checkpoints again."""
    deadline, before = time.monotonic() + JOB_TIMEOUT_S, None
    while time.monotonic() < deadline:
        fields = job_fields(cluster, job_id)
        progress.state, progress.restarts = fields.get("JobState", "?"), int(fields.get("Restarts", 0) or 0)
        progress.exit_code = fields.get("ExitCode", "")
        if progress.state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return
        found = checkpoints(cluster.layout.shared)
        if progress.signalled is None and found:
            _terminate(cluster, job_id, progress)
        elif progress.signalled is not None and progress.restarts and before is None:
            before = found  # as the job is requeued: the stopped run's checkpoints, its last one included
        elif before is not None and progress.resumed is None and any(c - before.get(r, set()) for r, c in
                                                                       found.items()):
            progress.resumed = time.monotonic()  # the requeued run's first checkpoint of its own
        time.sleep(POLL_S)
    raise nodes.NodeError(f"job {job_id} still {progress.state} after {JOB_TIMEOUT_S:.0f} s")


def _terminate(cluster: SlurmCluster, job_id: str, progress: Progress) -> None:
    out = cluster.on_head("scancel", "--signal=TERM", "--batch", job_id)
    if out.returncode:
        raise nodes.NodeError(f"scancel: {out.stderr.strip().splitlines()[-1:]}")
    progress.signalled = time.monotonic()
    print(f"rehearsal: SIGTERM to job {job_id}'s batch shell after a trial's first Train checkpoint "
          f"({progress.signalled - progress.start:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The whole rehearsal.

def missing_tools() -> str | None:
    absent = [t for t in TOOLS if shutil.which(t) is None]
    return f"rehearse --slurm: missing {', '.join(absent)} (apt-get install slurm-wlm munge)" if absent else None


def rehearse_slurm(opts: Options) -> int:
    problem = preflight() or missing_tools()
    if opts.slurm not in launch.MODES:
        problem = f"rehearse --slurm {opts.slurm}: one of {', '.join(launch.MODES)}"
    if problem or opts.nodes < 3:
        print(problem or f"rehearse --slurm: --nodes {opts.nodes}: a head and at least 2 worker nodes (>= 3)")
        return 2
    tag = "rs" + secrets.token_hex(2)
    try:
        layout = nodes.make_layout(Path(opts.workdir or f"/var/tmp/raylab-rehearse-{tag}"), tag)
        stage(Path.cwd(), code_dir(layout))  # what git tracks, on the shared root, before any node starts
    except (nodes.NodeError, JobDirError) as err:
        print(f"rehearse: {err}")
        return 2
    return _run(SlurmCluster(layout, opts.nodes, Path.cwd()), opts)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _run(cluster: SlurmCluster, opts: Options) -> int:
    progress = Progress()
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.up()
        progress.nodes_up = time.monotonic() - progress.start
        print(f"rehearsal: slurmctld + {len(cluster.workers)} slurmd up in {progress.nodes_up:.0f} s "
              f"({cluster.layout.base})", flush=True)
        command = JOB if opts.command == _default() else opts.command
        job_id = submit(cluster, write_job(cluster, command, opts.slurm))
        print(f"rehearsal: sbatch -> job {job_id}", flush=True)
        signal_and_follow(cluster, job_id, progress)
    except KeyboardInterrupt:
        print(f"rehearsal: interrupted; cluster torn down (logs in {cluster.layout.base})", flush=True)
        return 130
    except (nodes.NodeError, subprocess.TimeoutExpired) as err:
        print(f"rehearse: {err}", flush=True)
        return 1
    finally:
        cluster.down()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return report(cluster, opts, progress)


def _default() -> list[str]:
    from raylab.rehearse.run import DEFAULT_JOB

    return list(DEFAULT_JOB)


def job_problems(progress: Progress, log: str) -> list[str]:
    """The Slurm side of the contract: signalled mid-training, checkpointed and exited 75, requeued once, resumed,
    finished."""
    out = []
    if progress.signalled is None:
        out.append("fault: no Train checkpoint seen, so no SIGTERM was sent")
    if not requeued(log):
        out.append("requeue: the first run did not stop on the request (exit 75) and requeue itself")
    if progress.restarts < 1 or progress.resumed is None:
        out.append(f"resume: {progress.restarts} restart(s); the requeued run never checkpointed")
    if progress.state != "COMPLETED" or progress.exit_code != "0:0":
        out.append(f"job: ended {progress.state} with exit code {progress.exit_code}")
    return out


def requeued(log: str) -> bool:
    """The batch script's own lines: the command stopped on the request (exit 75), then the job requeued itself."""
    return "command exited 75" in log and "requeued to resume" in log


def summary(count: int, trials: list[checks.TrialEpochs], progress: Progress, log: str, mode: str) -> str:
    twice, lost = sum(t.twice for t in trials), sum(t.lost for t in trials)
    fault = "SIGTERM NOT sent" if progress.signalled is None else "SIGTERM -> " + (
        "checkpoint, exit 75, requeue" if requeued(log) else "NOT stopped and requeued") + (
        f", resumed in {progress.resumed - progress.signalled:.0f} s" if progress.resumed else ", NOT resumed")
    return (f"rehearsal (slurm, {mode}): {count} nodes (slurmctld + {count - 1} slurmd), {len(trials)} trials, "
            f"{fault}, {progress.restarts} requeue(s), {twice} epochs logged twice, {lost} lost "
            f"({time.monotonic() - progress.start:.0f} s, Slurm up in {progress.nodes_up:.0f} s)")


def report(cluster: SlurmCluster, opts: Options, progress: Progress) -> int:
    layout = cluster.layout
    db = layout.shared / "runs" / "mlflow.db"
    trials = checks.trial_epochs(f"sqlite:///{db}", "raylab") if db.exists() else []
    log = "".join(p.read_text(errors="replace") for p in (layout.shared / "slurm").glob("*.out"))
    private = [layout.node_dir(name) / "tmp" for name in cluster.names]
    problems = job_problems(progress, log) + checks.contract_lines(
        trials, checks.shared_outputs(layout.shared), checks.stray_outputs(private), opts.expect_trials)
    for line in problems:
        print(f"rehearsal: FAILED {line}")
    print(summary(opts.nodes, trials, progress, log, opts.slurm), flush=True)
    if problems:
        print(f"rehearsal: logs and disks kept in {layout.base} (the job's output: {layout.shared / 'slurm'})")
        return 1
    shutil.rmtree(layout.base, ignore_errors=True)
    return 0
