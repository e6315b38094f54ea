"""EDM training: the pure pieces, local-mode training that lowers the loss and writes a loadable network, and a
crashed Ray Train worker that resumes onto the uninterrupted trajectory."""
import numpy as np
import pytest
import torch

from raylab.presets import make_config
from raylab.data.datasets import load_splits
from raylab.generate.checkpoint import load_edm
from raylab.runtime import torch_threads
from raylab.train.edm_worker import EDMTrainOutcome, batch_rows, build_training, run_tick, tick_bounds

# A very small net (8 channels, two levels) on digits, every edm value pinned so preset changes cannot move the
# test; a high learning rate so a few hundred images show a clear drop of the loss.
SMALL = {"edm.model_channels": 8, "edm.channel_mult": (1, 2), "edm.num_blocks": 1, "edm.attn_resolutions": (),
         "edm.dropout": 0.0, "edm.augment_dim": 0, "edm.p_mean": -1.2, "edm.p_std": 1.2, "edm.seed": 0,
         "edm.batch_size": 16, "edm.lr": 0.01, "edm.warmup_kimg": 0.0, "edm.ema_halflife_kimg": 0.1,
         "edm.ema_rampup": 0.05, "edm.total_kimg": 0.384, "edm.checkpoint_every_kimg": 0.096, "generate.steps": 2}


def small_config(tmp_path, **extra):
    return make_config("tiny", {**SMALL, "tracking.root": str(tmp_path / "runs"), **extra})


def test_global_batches_are_a_permutation_per_epoch_shared_out_over_ranks():
    one = [batch_rows(s, 100, 20, seed=3) for s in range(5)]
    assert sorted(np.concatenate(one).tolist()) == list(range(100))  # epoch 0 covers every row once
    two = [np.concatenate([batch_rows(s, 100, 20, seed=3, rank=r, world=2) for r in (0, 1)]) for s in range(5)]
    np.testing.assert_array_equal(np.concatenate(one), np.concatenate(two))  # same data whatever the world size
    assert not np.array_equal(batch_rows(5, 100, 20, seed=3), one[0])  # epoch 1 is a fresh order
    with pytest.raises(ValueError, match="edm.batch_size"):
        batch_rows(0, 10, 20, seed=0)


def test_ticks_end_at_step_boundaries_and_at_the_total(tmp_path):
    cfg = small_config(tmp_path).edm  # 16-image steps, 96-image ticks, 384 images
    assert tick_bounds(0, cfg) == (0, 96)
    assert tick_bounds(96, cfg) == (1, 192)
    assert tick_bounds(368, cfg) == (3, 384)


def test_a_tick_is_reproducible_and_leaves_the_global_rng_alone(tmp_path):
    cfg = small_config(tmp_path, **{"edm.dropout": 0.2, "edm.xflip": True, "edm.total_kimg": 0.048})
    train = load_splits(cfg.data).train
    runs = []
    for _ in range(2):
        t = build_training(cfg.edm, 10, torch.device("cpu"))
        before = torch.random.get_rng_state()
        with torch_threads(1):  # what a Ray worker gets; much faster than 2 on a loaded 2-core machine
            runs.append((run_tick(t, train)["loss"], t.ema.state_dict()))
        assert torch.equal(torch.random.get_rng_state(), before)
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_unconditional_training_ignores_the_labels(tmp_path):
    cfg = small_config(tmp_path, **{"edm.conditional": False, "edm.total_kimg": 0.016})
    t = build_training(cfg.edm, 10, torch.device("cpu"))
    assert t.label_dim == 0 and t.ema.label_dim == 0 and t.ema.model.map_label is None
    with torch_threads(1):
        assert np.isfinite(run_tick(t, load_splits(cfg.data).train)["loss"]) and t.n_img == 16


@pytest.mark.ray
def test_local_mode_lowers_the_loss_and_writes_a_loadable_network(ray_session, tmp_path):
    from raylab.tracking import get_run_metrics_history, resolve_tracking_uri
    from raylab.train.edm_worker import train_edm

    cfg = small_config(tmp_path, **{"resources.num_workers": 0})
    out = train_edm(cfg, samples_per_class=1)
    assert isinstance(out, EDMTrainOutcome)
    assert [h["tick"] for h in out.history] == [1, 2, 3, 4] and out.history[-1]["kimg"] == pytest.approx(0.384)
    assert out.history[-1]["loss"] < 0.8 * out.history[0]["loss"]
    net = load_edm(out.network_dir)
    assert net.label_dim == 10 and net.init_kwargs["model_channels"] == 8
    assert (out.run_dir / "samples.png").stat().st_size > 0
    history = get_run_metrics_history(resolve_tracking_uri(cfg.tracking), out.mlflow_run_id, "loss")
    assert [step for step, _ in history] == [1, 2, 3, 4]


def test_bad_batch_for_the_worker_count_fails_before_any_compute(tmp_path):
    from raylab.knobs import ConfigError

    with pytest.raises(ConfigError, match="^edm.batch_size: 15 is not divisible by resources.num_workers=2$"):
        small_config(tmp_path, **{"edm.batch_size": 15, "resources.num_workers": 2})  # the config refuses it
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_crashed_worker_resumes_onto_the_uninterrupted_trajectory(ray_session, tmp_path):
    """Rank 0 is killed in tick 3; FailureConfig(max_failures=1) restarts it from the latest checkpoint and the run
    ends with the same loss sequence and EMA weights as a run that never crashed (local mode, same seeds)."""
    from raylab.train.edm_worker import train_edm

    straight = train_edm(small_config(tmp_path, **{"resources.num_workers": 0}), name="straight",
                         samples_per_class=1)
    marker = tmp_path / "crashed"
    cfg = small_config(tmp_path, **{"resources.num_workers": 1, "resources.max_failures": 1})
    crashed = train_edm(cfg, name="crashed", crash={"kimg": 0.2, "marker": str(marker)}, samples_per_class=1)
    assert marker.exists()
    losses = lambda out: [h["loss"] for h in out.history]  # noqa: E731
    np.testing.assert_allclose(losses(crashed), losses(straight), rtol=1e-4)
    a, b = load_edm(straight.network_dir).state_dict(), load_edm(crashed.network_dir).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
