"""SIGTERM (a Slurm time limit, a spot notice): training checkpoints at its next epoch boundary, exits with
PREEMPTED_EXIT, and the same command resumes from that checkpoint: no epoch trained twice or lost. Without Slurm:
a real `raylab train` process on a local Ray, sent SIGTERM mid-training."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raylab import preempt
from raylab.presets import make_config
from raylab.tracking import get_run, get_run_metrics_history, resolve_tracking_uri

EPOCHS = 12
SMALL = {"train.ratio": 1, "data.max_train": 128, "data.val_size": 64, "train.batch_size": 32, "attack.steps": 2,
         "train.val_pgd_steps": 2, "eval.batch_size": 128, "train.epochs": EPOCHS, "resources.num_workers": 1,
         "resources.cpus_per_worker": 1, "train.checkpoint_every": 1000}  # no checkpoint but the stop's and the last


def test_stop_request_is_a_file_named_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(preempt.STOP_ENV, "")  # unset for raylab; restored after, with what prepare() sets
    assert not preempt.stop_requested() and preempt.request_stop() is None
    path = preempt.prepare(tmp_path)  # the driver's own file under the shared root
    assert path.parent == tmp_path.resolve() / preempt.STOP_DIR and not preempt.stop_requested()
    assert preempt.prepare(tmp_path / "elsewhere") == path  # a launcher's (or an earlier) choice is kept
    assert preempt.request_stop() == path and preempt.stop_requested() and preempt.stop_requested(path)
    assert not preempt.stop_requested(tmp_path / "other")


def _train(root: Path) -> subprocess.Popen:
    sets = [a for k, v in {**SMALL, "tracking.root": str(root)}.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(preempt.STOP_ENV, None)
    return subprocess.Popen([sys.executable, "-m", "raylab", "train", *sets], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _epoch_lines(lines: list[str]) -> list[int]:
    return [int(line.split(" epoch ")[1].split("/")[0]) for line in lines if f"/{EPOCHS}  loss" in line]


def _run_until_first_epoch_then_term(root: Path) -> tuple[int, list[str]]:
    proc, lines = _train(root), []
    for line in proc.stdout:
        lines.append(line)
        if _epoch_lines([line]) == [1]:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    return proc.wait(timeout=600), lines


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_epoch_boundary_exits_cleanly_and_resumes(tmp_path):
    root = tmp_path / "runs"
    rc, lines = _run_until_first_epoch_then_term(root)
    text = "".join(lines)
    assert rc == preempt.PREEMPTED_EXIT, text[-3000:]
    assert "SIGTERM: stopping at the next checkpoint boundary" in text and "rerun the same command" in text
    assert "Traceback" not in text
    (run_dir,) = (root / "train").iterdir()
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    uri = resolve_tracking_uri(make_config("tiny", {"tracking.root": str(root)}).tracking)
    stopped_at = max(_epoch_lines(lines))
    assert 1 <= stopped_at < EPOCHS
    assert [s for s, _ in get_run_metrics_history(uri, run_id, "train_loss")] == list(range(1, stopped_at + 1))
    assert get_run(uri, run_id).status == "KILLED"
    # the checkpoint the stop wrote (checkpoint_every is far away): its state is the last epoch logged
    (ckpt,) = [p for p in (root / "ray_results" / run_dir.name).glob("checkpoint_*") if p.is_dir()]
    assert torch.load(ckpt / "state.pt", weights_only=True)["epoch"] == stopped_at
    assert not (run_dir / "last.pt").exists()

    resumed = _train(root)
    out = resumed.stdout.read()
    assert resumed.wait(timeout=600) == 0, out[-3000:]
    assert _epoch_lines(out.splitlines()) == list(range(stopped_at + 1, EPOCHS + 1))  # from the checkpoint on
    steps = [s for s, _ in get_run_metrics_history(uri, run_id, "train_loss")]
    assert steps == list(range(1, EPOCHS + 1))  # every epoch exactly once
    assert get_run(uri, run_id).status == "FINISHED" and (run_dir / "last.pt").exists()
