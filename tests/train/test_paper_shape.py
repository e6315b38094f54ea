"""The generated stream at paper shape, through the real path: a class-sorted reference-format .npz of 10 x 20,000
rows is imported, and 2 DDP workers train on it through the Ray Data ingest, recording every batch's generated rows.
And exact resume with 2 workers: a crash mid-epoch ends where the uninterrupted 2-worker run ends."""
import numpy as np
import pytest
from scipy.stats import chisquare

from raylab.config import override
from raylab.presets import make_config
from raylab.data.datasets import load_splits
from raylab.data.mix import split_batch
from raylab.data.npz_import import import_npz
from raylab.data.shards import read_numpy
from raylab.pipeline.generated_input import generated_input
from tests.train.test_training import small_config, write_generated

CLASSES, PER_CLASS = 10, 20_000


@pytest.fixture(scope="module")
def sorted_import(tmp_path_factory):
    """A 200K-row .npz concatenated class by class, as the published sets are, imported as a store."""
    d = tmp_path_factory.mktemp("paper-shape")
    images = np.zeros((CLASSES * PER_CLASS, 32, 32, 3), np.uint8)  # pixels do not matter to the mix
    np.savez(d / "sorted.npz", image=images, label=np.repeat(np.arange(CLASSES), PER_CLASS))
    del images
    store = import_npz(d / "sorted.npz", d / "store", shard_size=10_000, num_classes=10)
    (d / "sorted.npz").unlink()
    return store.root


def _traces(trace_dir, world, epochs):
    return {(r, e): np.load(trace_dir / f"rank-{r}-epoch-{e}.npz") for r in range(world) for e in range(1, epochs + 1)}


@pytest.mark.ray
def test_two_ddp_workers_draw_random_disjoint_rows_from_a_class_sorted_import(ray_session, sorted_import, tmp_path):
    from raylab.train.job import run_training

    cfg = make_config("tiny", {"tracking.root": str(tmp_path / "runs"), "resources.num_workers": 2,
                               "resources.cpus_per_worker": 1, "train.batch_size": 128, "train.ratio": 0.3, "train.epochs": 2, "train.loss": "ce",
                               "data.max_train": 1024, "data.val_size": 32, "train.ema_bn": "copy",
                               "train.checkpoint_every": 2})
    out = run_training(cfg, generated=generated_input(sorted_import), trace=str(tmp_path / "trace"))
    assert [h["epoch"] for h in out.history] == [1, 2]
    traces = _traces(tmp_path / "trace", 2, 2)
    _, per_rank = split_batch(64, 0.3)
    seeds = {k: t["seed"] for k, t in traces.items()}
    # (1024 originals + 32 held out) / 128 = 9 steps per epoch: the reference counts the validation images in.
    assert all(s.shape == (9, per_rank) for s in seeds.values())
    # A pass is 200,000 / 90 = 2,222 steps: all 18 steps are in the first one, so no row may come twice.
    every = np.concatenate([s.ravel() for s in seeds.values()])
    assert len(np.unique(every)) == len(every) == 2 * 2 * 9 * per_rank
    truth = read_numpy(sorted_import, ["seed", "label"])
    label_of = np.empty(len(truth["seed"]), np.int64)
    label_of[truth["seed"]] = truth["label"]
    for key, t in traces.items():
        np.testing.assert_array_equal(t["label"], label_of[t["seed"]])  # labels travel with their rows
    # The generated part of each global batch (both ranks) against a uniform class mix. Class-sorted streaming gave
    # 92% of one class on average; a uniform draw of 90 rows has p < 1e-4 with probability 1e-4.
    for epoch in (1, 2):
        batches = np.concatenate([traces[(r, epoch)]["label"] for r in range(2)], axis=1)
        for labels in batches:
            counts = np.bincount(labels, minlength=CLASSES)
            assert chisquare(counts).pvalue > 1e-4, counts
            assert counts.max() <= 0.35 * len(labels), counts


@pytest.mark.ray
def test_two_worker_crash_and_resume_equals_the_uninterrupted_two_worker_run(ray_session, tmp_path):
    """Each rank's random streams (attack noise, augmentation) and the stream positions come back after a crash
    mid-epoch 2: the losses of both epochs and every rank's generated rows equal the uninterrupted run's."""
    from raylab.train.job import run_training

    cfg = small_config(tmp_path, **{"resources.num_workers": 2, "train.ratio": 0.5, "resources.max_failures": 1,
                                    "train.checkpoint_every": 1, "train.epochs": 2, "data.max_train": 128,
                                    "train.batch_size": 32})
    splits = load_splits(cfg.data)
    generated = generated_input(write_generated(tmp_path / "gen", splits.train.images, splits.train.labels).root)
    straight = run_training(cfg, generated=generated, name="straight", trace=str(tmp_path / "t-straight"))
    marker = tmp_path / "crashed"
    crashed = run_training(override(cfg, {}), generated=generated, name="crashed", trace=str(tmp_path / "t-crash"),
                           crash={"epoch": 2, "after_steps": 2, "marker": str(marker)})
    assert marker.exists()
    for key in ("train_loss", "train_clean_acc", f"val_pgd{cfg.train.val_pgd_steps}_acc"):
        np.testing.assert_allclose([h[key] for h in crashed.history], [h[key] for h in straight.history],
                                   rtol=1e-5, err_msg=key)
    a, b = _traces(tmp_path / "t-straight", 2, 2), _traces(tmp_path / "t-crash", 2, 2)
    for key in a:
        np.testing.assert_array_equal(a[key]["seed"], b[key]["seed"])
