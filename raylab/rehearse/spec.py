"""What the rehearsal starts, read from `cluster.yaml` so the two cannot drift: each node type's `ray start` options
and custom resources, and the head's other start commands (the MLflow server).

Only what names the machine changes: launcher-only options (`--autoscaling-config`, written by `ray up`) are
dropped, cloud paths are mapped onto the rehearsal's directories (`/mnt/raylab` -> the shared root, `/home/ubuntu`
-> the head's local disk), and each node gets its address and a 256 MiB object store.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

LAUNCHER_ONLY = ("--autoscaling-config",)
# Cloud paths in cluster.yaml -> placeholders the rehearsal fills with its own directories.
SHARED_PATH, HEAD_HOME = "/mnt/raylab", "/home/ubuntu"
OBJECT_STORE_BYTES = 256 * 1024**2
# A rehearsal worker stands in for one GPU node: 4 logical CPUs, no GPU (the Ray resources a job asks for).
WORKER_CPUS = 4
START_TRIES = 3


class SpecError(ValueError):
    """cluster.yaml lacks what the rehearsal reads (one line)."""


@dataclass(frozen=True)
class NodeSpec:
    """How one node type starts: shell lines run before `ray start`, its env assignments and options, resources."""
    before: tuple[str, ...]
    env: dict[str, str]
    options: tuple[str, ...]
    resources: dict[str, float] = field(default_factory=dict)

    def script(self, extra: tuple[str, ...], env: Mapping[str, str], paths: Mapping[str, str]) -> list[str]:
        """Shell lines: the commands before `ray start`, `ray start`, then the node idles until killed, with cloud
        paths and launcher variables (`$RAY_HEAD_IP`) replaced by `paths`. Not `ray start --block`: it kills the
        whole node when any one Ray process exits, and on a loaded machine the head's Ray client server timed out
        waiting for node info and took the head down with it. Tried START_TRIES times: Ray gives a node 30 s
        (hard-coded) to register, which a 2-core machine under load does not always meet."""
        assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**self.env, **env}.items())
        options = [localize(o, paths) for o in self.options]
        start = shlex.join(["ray", "start", *options, *extra])
        stop = f"env {assign} ray stop --force >/dev/null 2>&1; sleep 5"
        return [*(localize(line, paths) for line in self.before),
                f"for try in {' '.join(map(str, range(1, START_TRIES + 1)))}; do env {assign} {start} && break; "
                f"[ $try = {START_TRIES} ] && exit 1; {stop}; done", "exec sleep infinity"]


@dataclass(frozen=True)
class ClusterSpec:
    head: NodeSpec
    worker: NodeSpec
    head_type: str
    worker_type: str


def _ray_start(command: str) -> tuple[list[str], dict[str, str], list[str]] | None:
    """(other `;`-separated parts, env assignments, options) of a command holding `ray start`; None otherwise."""
    parts = [p.strip() for p in command.split(";") if p.strip()]
    for i, part in enumerate(parts):
        tokens = shlex.split(part)
        env = {}
        while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
            key, _, value = tokens.pop(0).partition("=")
            env[key] = value
        if tokens[:2] == ["ray", "start"]:
            options = [t for t in tokens[2:] if t.split("=", 1)[0] not in LAUNCHER_ONLY]
            return parts[:i] + parts[i + 1:], env, options
    return None


def node_spec(commands: list[str], resources: Mapping[str, Any], where: str) -> NodeSpec:
    before, found = [], None
    for command in commands:
        if command.strip() == "ray stop":
            continue
        parsed = _ray_start(command)
        if parsed is None:
            before.append(command)
        elif found is None:
            found = parsed
            before.extend(parsed[0])
    if found is None:
        raise SpecError(f"cluster.yaml: {where} has no `ray start` command")
    return NodeSpec(tuple(before), found[1], tuple(found[2]), {k: float(v) for k, v in resources.items()})


def load_spec(path: str | Path) -> ClusterSpec:
    import yaml

    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no cluster config (run from the checkout, or pass --cluster-yaml)")
    cfg = yaml.safe_load(path.read_text())
    types = cfg.get("available_node_types") or {}
    head_type = cfg.get("head_node_type")
    workers = [t for t in types if t != head_type]
    if head_type not in types or not workers:
        raise SpecError(f"{path}: needs head_node_type and one worker type in available_node_types")
    head = node_spec(cfg.get("head_start_ray_commands") or [], types[head_type].get("resources") or {},
                     "head_start_ray_commands")
    worker = node_spec(cfg.get("worker_start_ray_commands") or [], types[workers[0]].get("resources") or {},
                       "worker_start_ray_commands")
    return ClusterSpec(head, worker, head_type, workers[0])


def localize(line: str, paths: Mapping[str, str]) -> str:
    """A cluster.yaml command with its cloud paths mapped onto the rehearsal's directories."""
    for cloud, local in paths.items():
        line = line.replace(cloud, local)
    return line


def resources_env(resources: Mapping[str, float]) -> str:
    """RAY_OVERRIDE_RESOURCES, how the cluster launcher hands a node type's `resources` to `ray start`."""
    return json.dumps({k: (int(v) if float(v).is_integer() else v) for k, v in resources.items()})
