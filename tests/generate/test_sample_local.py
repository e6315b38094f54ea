"""Local sampling to files, and the committed tiny digits EDM: safe to load, and its samples are digits."""
import json

import numpy as np
import pytest
import torch

from raylab.presets import make_config
from raylab.data.datasets import load_splits
from raylab.generate.checkpoint import META_FILE, MODEL_FILE, load_generator
from raylab.generate.networks import make_network
from raylab.generate.sample_local import (SampleError, class_plan, default_generator_path, resolve_generator_path,
                                          sample_to_dir, write_grid_png)
from raylab.images import tile
from raylab.generate.seeds import image_seed


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Gray channel, 2×2 average-pooled to 16×16, in [0, 1]: enough for a linear classifier of digits (~95%)."""
    x = torch.as_tensor(images[..., 0]).float().div(255)[:, None]
    return torch.nn.functional.avg_pool2d(x, 2).flatten(1).numpy()


@pytest.fixture(scope="module")
def digit_classifier():
    from sklearn.linear_model import LogisticRegression

    splits = load_splits(make_config("tiny").data)
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(pixel_features(splits.train.images), splits.train.labels)
    assert clf.score(pixel_features(splits.test.images), splits.test.labels) > 0.9
    return clf


def test_committed_model_is_small_and_loads_weights_only_and_strictly():
    path = default_generator_path()
    assert resolve_generator_path("") == path and (path / MODEL_FILE).stat().st_size < 5 * 2**20
    meta = json.loads((path / META_FILE).read_text())
    net = make_network(meta["class"], meta["kwargs"])
    net.load_state_dict(torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True), strict=True)
    assert net.label_dim == 10 and net.img_resolution == 32 and net.img_channels == 3
    assert meta["extra"]["dataset"] == "digits"


def test_committed_model_samples_are_recognisable_digits(tmp_path, digit_classifier):
    """The issue's "samples differ from noise" check: 5 per class, 10 Heun steps, classified by a linear model
    trained on real digits. Noise or mode collapse would score near chance (10%)."""
    out = sample_to_dir("", 50, 10, tmp_path, seed=0)
    assert out.images.shape == (50, 32, 32, 3) and out.images.dtype == np.uint8
    np.testing.assert_array_equal(out.labels, np.repeat(np.arange(10), 5))
    accuracy = (digit_classifier.predict(pixel_features(out.images)) == out.labels).mean()
    assert accuracy >= 0.6, accuracy
    saved = np.load(out.npz)
    np.testing.assert_array_equal(saved["image"], out.images)
    assert saved["seed"][7] == image_seed(0, 1, 2)  # class-major: image 7 is class 1's third image
    from PIL import Image

    assert Image.open(out.grid).size == (5 * 34 + 2, 10 * 34 + 2)  # one class per row, 2-pixel gaps


def test_plan_is_class_major_and_rejects_bad_classes_before_sampling(tmp_path):
    seeds, labels = class_plan(7, 10, [3, 5], seed=1)
    assert labels.tolist() == [3, 3, 3, 3, 5, 5, 5]
    assert seeds[4] == image_seed(1, 5, 0)
    assert class_plan(2, 0)[1].tolist() == [-1, -1]  # unconditional
    for bad in ([10], [-1], []):
        with pytest.raises(SampleError, match="class_labels"):
            class_plan(3, 10, bad)
    with pytest.raises(SampleError, match="class_labels"):
        sample_to_dir("", 4, 2, tmp_path, class_labels=[12])
    with pytest.raises(SampleError, match="num"):
        sample_to_dir("", 0, 2, tmp_path)
    assert not any(tmp_path.iterdir())


def test_requested_classes_and_seed_fix_the_bytes(tmp_path):
    net = load_generator(default_generator_path())
    a = sample_to_dir("", 2, 2, tmp_path / "a", seed=3, class_labels=[7], npz=False)
    b = sample_to_dir(default_generator_path(), 2, 2, tmp_path / "b", seed=3, class_labels=[7], grid=False)
    assert a.npz is None and b.grid is None and a.labels.tolist() == [7, 7]
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images[0], a.images[1]) and net.label_dim == 10


def test_tile_layout_and_png_round_trip(tmp_path):
    images = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(5)])
    mosaic = tile(images, per_row=3, pad=1)
    assert mosaic.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert mosaic[1, 1, 0] == 0 and mosaic[1, 6, 0] == 10 and mosaic[6, 6, 0] == 40
    assert (mosaic[6:, 11:] == 255).all()  # the missing sixth tile is white
    from PIL import Image

    path = write_grid_png(tmp_path / "g.png", images, per_row=5)
    assert np.asarray(Image.open(path)).ndim == 2  # equal channels are stored as gray
    with pytest.raises(SampleError, match="grid"):
        write_grid_png(tmp_path / "bad.png", images.astype(np.float32), per_row=2)


def test_cli_samples_to_files_and_rejects_bad_classes_in_one_line(tmp_path, capsys):
    from raylab.cli import main

    assert main(["edm", "sample", "--num", "4", "--steps", "2", "--out", str(tmp_path), "--classes", "1,2"]) == 0
    saved = np.load(tmp_path / "samples.npz")
    assert saved["label"].tolist() == [1, 1, 2, 2] and (tmp_path / "samples.png").exists()
    assert main(["edm", "sample", "--out", str(tmp_path / "bad"), "--classes", "12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class_labels" in err[0]
    assert main(["edm", "train", "--set", "edm.batch_size=15", "--set", "resources.num_workers=2",
                 "--set", f"tracking.root={tmp_path / 'runs'}"]) == 2
    assert "edm.batch_size: 15" in capsys.readouterr().err and not (tmp_path / "runs").exists()
