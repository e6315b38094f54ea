"""`raylab slurm`: the sbatch script that runs a raylab command on a Slurm allocation, requeued until it is done.

Two ways to put Ray on Slurm nodes (Ray >= 2.49):
- `exclusive`: whole nodes; `srun` runs `ray symmetric-run --address <first node>:6379 --min-nodes N` on every
  node, which starts the head on the first node, the others join, and the command runs on the head;
- `shared`: nodes other jobs use too; the head and the workers are explicit `ray start --block` job steps whose
  ports come from a block of RANGE ports picked by the job id (two jobs on a node do not collide), with a short
  temp dir (/tmp/rl-<job id>: a Unix socket path over 107 bytes aborts Ray's start-up, ray #7724); teardown ends
  the job's own steps, never `ray stop` (it kills every Ray of the user on the node).

Both: the shared root is checked on every node before Ray starts (its token, raylab.cluster.root_token, read back by
one task per node), CPUs and GPUs per node come from Slurm's environment ($SLURM_CPUS_ON_NODE, $SLURM_GPUS_ON_NODE),
Ray's token auth holds with a random token Slurm carries to every step, and the time limit's SIGTERM (sent
`--signal-s` early, to the batch shell only) becomes a stop request (raylab.preempt): training checkpoints after its
current epoch, the command exits PREEMPTED_EXIT, and the script requeues the job (`scontrol requeue`), which reruns
the same command: it resumes.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from raylab.preempt import PREEMPTED_EXIT, STOP_DIR, STOP_ENV

WAIT_POLL_S = 2.0
START_TRIES = 3

PORT_BASE, RANGE, BLOCKS = 20000, 200, 200   # job j's ports: PORT_BASE + (j % BLOCKS) * RANGE, the next RANGE
SYMMETRIC_PORT = 6379                          # exclusive nodes: Ray's default head port
HEAD_WAIT_S = 600   # symmetric-run's workers wait 30 s for the head by default (ray #59795); a big image takes longer
TEMP_DIR = "/tmp/rl-$SLURM_JOB_ID"


class SlurmError(ValueError):
    """The job cannot be written as asked (one line)."""


@dataclass(frozen=True)
class SlurmJob:
    mode: str
    nodes: int
    root: str                     # the shared root: the same filesystem at the same path on every node
    command: list[str]
    workdir: str                  # where the command runs: a checkout every node sees (e.g. under the root)
    time: str = "24:00:00"
    signal_s: int = 300           # SIGTERM this long before the time limit: one epoch and its checkpoint must fit
    partition: str = ""
    gpus_per_node: int = 0
    cpus_per_task: int = 0        # 0: what Slurm gives (the whole node with exclusive)
    nccl_ifname: str = ""
    max_requeues: int = 20
    name: str = "raylab"
    python_bin: str = field(default_factory=lambda: str(Path(sys.executable).parent))


# ---------------------------------------------------------------------------------------------------------------
# Checks before anything is written.

def problems(job: SlurmJob) -> list[str]:
    """Every reason the job cannot run as written (none when it can)."""
    out = [] if job.mode in MODES else [f"--mode {job.mode}: one of {', '.join(MODES)}"]
    root = Path(job.root)
    if not root.is_absolute() or not root.is_dir():
        out.append(f"--root {job.root}: the shared root must be an existing absolute directory (NFS, Lustre, ...)")
    if job.nodes < 1:
        out.append(f"--nodes {job.nodes}: at least 1")
    if not job.command:
        out.append("no command: raylab slurm ... -- python experiments/ablate_steps.py --set tracking.root=...")
    if job.signal_s < 10:
        out.append(f"--signal-s {job.signal_s}: the stop request needs time for one epoch and its checkpoint")
    if not Path(job.workdir).is_dir():
        out.append(f"--workdir {job.workdir}: not a directory")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The script, in parts.

def header(job: SlurmJob) -> list[str]:
    opts = {"job-name": job.name, "nodes": str(job.nodes), "ntasks-per-node": "1", "time": job.time,
            "signal": f"B:TERM@{job.signal_s}", "output": f"{job.root}/slurm/%x-%j.out", "open-mode": "append",
            "partition": job.partition, "gpus-per-node": str(job.gpus_per_node or ""),
            "cpus-per-task": str(job.cpus_per_task or "")}
    flags = ["requeue"] + (["exclusive"] if job.mode == "exclusive" else [])
    return (["#!/bin/bash"] + [f"#SBATCH --{k}={v}" for k, v in opts.items() if v]
            + [f"#SBATCH --{f}" for f in flags])


def environment(job: SlurmJob) -> list[str]:
    """What every step inherits (srun passes the batch environment on): the code, the root, the stop file, Ray's
    token and temp dir, NCCL's interface."""
    q = shlex.quote
    lines = ["set -u", f"cd {q(job.workdir)}", f"export PATH={q(job.python_bin)}:$PATH",
             f"export PYTHONPATH={q(job.workdir)}", f"export RAYLAB_ROOT={q(job.root)}",
             f"export {STOP_ENV}=\"$RAYLAB_ROOT/{STOP_DIR}/slurm-$SLURM_JOB_ID\"",
             f"mkdir -p \"$RAYLAB_ROOT/{STOP_DIR}\" && rm -f \"${STOP_ENV}\"  # a requeued run starts afresh",
             f"export RAY_TMPDIR={TEMP_DIR}", "export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token",
             "export RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')",
             f"export RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT={HEAD_WAIT_S}",
             "head=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
             "head_ip=$(getent hosts \"$head\" | awk '{print $1; exit}')",
             "export head head_ip  # read on every node (srun ... bash -c)",
             "echo \"raylab slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST\""]
    if job.nccl_ifname:
        lines.append(f"export NCCL_SOCKET_IFNAME={q(job.nccl_ifname)} GLOO_SOCKET_IFNAME={q(job.nccl_ifname)}")
    return lines


def root_check() -> list[str]:
    """The root's token, read back on every node before Ray starts (one line naming the node that fails)."""
    return ["token=$(python -m raylab.slurm token \"$RAYLAB_ROOT\") || exit 2",
            "srun --overlap --ntasks-per-node=1 python -m raylab.slurm probe \"$RAYLAB_ROOT\" \"$token\" || exit 2"]


def on_node(line: str) -> str:
    """A command evaluated on each node (its own $SLURM_CPUS_ON_NODE), quoted for srun."""
    return f"bash -c {shlex.quote(line)}"


# Slurm's CPUs and GPUs of the node, and the custom resource Tune trial drivers hold instead of a CPU (raylab.tune
# .sweep; cluster.yaml's head has the same).
TRIAL_DRIVERS = 16
RESOURCES = ("--num-cpus=${SLURM_CPUS_ON_NODE:-1} --num-gpus=${SLURM_GPUS_ON_NODE:-0} "
             f"--resources='{{\"trial_driver\": {TRIAL_DRIVERS}}}'")


def exclusive_lines(job: SlurmJob) -> list[str]:
    """The command runs with RAY_ADDRESS set: without it raylab would start a local Ray (and Ray, finding the
    node's, refuses the local one's CPU count)."""
    entry = f"ray symmetric-run --address $head_ip:{SYMMETRIC_PORT} --min-nodes {job.nodes} {RESOURCES} -- " \
            f"env RAY_ADDRESS=$head_ip:{SYMMETRIC_PORT} {shlex.join(job.command)}"
    return [f"srun --overlap --ntasks-per-node=1 {on_node(entry)} &", "driver=$!", "steps=\"\""]


def port_flags(head: bool) -> str:
    """Every port Ray opens, from the job's block (`$base`)."""
    ports = {"node-manager-port": 1, "object-manager-port": 2, "dashboard-agent-listen-port": 3,
             "dashboard-agent-grpc-port": 4, "metrics-export-port": 5, "runtime-env-agent-port": 6,
             "min-worker-port": 20, "max-worker-port": RANGE - 1}
    if head:
        ports.update({"port": 0, "ray-client-server-port": 7, "dashboard-port": 8})
    return " ".join(f"--{k}=$((base + {v}))" for k, v in ports.items())


def shared_lines(job: SlurmJob) -> list[str]:
    start = f"ray start --block --temp-dir={TEMP_DIR} {RESOURCES} --disable-usage-stats"
    head = f"{start} --head --node-ip-address=$head_ip --dashboard-host=127.0.0.1 {port_flags(True)}"
    worker = f"{start} --address=$head_ip:$base {port_flags(False)}"  # its address: the route to the head's
    wait = lambda n: f"python -m raylab.slurm wait-nodes {n} {HEAD_WAIT_S} || {{ kill $steps; exit 1; }}"  # noqa
    lines = [f"export base=$(({PORT_BASE} + SLURM_JOB_ID % {BLOCKS} * {RANGE}))", "export RAY_ADDRESS=$head_ip:$base",
             f"srun --overlap --nodes=1 --ntasks=1 -w \"$head\" {on_node(retried(head))} &", "steps=$!", wait(1)]
    if job.nodes > 1:  # workers once the head is up: a worker whose head is late gives up after 30 s
        lines += [f"srun --overlap --nodes={job.nodes - 1} --ntasks={job.nodes - 1} --exclude=\"$head\" "
                  f"{on_node(retried(worker))} &", "steps=\"$steps $!\"", wait(job.nodes)]
    return lines + [f"{shlex.join(job.command)} &", "driver=$!"]


def retried(start: str) -> str:
    """`ray start --block` on a fresh temp dir, tried START_TRIES times: Ray gives a node 30 s (hard-coded) to
    register, which a loaded node misses. A step ended by the teardown dies with its shell, so no retry then."""
    return (f"for try in $(seq {START_TRIES}); do rm -rf {TEMP_DIR}; {start} && break; "
            f"echo \"raylab slurm: ray start failed on $(hostname) (try $try)\"; sleep 5; done")


MODES: dict[str, Callable[[SlurmJob], list[str]]] = {"exclusive": exclusive_lines, "shared": shared_lines}


def trap() -> str:
    """SIGTERM to the batch shell writes the stop request the training's ranks look for (raylab.preempt); the
    command itself is not signalled (srun would pass it on to every node's Ray)."""
    return f"trap 'echo \"raylab slurm: SIGTERM: stop requested\"; touch \"${STOP_ENV}\"' TERM"


def finish(job: SlurmJob) -> list[str]:
    """Wait for the command (a trap interrupts `wait`, so wait again while it runs), end the job's Ray steps, then:
    done, requeued after a stop request (the command exits PREEMPTED_EXIT then), or failed."""
    return ["while :; do wait $driver; rc=$?; kill -0 $driver 2>/dev/null || break; done",
            "[ -n \"$steps\" ] && { kill $steps 2>/dev/null; wait $steps 2>/dev/null; }",
            f"echo \"raylab slurm: command exited $rc (stopped on request: {PREEMPTED_EXIT})\"",
            "[ $rc = 0 ] && exit 0",
            f"if [ -e \"${STOP_ENV}\" ] && [ \"${{SLURM_RESTART_COUNT:-0}}\" -lt {job.max_requeues} ]; then",
            "  echo \"raylab slurm: requeued to resume\"; scontrol requeue \"$SLURM_JOB_ID\"; exit 0",
            "fi", "exit $rc"]


def script(job: SlurmJob) -> str:
    # The trap is set before the command starts: a SIGTERM during start-up is a stop request too.
    body = environment(job) + root_check() + [trap()] + MODES[job.mode](job) + finish(job)
    return "\n".join(header(job) + [""] + body) + "\n"


def write(job: SlurmJob, out: Path) -> Path:
    from raylab.io import atomic_write_text

    Path(job.root, "slurm").mkdir(exist_ok=True)  # the job's output (#SBATCH --output): sbatch creates no folder
    path = atomic_write_text(out, script(job))
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The verb and the helpers the script runs on the nodes.

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="shared", help="exclusive (whole nodes, ray symmetric-run) or shared "
                   "(explicit ray start, per-job ports)")
    p.add_argument("--nodes", type=int, default=1, help="Slurm nodes (the first is Ray's head)")
    p.add_argument("--root", required=True, help="the shared root every node mounts at the same path")
    p.add_argument("--workdir", default=".", help="the checkout the command runs in (every node must see it)")
    p.add_argument("--time", default="24:00:00", help="the time limit (sbatch --time)")
    p.add_argument("--signal-s", type=int, default=300, help="SIGTERM this many seconds before the time limit")
    for flag, kind in (("--partition", str), ("--gpus-per-node", int), ("--cpus-per-task", int)):
        p.add_argument(flag, type=kind, default=kind(), help=f"sbatch {flag}")
    p.add_argument("--nccl-ifname", default="", help="the network interface NCCL and Gloo use (e.g. ib0)")
    p.add_argument("--out", default="raylab.sbatch", help="where the script is written")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... (runs on the head node)")


def job_from(args: dict) -> SlurmJob:
    command = args["command"][1:] if args["command"][:1] == ["--"] else args["command"]
    keys = ("mode", "nodes", "root", "time", "signal_s", "partition", "gpus_per_node", "cpus_per_task", "nccl_ifname")
    return SlurmJob(**{k: args[k] for k in keys}, command=list(command),
                    workdir=str(Path(args["workdir"]).resolve()))


def main_from(args: dict) -> int:
    job = job_from(args)
    found = problems(job)
    if found:
        print(f"raylab slurm: {found[0]}")
        return 2
    path = write(job, Path(args["out"]))
    print(f"{path}: {job.mode} nodes x{job.nodes}, requeued on SIGTERM ({job.signal_s} s before {job.time}) until "
          f"done; submit it with: sbatch {path}")
    return 0


def _token(root: str) -> int:
    from raylab.cluster import root_token

    print(root_token(root).token)
    return 0


def _probe(root: str, token: str) -> int:
    from raylab.cluster import CHECK_DIR, ROOT_ID, problem_line, probe_root

    line = problem_line(root, [probe_root(str(Path(root) / CHECK_DIR / ROOT_ID), token)])
    print(line or f"shared root: {root} seen", flush=True)
    return 1 if line else 0


def _wait_nodes(count: str, timeout: str) -> int:
    """Until `count` Ray nodes are alive (the driver starts once the cluster is whole); 1 at `timeout` seconds."""
    import time

    deadline, seen = time.monotonic() + float(timeout), 0
    while time.monotonic() < deadline:
        seen = _alive_nodes()
        if seen >= int(count):
            print(f"raylab slurm: {seen} Ray nodes alive", flush=True)
            return 0
        time.sleep(WAIT_POLL_S)
    print(f"raylab slurm: {seen} of {count} Ray nodes alive after {timeout} s", flush=True)
    return 1


def _alive_nodes() -> int:
    import ray

    try:
        if not ray.is_initialized():
            ray.init(logging_level="ERROR", log_to_driver=False)  # $RAY_ADDRESS: the job's head
        return sum(bool(n.get("Alive")) for n in ray.nodes())
    except (ConnectionError, RuntimeError):
        return 0


HELPERS: dict[str, Callable[..., int]] = {"token": _token, "probe": _probe, "wait-nodes": _wait_nodes}


if __name__ == "__main__":
    sys.exit(HELPERS[sys.argv[1]](*sys.argv[2:]))
