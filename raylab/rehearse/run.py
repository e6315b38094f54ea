"""`raylab rehearse [--nodes N] -- COMMAND...`: build the cluster, submit COMMAND with `ray job submit` (the
checkout's tracked files as its working directory, raylab.jobdir), kill one worker node mid-training, tear everything
down, check the contract, print one summary.

Always torn down: every step runs inside try/finally, SIGINT/SIGTERM become KeyboardInterrupt, and each node's
`unshare --kill-child` takes the node down if this process dies anyway.
"""
from __future__ import annotations

import argparse
import datetime
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from raylab.jobdir import JobDirError, stage
from raylab.rehearse import checks, nodes
from raylab.rehearse.fixtures import place_cifar10
from raylab.rehearse.spec import (HEAD_HOME, OBJECT_STORE_BYTES, SHARED_PATH, WORKER_CPUS, ClusterSpec, load_spec,
                                  resources_env)

MLFLOW_URL = "http://127.0.0.1:5000"
DASHBOARD = "http://127.0.0.1:8265"
READY_TIMEOUT_S = 600.0  # a node of a loaded 2-core machine took minutes to come up
TOOLS = ("ip", "nsenter", "unshare", "mount")
# The default job: the main ablation's smoke, as a cluster runs it. 3 epochs so a node can die between two
# checkpoints; the trainer's 2 workers spread over 2 worker nodes; every actor lands on a worker (the head has no CPU).
DEFAULT_JOB = ["python", "experiments/ablate_steps.py", "--smoke", "--set", "train.epochs=3",
               "--set", "resources.num_workers=2", "--set", "resources.placement=SPREAD",
               "--set", "tracking.root={shared}/runs", "--set", "data.root={shared}/data",
               "--set", f"tracking.uri={MLFLOW_URL}"]
# The dress rehearsal (`--dress`): the paper configuration in miniature on CIFAR-10 placed under the shared root as
# the README's cluster command has it (raylab.rehearse.dress); only locations are set.
DATA_DIR = "data"
DRESS_JOB = ["python", "-m", "raylab.rehearse.dress", "--set", "tracking.root={shared}/runs",
             "--set", f"data.root={{shared}}/{DATA_DIR}", "--set", f"tracking.uri={MLFLOW_URL}"]
# Runs that train what the paper takes as given (the dress job's generator and scorer): the node dies in a trial.
INPUT_RUNS = ("edm-", "scorer-")


@dataclass
class Options:
    nodes: int = 3
    command: list[str] = field(default_factory=lambda: list(DEFAULT_JOB))
    cluster_yaml: str = "cluster.yaml"
    workdir: str = ""
    fault: bool = True
    expect_trials: int | None = None
    unshared_node: str = ""   # a worker whose shared root is an empty directory instead (the refusal drill)
    dress: bool = False       # place the CIFAR-10 fixture; the node dies in a sweep trial, not an input's training
    slurm: str = ""           # a real Slurm instead (raylab.rehearse.slurm), the job in this raylab slurm --mode


def add_args(p: argparse.ArgumentParser) -> None:
    """The `raylab rehearse` verb's options (raylab.cli)."""
    p.add_argument("--nodes", type=int, default=3, help="head + worker nodes (>= 3; default 3)")
    p.add_argument("--cluster-yaml", default="cluster.yaml", help="the start commands to rehearse")
    p.add_argument("--workdir", default="", help="rehearsal directory (default /var/tmp/raylab-rehearse-<id>)")
    p.add_argument("--no-fault", dest="fault", action="store_false", help="do not kill a worker node")
    p.add_argument("--expect-trials", type=int, default=None, help="trial runs the job must leave in MLflow")
    p.add_argument("--dress", action="store_true", help="the dress rehearsal: --preset paper --miniature, "
                   "ablate_steps and ablate_amount on a CIFAR-10 fixture under the shared root")
    p.add_argument("--unshared-node", default="", help="drill: this worker (e.g. worker2) gets an empty local "
                   "directory where the shared root should be")
    p.add_argument("--slurm", nargs="?", const="shared", default="", metavar="MODE", help="slurmctld on the head, "
                   "slurmd on the workers: sbatch the job (raylab slurm, MODE shared or exclusive; default shared), "
                   "SIGTERM it mid-training, let it requeue and resume")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... ({shared} = the shared root; "
                   "default: the main ablation's smoke as a cluster runs it)")


def options_from(args: dict) -> Options:
    """The verb's arguments as Options: `-- COMMAND` runs COMMAND, else `--dress` the dress job, else DEFAULT_JOB."""
    command = args["command"][1:] if args["command"][:1] == ["--"] else args["command"]
    opts = Options(**{k: args[k] for k in ("nodes", "cluster_yaml", "workdir", "fault", "expect_trials",
                                          "unshared_node", "dress", "slurm")})
    opts.command = list(command or (DRESS_JOB if opts.dress else DEFAULT_JOB))
    return opts


@dataclass
class Timings:
    start: float = field(default_factory=time.monotonic)
    nodes_up: float = float("nan")
    killed_at: float | None = None
    recovered: float | None = None
    open_cluster: bool = False  # the head answered a request without the Ray token


# ---------------------------------------------------------------------------------------------------------------
# Before anything: privileges, tools, namespaces.

def missing_privilege(euid: int, tools: dict[str, bool], probe: tuple[int, str] | None) -> str | None:
    """The one line that stops a rehearsal before it starts (None when it can run)."""
    if euid != 0:
        return ("rehearse: needs root (network namespaces, a bridge and mounts); run it as root, e.g. in a VM or a "
                "privileged CI container")
    absent = [t for t, ok in tools.items() if not ok]
    if absent:
        return f"rehearse: missing tool(s) {', '.join(absent)} (iproute2, util-linux)"
    if probe is not None and probe[0] != 0:
        return f"rehearse: cannot create namespaces here: {probe[1].strip().splitlines()[-1:] or probe[0]}"
    return None


def namespace_probe() -> tuple[int, str]:
    try:
        out = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "--uts", "true"],
                             capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return 1, "unshare timed out"
    return out.returncode, out.stderr


def preflight() -> str | None:
    tools = {t: shutil.which(t) is not None for t in TOOLS}
    if os.geteuid() != 0 or not all(tools.values()):
        return missing_privilege(os.geteuid(), tools, None)
    return missing_privilege(0, tools, namespace_probe())


# ---------------------------------------------------------------------------------------------------------------
# The cluster.

class Cluster:
    def __init__(self, layout: nodes.Layout, spec: ClusterSpec, count: int, checkout: Path, unshared: str = ""):
        self.layout, self.spec, self.count, self.checkout = layout, spec, count, checkout
        self.token = secrets.token_hex(32)  # Ray token auth: nothing joins or submits without it
        self.names = nodes.node_names(count)
        self.running: list[nodes.Node] = []
        self.unshared = unshared
        self.network = False

    @property
    def head(self) -> nodes.Node:
        return self.running[0]

    def paths(self) -> dict[str, str]:
        """cluster.yaml's cloud paths and launcher variables on this machine."""
        return {SHARED_PATH: str(self.layout.shared), HEAD_HOME: str(self.layout.head_local),
                "$RAY_HEAD_IP": self.layout.ip(0)}

    def script(self, index: int, name: str) -> list[str]:
        kind = self.spec.head if index == 0 else self.spec.worker
        resources = dict(kind.resources) if index == 0 else {**kind.resources, "CPU": WORKER_CPUS}
        extra = (f"--node-ip-address={self.layout.ip(index)}", f"--object-store-memory={OBJECT_STORE_BYTES}")
        keep = [(sys.prefix, True)] + ([(str(self.checkout), False)] if index == 0 else [])
        mounts = nodes.mount_lines(self.layout, name, nodes.hidden_paths(self.layout, name, self.checkout), keep)
        if name == self.unshared:  # this node's "shared root" is an empty local directory at the same path
            mounts.insert(-1, f"mkdir -p /tmp/not-shared && mount --bind /tmp/not-shared {self.layout.shared}")
        return mounts + kind.script(extra, {"RAY_OVERRIDE_RESOURCES": resources_env(resources)}, self.paths())

    def up(self) -> None:
        self.layout.shared.mkdir(parents=True, exist_ok=True)
        (self.layout.head_local / "raylab-mlflow").mkdir(parents=True, exist_ok=True)  # cluster.yaml's setup
        nodes.delete_network(self.layout, self.count)
        self.network = True
        nodes.create_network(self.layout, self.count)
        nodes.write_hosts(self.layout, self.names)
        env = nodes.node_env(self.layout, self.token)
        self.running.append(nodes.start_node(self.layout, 0, "head", self.script(0, "head"), env))
        if self.head.init_pid is None:
            raise nodes.NodeError(f"the head did not start (see {self.layout.log('head')})")
        self.wait_ready(1)  # as the launcher does: workers join a head that is up (they give up on a slow one)
        for index, name in enumerate(self.names[1:], start=1):
            self.running.append(nodes.start_node(self.layout, index, name, self.script(index, name), env))
        self.wait_ready(self.count)

    def replace(self) -> nodes.Node:
        """A fresh worker node joins, as the autoscaler replaces a lost spot node: a new name, address and disk.
        It must pass the shared-root check where it takes work (it was not there when the job started)."""
        index = len(self.names)
        name = f"worker{index}"
        self.names.append(name)
        nodes.add_node_net(self.layout, index)
        nodes.write_hosts(self.layout, self.names)  # rewritten in place: every node's /etc/hosts sees the new name
        node = nodes.start_node(self.layout, index, name, self.script(index, name), nodes.node_env(self.layout,
                                                                                                     self.token))
        self.running.append(node)
        return node

    def on_head(self, argv: list[str], **kwargs) -> subprocess.Popen:
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}
        return subprocess.Popen(nodes.on_node(self.head, argv, str(self.checkout)), env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)

    def refuses_anonymous(self) -> bool:
        """Token auth holds: `ray job list` on the head without the token (and with no token file) is refused."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(RAY_AUTH_MODE="disabled", HOME=str(self.layout.base / "anonymous"))
        argv = nodes.on_node(self.head, [str(Path(sys.executable).parent / "ray"), "job", "list", "--address",
                                         DASHBOARD], str(self.checkout))
        try:
            out = subprocess.run(argv, env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return True
        return out.returncode != 0

    def wait_ready(self, count: int) -> None:
        """Until `count` Ray nodes are alive and the head's MLflow server answers."""
        probe = self.on_head([sys.executable, "-m", "raylab.rehearse.probe", str(count), str(READY_TIMEOUT_S),
                              MLFLOW_URL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = probe.communicate()
        if probe.returncode:
            raise nodes.NodeError(f"cluster not ready: {out.strip().splitlines()[-1:]} (logs: {self.layout.base}/logs)")

    def down(self) -> None:
        nodes.stop_nodes(self.running)
        if self.network:
            nodes.delete_network(self.layout, len(self.names))


# ---------------------------------------------------------------------------------------------------------------
# The fault: one worker node dies after a trial's first Train checkpoint.

SNAPSHOT = "checkpoint_manager_snapshot.json"


def checkpoints(shared: Path) -> dict[str, set[str]]:
    """Ray Train run name -> its checkpoint directories, under the shared root's Train storage, for runs whose
    controller has registered a checkpoint (its snapshot file exists: a directory alone may still be in flight, and
    a node lost then restarts the run from scratch, not from that checkpoint)."""
    out: dict[str, set[str]] = {}
    for ckpt in shared.glob("**/ray_results/*/checkpoint_*"):
        if ckpt.is_dir() and (ckpt.parent / SNAPSHOT).exists():  # the snapshot file matches the pattern too
            out.setdefault(ckpt.parent.name, set()).add(ckpt.name)
    return out


def created_at(checkpoint: str) -> float:
    """When a worker created a checkpoint (Ray Train names it `checkpoint_<local date>_<time>`): a checkpoint the
    lost worker group wrote just before the kill may be registered after it; only one created later is the
    restarted group's."""
    stamp = datetime.datetime.strptime(checkpoint.removeprefix("checkpoint_"), "%Y-%m-%d_%H-%M-%S.%f")
    return stamp.timestamp()


def hosts_training(node: nodes.Node) -> bool:
    """A Ray Train worker runs in `node`'s PID namespace."""
    mine = _pid_namespace(node.init_pid)
    return mine is not None and any(_pid_namespace(pid) == mine for pid in _processes("ray::RayTrainWorker"))


def _processes(title: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title.encode()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _pid_namespace(pid: int | None) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") if pid else None
    except OSError:
        return None


def watch_and_kill(cluster: Cluster, timings: Timings, done: Callable[[], bool], poll: float = 0.5,
                   eligible: Callable[[str], bool] = lambda run: True) -> None:
    """Once an `eligible` run has a registered checkpoint, kill the worker node its Train workers run on (the last
    worker if none is found) and let a replacement join, as an autoscaler replaces a lost spot node; time until the
    restarted worker group's first checkpoint."""
    run, killed_wall = None, 0.0
    while not done():
        found = {name: ckpts for name, ckpts in checkpoints(cluster.layout.shared).items() if eligible(name)}
        if run is None and found:
            run = next(iter(found))
            workers = [n for n in cluster.running[1:] if n.alive() and hosts_training(n)]
            victim = (workers or cluster.running)[-1]
            victim.kill()
            timings.killed_at, killed_wall = time.monotonic(), time.time()
            print(f"rehearsal: killed node {victim.name} (all its processes{', its Train workers' if workers else ''}"
                  f") after {run}'s first checkpoint", flush=True)
            print(f"rehearsal: node {cluster.replace().name} joins in place of {victim.name}", flush=True)
        elif run is not None and any(created_at(c) > killed_wall for c in found.get(run, ())):
            timings.recovered = time.monotonic()
            print(f"rehearsal: {run}'s restarted worker group checkpointed {timings.recovered - timings.killed_at:.0f}"
                  " s after the node loss", flush=True)
            return
        time.sleep(poll)


def job_dir(layout: nodes.Layout) -> Path:
    """Where the job's code is staged (raylab.jobdir): on the head's disk, which worker nodes do not see."""
    return layout.node_dir("head") / "job"


def submit(cluster: Cluster, command: list[str]) -> subprocess.Popen:
    """`ray job submit` of `command` with the staged job code (`job_dir`) as its working directory."""
    shared = str(cluster.layout.shared)
    argv = ["ray", "job", "submit", "--address", DASHBOARD, "--working-dir", str(job_dir(cluster.layout)),
            "--runtime-env-json",
            '{"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}', "--",
            *[part.replace("{shared}", shared) for part in command]]
    return cluster.on_head([str(Path(sys.executable).parent / argv[0]), *argv[1:]])


# ---------------------------------------------------------------------------------------------------------------
# The whole rehearsal.

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def summary(count: int, trials: list[checks.TrialEpochs], timings: Timings, fault: bool) -> str:
    twice, lost = sum(t.twice for t in trials), sum(t.lost for t in trials)
    if not fault:
        loss = "no fault injected"
    elif timings.killed_at is None:
        loss = "node loss NOT injected (no checkpoint seen)"
    elif timings.recovered is None:
        loss = "node loss NOT recovered"
    else:
        loss = f"node loss recovered in {timings.recovered - timings.killed_at:.0f} s"
    return (f"rehearsal: {count} nodes, {len(trials)} trials, {loss}, {twice} epochs logged twice, {lost} lost "
            f"({time.monotonic() - timings.start:.0f} s, nodes up in {timings.nodes_up:.0f} s)")


def run_job(cluster: Cluster, opts: Options, timings: Timings) -> int:
    if opts.dress:
        place_cifar10(cluster.layout.shared / DATA_DIR)
    job = submit(cluster, opts.command)
    watcher = None
    if opts.fault:
        eligible = (lambda run: not run.startswith(INPUT_RUNS)) if opts.dress else (lambda run: True)
        watcher = threading.Thread(target=watch_and_kill, args=(cluster, timings, lambda: job.poll() is not None),
                                   kwargs={"eligible": eligible}, daemon=True)
        watcher.start()
    rc = job.wait()
    if watcher is not None:
        watcher.join(timeout=5)
    return rc


def rehearse(opts: Options) -> int:
    problem = preflight()
    if problem:
        print(problem, flush=True)
        return 2
    if opts.nodes < 3:
        print(f"rehearse: --nodes {opts.nodes}: needs a head and at least 2 worker nodes (--nodes >= 3)")
        return 2
    try:
        spec = load_spec(opts.cluster_yaml)
    except ValueError as err:
        print(f"rehearse: {err}")
        return 2
    tag = "rh" + secrets.token_hex(2)
    base = Path(opts.workdir or f"/var/tmp/raylab-rehearse-{tag}")
    try:
        layout = nodes.make_layout(base, tag)
        stage(Path.cwd(), job_dir(layout))  # what git tracks, before any node starts: a big checkout stops here
    except (nodes.NodeError, JobDirError) as err:
        print(f"rehearse: {err}")
        return 2
    return _rehearse(opts, Cluster(layout, spec, opts.nodes, Path.cwd(), opts.unshared_node))


def _rehearse(opts: Options, cluster: Cluster) -> int:
    timings, rc = Timings(), 1
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.up()
        timings.nodes_up = time.monotonic() - timings.start
        print(f"rehearsal: {opts.nodes} nodes up in {timings.nodes_up:.0f} s ({cluster.layout.base})", flush=True)
        timings.open_cluster = not cluster.refuses_anonymous()
        rc = run_job(cluster, opts, timings)
    except KeyboardInterrupt:
        print(f"rehearsal: interrupted; cluster torn down (logs in {cluster.layout.base})", flush=True)
        return 130
    except nodes.NodeError as err:
        print(f"rehearse: {err}", flush=True)
        return 1
    finally:
        cluster.down()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return report(cluster, opts, timings, rc)


def report(cluster: Cluster, opts: Options, timings: Timings, job_rc: int) -> int:
    layout = cluster.layout
    db = layout.head_local / "raylab-mlflow" / "mlflow.db"
    trials = checks.trial_epochs(f"sqlite:///{db}", "raylab") if db.exists() else []
    private = [layout.node_dir(name) / "tmp" for name in cluster.names]
    problems = ([] if job_rc == 0 else [f"job: ray job submit exited {job_rc}"]) + checks.contract_lines(
        trials, checks.shared_outputs(layout.shared), checks.stray_outputs(private), opts.expect_trials)
    if timings.open_cluster:
        problems.append("auth: the head answered `ray job list` without the cluster's Ray token")
    if opts.fault and (timings.killed_at is None or timings.recovered is None):
        problems.append("fault: no worker node was killed mid-training, or its trial never checkpointed again")
    for line in problems:
        print(f"rehearsal: FAILED {line}")
    print(summary(opts.nodes, trials, timings, opts.fault), flush=True)
    if not problems:
        shutil.rmtree(layout.base, ignore_errors=True)
    else:
        print(f"rehearsal: logs and disks kept in {layout.base}")
    return 0 if not problems else 1
