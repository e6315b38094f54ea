"""Ray nodes as processes in their own Linux namespaces, on one machine.

Every node (head included) gets:
- a network namespace with its own address on a bridge (`ip netns`, a veth pair): its loopback is its own;
- a mount namespace: `/tmp` is the node's own directory (its private disk, HOME under it), `/dev/shm` a fresh
  tmpfs; on worker nodes the head's local disk (MLflow's store), every other node's disk and the checkout are
  hidden, and the Python environment stays visible read-only (every node of a real cluster runs the same image);
  the shared root is visible at the same path everywhere (what NFS/EFS is on a real cluster);
- a PID namespace whose init is the node's start script: killing that one process kills every process of
  the node at once, as when a machine vanishes; and a UTS namespace (its own hostname).

Layout of a rehearsal directory `base` (never under /tmp or /dev/shm, which nodes replace):
    base/shared/              the shared root
    base/nodes/<node>/tmp/    the node's /tmp
    base/nodes/head/local/    the head's local disk (cluster.yaml's /home/ubuntu)
    base/logs/<node>.log      what the node printed
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PRIVATE_PARENTS = ("/tmp", "/dev/shm")


class NodeError(RuntimeError):
    """A node or the network could not be set up (one line)."""


@dataclass(frozen=True)
class Layout:
    base: Path
    tag: str        # short unique id: interface and namespace names (<= 15 chars)
    subnet: str     # "10.213.<k>": node i gets .<i+1>, the host's bridge .254

    @property
    def shared(self) -> Path:
        return self.base / "shared"

    def node_dir(self, name: str) -> Path:
        return self.base / "nodes" / name

    def log(self, name: str) -> Path:
        return self.base / "logs" / f"{name}.log"

    @property
    def head_local(self) -> Path:
        return self.node_dir("head") / "local"

    def ip(self, index: int) -> str:
        return f"{self.subnet}.{index + 1}"

    def netns(self, index: int) -> str:
        return f"{self.tag}n{index}"

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"


def make_layout(base: Path, tag: str) -> Layout:
    if any(str(base.resolve()).startswith(p + "/") for p in PRIVATE_PARENTS):
        raise NodeError(f"{base}: the rehearsal directory must not be under /tmp or /dev/shm (nodes replace those)")
    return Layout(base.resolve(), tag, f"10.213.{int(tag[-4:], 16) % 250}")


def node_names(count: int) -> list[str]:
    return ["head"] + [f"worker{i}" for i in range(1, count)]


# ---------------------------------------------------------------------------------------------------------------
# The network: a bridge on the host, one namespace per node.

def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True)
    if check and out.returncode:
        raise NodeError(f"{' '.join(args)}: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return out


def create_network(layout: Layout, count: int) -> None:
    sh("ip", "link", "add", layout.bridge, "type", "bridge")
    sh("ip", "addr", "add", f"{layout.subnet}.254/24", "dev", layout.bridge)
    sh("ip", "link", "set", layout.bridge, "up")
    for i in range(count):
        add_node_net(layout, i)


def add_node_net(layout: Layout, i: int) -> None:
    ns, host_end, node_end = layout.netns(i), f"{layout.tag}h{i}", f"{layout.tag}v{i}"
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
    sh("ip", "link", "set", host_end, "master", layout.bridge, "up")
    sh("ip", "link", "set", node_end, "netns", ns)
    sh("ip", "-n", ns, "addr", "add", f"{layout.ip(i)}/24", "dev", node_end)
    sh("ip", "-n", ns, "link", "set", node_end, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")


def delete_network(layout: Layout, count: int) -> None:
    """Best effort, every piece (also what a failed setup half made)."""
    for i in range(count):
        sh("ip", "netns", "del", layout.netns(i), check=False)
        sh("ip", "link", "del", f"{layout.tag}h{i}", check=False)
    sh("ip", "link", "del", layout.bridge, check=False)


# ---------------------------------------------------------------------------------------------------------------
# One node's mount namespace and start script.

def write_hosts(layout: Layout, names: list[str]) -> Path:
    """The cluster's name resolution (a cloud VPC's DNS): every node resolves every node's hostname to its address.
    Gloo binds to the address its hostname resolves to; unresolvable, it fell back to 127.0.0.1 and DDP across
    nodes failed ("connectFullMesh failed ... remote=[127.0.0.1]")."""
    lines = ["127.0.0.1 localhost"] + [f"{layout.ip(i)} {name}" for i, name in enumerate(names)]
    path = layout.base / "hosts"
    path.write_text("\n".join(lines) + "\n")
    return path


def mount_lines(layout: Layout, name: str, hide: list[str], keep: list[tuple[str, bool]]) -> list[str]:
    """Shell lines run as the node's PID 1, before its start commands: its private /tmp and /dev/shm, the cluster's
    /etc/hosts, the hidden paths (an empty tmpfs over each), and the `keep` paths (the Python environment,
    read-only; the head's checkout) re-exposed at their own paths. Kept paths are staged outside /tmp first: a
    checkout or venv under /tmp (a CI clone) would vanish with the host's /tmp."""
    own = layout.node_dir(name) / "tmp"
    stages = [layout.base / "stage" / name / str(i) for i in range(len(keep))]
    lines = ["set -e"]
    lines += [f"mkdir -p {shlex.quote(str(st))} && mount --bind {shlex.quote(path)} {shlex.quote(str(st))}"
              for st, (path, _) in zip(stages, keep)]
    lines += [f"mount --bind {shlex.quote(str(own))} /tmp", "mount -t tmpfs -o size=512m tmpfs /dev/shm",
              f"mount --bind {shlex.quote(str(layout.base / 'hosts'))} /etc/hosts", "mkdir -p /tmp/home"]
    lines += [f"mkdir -p {shlex.quote(p)} && mount -t tmpfs -o size=1m tmpfs {shlex.quote(p)}" for p in hide]
    for st, (path, read_only) in zip(stages, keep):
        lines += [f"mkdir -p {shlex.quote(path)}", f"mount --bind {shlex.quote(str(st))} {shlex.quote(path)}"]
        lines += [f"mount -o remount,bind,ro {shlex.quote(path)}"] if read_only else []
        lines.append(f"umount {shlex.quote(str(st))}")
    return lines + [f"hostname {name}", "set +e"]


def hidden_paths(layout: Layout, name: str, checkout: Path) -> list[str]:
    """What a worker node must not see: the head's and other nodes' disks, the logs, the checkout (code reaches
    workers through `--working-dir` only). The head (it runs the job's driver) hides nothing."""
    if name == "head":
        return []
    return [str(layout.base / "nodes"), str(layout.base / "logs"), str(checkout)]


@dataclass
class Node:
    name: str
    index: int
    process: subprocess.Popen
    init_pid: int | None = None  # host PID of the node's PID-namespace init

    def kill(self) -> None:
        """The whole node at once: SIGKILL to its PID namespace's init takes every process in it along."""
        for pid in filter(None, (self.init_pid, self.process.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def alive(self) -> bool:
        return self.process.poll() is None


def stop_nodes(running: list[Node]) -> None:
    """Kill every node (the last started first), then wait for each to be gone (at most 30 s a node)."""
    for node in reversed(running):
        node.kill()
    for node in running:
        try:
            node.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def start_node(layout: Layout, index: int, name: str, script: list[str], env: dict[str, str]) -> Node:
    """`nsenter` into the node's network namespace, then `unshare` the mount, PID and UTS namespaces and run
    `script` as PID 1 there."""
    for sub in ("tmp", "local"):
        (layout.node_dir(name) / sub).mkdir(parents=True, exist_ok=True)
    layout.log(name).parent.mkdir(parents=True, exist_ok=True)
    log = open(layout.log(name), "ab")
    cmd = ["nsenter", f"--net=/run/netns/{layout.netns(index)}", "unshare", "--mount", "--pid", "--fork",
           "--mount-proc", "--uts", "--kill-child", "bash", "-c", "\n".join(script)]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    log.close()
    node = Node(name, index, process)
    node.init_pid = _child_pid(process.pid)
    return node


def _child_pid(pid: int, timeout: float = 10.0) -> int | None:
    """The forked child of `unshare --fork` (PID 1 of the node's namespace), by its parent's PID."""
    deadline = time.monotonic() + timeout
    path = Path(f"/proc/{pid}/task/{pid}/children")
    while time.monotonic() < deadline:
        try:
            children = path.read_text().split()
        except OSError:
            return None
        if children:
            return int(children[0])
        time.sleep(0.05)
    return None


def node_env(layout: Layout, token: str) -> dict[str, str]:
    """The environment every node starts with: this Python environment first on PATH, the cluster's Ray token,
    a HOME on the node's private disk, nothing from the caller's PYTHONPATH."""
    bin_dir = str(Path(sys.executable).parent)
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TERM")}
    return {**keep, "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp/home",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
            "VIRTUAL_ENV": sys.prefix, "PYTHONUNBUFFERED": "1"}


def on_node(node: Node, argv: list[str], cwd: str) -> list[str]:
    """A command run on `node`: in its network, mount and UTS namespaces (what `ray attach` gives on a real
    cluster: the head's 127.0.0.1 and its disk)."""
    return ["nsenter", "-t", str(node.init_pid), "--net", "--mount", "--uts", "--pid", f"--wd={cwd}", *argv]
