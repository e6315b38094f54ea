"""Tracking from the Train controller (raylab.raytrain.EpochLogger): workers report, the controller logs to MLflow,
exactly once per epoch, and prints one progress line per epoch."""
import os

import pytest

from raylab.config import TrackingConfig
from raylab.raytrain import EpochLogger, progress_line
from raylab.tracking import Tracker, get_run_metrics_history, resolve_tracking_uri


@pytest.fixture()
def run(tmp_path):
    cfg = TrackingConfig(root=str(tmp_path / "runs"))
    with Tracker.start(cfg, "logger", params={}, config_json="{}") as tracker:
        yield resolve_tracking_uri(cfg), tracker.run_id


def test_a_step_is_logged_once_even_by_a_resumed_logger(run, capsys):
    uri, run_id = run
    first = EpochLogger(uri, run_id, "epoch", 3)
    assert first.log({"epoch": 1, "train_loss": 2.0, "val_robust_acc": 0.25})
    assert not first.log({"epoch": 1, "train_loss": 9.0})  # a restarted worker group re-reports epoch 1
    resumed = EpochLogger(uri, run_id, "epoch", 3)  # a new controller (job-level resume) asks MLflow
    assert not resumed.log({"epoch": 1, "train_loss": 9.0})
    assert resumed.replay([{"epoch": 1, "train_loss": 9.0}, {"epoch": 2, "train_loss": 1.5}]) == 1
    assert get_run_metrics_history(uri, run_id, "train_loss") == [(1, 2.0), (2, 1.5)]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("epoch 1/3  loss 2.000  robust 25.0%") and lines[-1].startswith("epoch 2/3")
    assert len(lines) == 4 and all("not logged twice" in line for line in lines[1:3])


def test_progress_line_has_epoch_loss_accuracies_speed_and_eta():
    line = progress_line({"epoch": 2, "train_loss": 0.5, "val_clean_acc": 0.612, "val_robust_acc": 0.406,
                          "train_images_per_s": 850.4}, "epoch", 3, 70.0)
    assert line == "epoch 2/3  loss 0.500  clean 61.2%  robust 40.6%  850 img/s  ETA 00:01:10"
    # as the training worker names it: by the attack that measured it
    line = progress_line({"epoch": 1, "train_loss": 0.5, "val_clean_acc": 0.5, "val_pgd5_acc": 0.25}, "epoch", 3,
                         float("nan"))
    assert line == "epoch 1/3  loss 0.500  clean 50.0%  robust 25.0%"


def _reporting_worker(config):
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    for epoch in (1, 2):
        ray.train.report({"epoch": epoch, "rank": rank, "pid": os.getpid(), "train_loss": 1.0 / epoch})


@pytest.mark.ray
def test_metrics_of_worker_processes_reach_mlflow_through_the_controller(ray_session, run, tmp_path):
    """Two Ray Train workers (processes that never get a tracking URI) report; rank 0's metrics reach MLflow."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    uri, run_id = run
    trainer = TorchTrainer(_reporting_worker, scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name="logger", storage_path=str(tmp_path / "ray"),
                                                callbacks=[EpochLogger(uri, run_id, "epoch", 2)]))
    trainer.fit()
    assert [step for step, _ in get_run_metrics_history(uri, run_id, "train_loss")] == [1, 2]
    assert {value for _, value in get_run_metrics_history(uri, run_id, "rank")} == {0.0}
    assert all(pid != os.getpid() for _, pid in get_run_metrics_history(uri, run_id, "pid"))
