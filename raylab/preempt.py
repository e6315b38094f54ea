"""Time limits and preemption: a stop request that training honours at its next checkpoint boundary.

Slurm ends a job at its time limit with SIGTERM, then SIGKILL (`--signal=B:TERM@<s>` moves the SIGTERM earlier); a
spot instance gets a notice the same way. The driver cannot stop Ray Train workers directly (they are other
processes, on other nodes), so a stop request is a file on the shared root, named by $RAYLAB_STOP_FILE:

- the driver's SIGTERM handler writes it (`install_handler`), and so does the sbatch script's trap (raylab.slurm),
  which needs no cooperation from a driver busy inside a C call;
- every training rank looks for it after each epoch (the training's checkpoint boundary), all ranks agree (the
  flags are summed over ranks), write a checkpoint whatever `train.checkpoint_every` says, and return;
- the driver then raises `Preempted`; the CLI and the experiment scripts exit with PREEMPTED_EXIT, which the
  sbatch script answers with a requeue. A rerun resumes: Tune restores unfinished trials only, Ray Train resumes each
  from its checkpoint, and the epoch logger logs no epoch twice.

No Ray or MLflow here: the worker and the driver both read it.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
from pathlib import Path
from typing import Optional

STOP_ENV = "RAYLAB_STOP_FILE"
STOP_DIR = ".raylab-stop"    # under the shared root: where a driver without $RAYLAB_STOP_FILE puts its own
PREEMPTED_EXIT = 75          # EX_TEMPFAIL: "try again later"; the sbatch script requeues on it


class Preempted(RuntimeError):
    """Training stopped on a stop request after checkpointing; rerunning the same command resumes it."""


def stop_file() -> Optional[Path]:
    value = os.environ.get(STOP_ENV)
    return Path(value) if value else None


def stop_requested(path: Optional[os.PathLike | str] = None) -> bool:
    """Whether a stop was requested (`path`, else $RAYLAB_STOP_FILE). Cheap: one stat per call."""
    target = Path(path) if path else stop_file()
    return target is not None and target.exists()


def request_stop(path: Optional[os.PathLike | str] = None) -> Optional[Path]:
    """Write the stop request (idempotent). Returns its path, None when no stop file is set."""
    target = Path(path) if path else stop_file()
    if target is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch()
    return target


def prepare(shared_root: os.PathLike | str) -> Path:
    """In the driver, before Ray starts (a local Ray's processes inherit the environment): a stop file of its own
    under the shared root unless the launcher (the sbatch script) named one."""
    if not os.environ.get(STOP_ENV):
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        os.environ[STOP_ENV] = str(Path(shared_root).resolve() / STOP_DIR / name)
    return Path(os.environ[STOP_ENV])


def install_handler() -> bool:
    """SIGTERM writes the stop request instead of ending the driver (installed after `ray.init`, which sets its own
    handler that exits at once). Only from the main thread; False elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _on_sigterm(signum, frame) -> None:
    path = request_stop()
    print(f"SIGTERM: stopping at the next checkpoint boundary (stop request {path})", flush=True)


def stop_line(what: str) -> str:
    return (f"{what}: stopped on a stop request after checkpointing (SIGTERM: time limit or preemption); rerun the "
            "same command to resume")
