"""Connecting to Ray: a cluster when one is named, else a local instance sized to work on small machines; the
check that every node of a cluster sees the same shared root: every node alive when a job starts, and every node
that takes a piece of its work (an autoscaled node joins later); and what the driver's terminal shows (`terminal`:
raylab's own lines and every error, Ray's chatter only when asked).

On a 2-core laptop Ray Data actor pools and Train+ingest can deadlock silently at 2 logical CPUs
(reference/ray_mlflow.md §2), so a local instance gets at least 4 logical CPUs (oversubscription is harmless).
The custom `trial_driver` resource lets Tune trial drivers run without holding a CPU (§3).

A local instance starts with its dashboard: Ray's State API lives in it, and without it every Train run's
`PlacementGroupCleaner` printed "State API may be temporarily unavailable" (76 lines in one main job).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

from raylab.io import atomic_write_text

MIN_LOCAL_CPUS = 4
CHECK_DIR = ".raylab-root-check"
ROOT_ID = "root-id"  # in CHECK_DIR: the shared root's random identity, written once
PROBE_TIMEOUT_S = 120.0
_CHECKED: set[str] = set()


class SharedRootError(ValueError):
    """One line: the node that does not see the shared root, and the path."""


def init_ray(address: str | None = None, *, shared_root: str | os.PathLike | None = None, **kwargs) -> None:
    """Connect to `address` / $RAY_ADDRESS, or start a local Ray (a no-op when Ray is already initialized); then,
    given `shared_root`, check once per process that every node sees it (`check_shared_root`)."""
    import ray

    if not ray.is_initialized():
        from raylab import preempt

        if shared_root is not None:  # before Ray starts: a local Ray's workers inherit $RAYLAB_STOP_FILE
            preempt.prepare(shared_root)
        _connect(address or os.environ.get("RAY_ADDRESS"), **kwargs)
        preempt.install_handler()  # after ray.init, whose own SIGTERM handler exits at once
    if shared_root is not None and str(shared_root) not in _CHECKED:
        check_shared_root(shared_root)
        _CHECKED.add(str(shared_root))


def _connect(address: str | None, **kwargs) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs: no token files, no warning per init
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, **kwargs)
        return
    cpus = max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
    kwargs.setdefault("include_dashboard", True)
    kwargs.setdefault("runtime_env", {"worker_process_setup_hook": f"{__name__}.{pin_ray_address.__name__}"})
    ray.init(num_cpus=cpus, resources={"trial_driver": cpus}, **kwargs)


def pin_ray_address() -> None:
    """Run first in every worker of a local instance: its RAY_ADDRESS names its own instance. Ray's State API clients
    in workers (Ray Train's PlacementGroupCleaner) otherwise look for "the" Ray on this machine, and with a second
    instance running (another user's job, a test session) died with a 30-line "Found multiple active Ray instances"
    traceback in the driver's terminal."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


# ---------------------------------------------------------------------------------------------------------------
# What the driver's terminal shows.

# Exact substrings of Ray's own lines that are not about anything raylab does. core_worker.cc logs this at E level
# whenever an actor with restarts gets an ObjectRef constructor argument: Ray Data's actor pools pass their own
# DataContext and map transformer as ObjectRefs (actor_pool_map_operator.py) with unlimited restarts, and Ray
# Train's PreemptionWatcher does the same; none of it is an argument of ours.
# Ray Data logs three INFO lines per execution ("Starting execution of Dataset", its plan, "execution finished"), and
# training reads each epoch in windows, each its own execution: hundreds of lines per trial that bury raylab's one
# line per epoch (they stay in the session's logs/ray-data files), and once per reading process that its progress
# bars are off (raylab turns them off: the epoch line is the progress). Ray Train prints every report's whole
# metrics dict ("Reporting training result"), which that epoch line already says, and five INFO lines per run
# about its worker group and checkpoints (they stay in the session's ray-train-* logs). The raylet warns each time
# the processes it started pass another multiple of the node's cores ("... 4x the maximum expected startup
# concurrency (2)"): a sweep whose trials run side by side starts a dozen actors per trial by design.
RAY_CHATTER = ("has constructor arguments in the object store and max_restarts > 0",
               "Starting execution of Dataset dataset_", "Execution plan of Dataset dataset_",
               "execution finished in", "Reporting training result ", "Progress bars disabled. To enable",
               "Requesting resources: {", "Attempting to start training worker group of size",
               "Started training worker group of size", ", local_rank=", "Setting up process group for: ",
               "Checkpoint successfully created at: ", "PYTHON worker processes have been started on node: ")
# Loggers whose INFO lines are not the user's business by default: MLflow creating its tables on a new store, Tune
# writing its experiment state. MLflow sets its level as it is imported, from MLFLOW_LOGGING_LEVEL (the processes of
# a local Ray instance started meanwhile inherit it too).
QUIET_LOGGERS = ("mlflow", "ray.tune")
QUIET_ENV = {"MLFLOW_LOGGING_LEVEL": "WARNING"}


class Lines(io.TextIOBase):
    """A text stream that hands each whole line to `edit` and passes on what it returns (None drops the line)."""

    def __init__(self, stream: TextIO, edit: Callable[[str], Optional[str]]) -> None:
        self.stream, self.edit, self._partial = stream, edit, ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        kept = [line for line in map(self.edit, lines) if line is not None]
        if kept:
            self.stream.write("\n".join(kept) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._partial:
            edited = self.edit(self._partial)
            if edited is not None:
                self.stream.write(edited)
        self._partial = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


class ChatterFilter(Lines):
    """Every line passes on to `stream` except Ray's chatter (RAY_CHATTER)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream, lambda line: None if any(p in line for p in RAY_CHATTER) else line)


@contextlib.contextmanager
def terminal(verbose: bool = False) -> Iterator[None]:
    """What the driver's terminal shows while the block runs. By default raylab's own lines (each stage's line, the
    per-epoch progress, the tables) and every warning and error, Ray's included; the driver's stdout and stderr (where
    Ray prints its workers' output) drop RAY_CHATTER, QUIET_LOGGERS drop their INFO lines. `verbose`: everything."""
    if verbose:
        yield
        return
    saved, levels = (sys.stdout, sys.stderr), {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    env = {name: os.environ.get(name) for name in QUIET_ENV}
    sys.stdout, sys.stderr = ChatterFilter(saved[0]), ChatterFilter(saved[1])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(levels[name], logging.WARNING))
    os.environ.update({name: value for name, value in QUIET_ENV.items() if env[name] is None})
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)


class StatsActorErrors(logging.Filter):
    """Drops Ray's "Unhandled error" record of a failed call to Ray Data's `_StatsActor` (dashboard metrics, never
    awaited). With a sweep's trials side by side, `update_execution_metrics` of a dataset sometimes reaches the
    actor before its `register_dataset` and fails with a KeyError: twice in a quiet main job, each a 10-line traceback
    in the user's terminal, and nothing raylab computes depends on it. Every other unhandled error still prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Unhandled error") and "_StatsActor." in message)


def drop_stats_actor_errors() -> None:
    """Install `StatsActorErrors` on the logger Ray reports unhandled errors with (once per process)."""
    log = logging.getLogger("ray._private.worker")
    if not any(isinstance(f, StatsActorErrors) for f in log.filters):
        log.addFilter(StatsActorErrors())


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Every line this process prints while the block runs starts with `label` (a sweep trial's `[steps=8] `: trials
    run side by side, and Ray names only their process)."""
    with contextlib.redirect_stdout(Lines(sys.stdout, lambda line: f"{label}{line}" if line else line)) as out:
        try:
            yield
        finally:
            out.flush()


# ---------------------------------------------------------------------------------------------------------------
# The shared-root check.

@dataclass(frozen=True)
class RootToken:
    """The shared root as the driver sees it: `path` (under `root`) holds `token`. Work on any node checks it
    (`check_this_node`) before it touches the root."""
    root: str
    path: str
    token: str


def root_token(root: str | os.PathLike) -> RootToken:
    """The token of `root`: its identity file `CHECK_DIR/ROOT_ID`, created once with a random token and never
    rewritten, so every driver of every job on the root hands out the same token, and a node that joins while a job
    runs finds it there. A node that mounts nothing, or another directory, at the path fails the check."""
    root = Path(root).resolve()
    path = root / CHECK_DIR / ROOT_ID
    if not path.is_file():
        tmp = atomic_write_text(path.with_name(f".{ROOT_ID}.{secrets.token_hex(8)}"), secrets.token_hex(16))
        try:
            os.link(tmp, path)  # never replaces: of two drivers racing, the first token stays
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: a rename, racy only between two first-ever drivers
            if not path.exists():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return RootToken(str(root), str(path), path.read_text())


def this_node() -> str:
    """How a refusal names the node it ran on: the hostname, and the node's address inside Ray."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    return socket.gethostname()


def probe_root(path: str, token: str) -> tuple[str, str]:
    """(this node, "" when `path` holds `token`, else what is wrong): what runs on every node."""
    node = this_node()
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return node, "does not see"
    except OSError as err:
        return node, f"cannot read ({err.strerror})"
    return node, "" if text == token else "sees another directory at"


def problem_line(root: str, results: list[tuple[str, str]]) -> str | None:
    """The one-line refusal for the first node with a problem (None when every node sees the root)."""
    bad = [(node, what) for node, what in results if what]
    if not bad:
        return None
    node, what = bad[0]
    more = f" (and {len(bad) - 1} more node(s))" if len(bad) > 1 else ""
    return (f"shared root: node {node} {what} {root}{more}: mount the same filesystem at the same path on every "
            "node (tracking.root)")


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_root(root: str | os.PathLike) -> None:
    """Read the root's token (`root_token`) back with a task pinned to every alive node; raise SharedRootError
    naming the first node (and the path) that cannot, before any compute starts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = root_token(root)
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_root)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(token.path, token.token) for n in alive_nodes()]
    line = problem_line(token.root, ray.get(refs, timeout=PROBE_TIMEOUT_S))
    if line:
        raise SharedRootError(line)


_SEEN: set[RootToken] = set()


def check_this_node(token: Optional[RootToken]) -> None:
    """The shared-root check of one piece of work, where it runs (a Ray Train worker as it starts; a sampler,
    scorer or eval actor as it is built; the shard writer): the nodes probed when the job started are not all the
    nodes that take its work, since autoscaled workers join later. Once per process and token; None = not on Ray."""
    if token is None or token in _SEEN:
        return
    line = problem_line(token.root, [probe_root(token.path, token.token)])
    if line:
        raise SharedRootError(line)
    _SEEN.add(token)
