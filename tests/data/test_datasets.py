"""Dataset loaders read tiny fixtures written in the exact formats of the real archives (CIFAR tar.gz of
protocol-2 pickles with bytes keys, SVHN MATLAB v5 with label 10), through `load_splits`; digits is real data."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from raylab import config
from raylab.config import DataConfig
from raylab.data import datasets as ds
from raylab.data.datasets import DatasetError, ImageSet, load_splits

# A known pixel: channel 1 (green), row 5, column 7 of an image, written into the CHW-flattened row.
C, H, W, VALUE = 1, 5, 7, 201
PER_BATCH, N_TEST = 4, 3


def _rows(n: int, seed: int) -> np.ndarray:
    """CIFAR-layout rows: image i has every byte = i + 10*seed, except the known pixel of image 0."""
    rows = np.repeat((np.arange(n) + 10 * seed).astype(np.uint8)[:, None], 3072, axis=1)
    rows[0, C * 1024 + H * 32 + W] = VALUE
    return rows


def _pickle(obj: dict) -> bytes:
    return pickle.dumps(obj, protocol=2)  # what the originals are: Python 2 pickles, bytes keys


@pytest.fixture(autouse=True)
def _own_remotes(monkeypatch):
    """Each test gets its own copy of the official sources, so fixtures can stand in for published archives."""
    monkeypatch.setattr(ds, "REMOTES", dict(ds.REMOTES))


def _write_tar(path: Path, folder: str, files: dict[str, bytes]) -> Path:
    """A tar.gz of `files` under `folder/`; under an official archive's name it becomes that archive's published md5
    (this test's copy of REMOTES), as the real file placed in data.root would match."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if path.name in ds.REMOTES:
        ds.REMOTES[path.name] = ds.Remote(ds.REMOTES[path.name].url, _md5(path))
    return path


def _cifar10_archive(path: Path) -> Path:
    files = {f"data_batch_{i}": _pickle({b"batch_label": b"x", b"data": _rows(PER_BATCH, i),
                                          b"labels": [(i + j) % 10 for j in range(PER_BATCH)]})
             for i in range(1, 6)}
    files["test_batch"] = _pickle({b"data": _rows(N_TEST, 9), b"labels": [9, 8, 7]})
    files["batches.meta"] = _pickle({b"label_names": [f"class{k}".encode() for k in range(10)],
                                     b"num_cases_per_batch": PER_BATCH})
    return _write_tar(path, "cifar-10-batches-py", files)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Registry.

def test_registry_matches_config_choices():
    assert tuple(ds.DATASET_LOADERS) == config.DATASETS


def test_registered_facts():
    assert {n: s.num_classes for n, s in ds.DATASET_LOADERS.items()} == {
        "cifar10": 10, "cifar100": 100, "svhn": 10, "digits": 10}
    assert ds.get_dataset("cifar10").mean == (0.4914, 0.4822, 0.4465)
    with pytest.raises(DatasetError, match="'mnist' is not one of"):
        ds.get_dataset("mnist")


def test_imageset_rejects_bad_arrays():
    images, labels = np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int64)
    with pytest.raises(DatasetError, match="uint8"):
        ImageSet(images.astype(np.float32), labels, ("a",))
    with pytest.raises(DatasetError, match=r"\(N, 32, 32, 3\)"):
        ImageSet(np.zeros((2, 3, 32, 32), np.uint8), labels, ("a",))
    with pytest.raises(DatasetError, match="int64"):
        ImageSet(images, labels.astype(np.int32), ("a",))
    with pytest.raises(DatasetError, match=r"\[0, 1\)"):
        ImageSet(images, labels + 1, ("a",))
    assert ImageSet(images, labels, ["a", "b"]).num_classes == 2


# ---------------------------------------------------------------------------------------------------------------
# CIFAR.

def test_cifar10_archive_layout_labels_and_holdout(tmp_path):
    _cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    s = load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=3))
    assert (len(s.val), len(s.train), len(s.test)) == (3, 5 * PER_BATCH - 3, N_TEST)
    assert s.class_names == tuple(f"class{k}" for k in range(10)) == s.train.class_names
    assert (s.mean, s.std) == ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    # The known CHW pixel lands at HWC [row, col, channel]; nothing else in the image moved.
    img = s.val.images[0]
    assert img[H, W, C] == VALUE and img[H, W, 0] == img[H, W, 2] == 10
    assert (img == VALUE).sum() == 1
    # Validation = the first 3 images of data_batch_1; train continues with the 4th, then data_batch_2.
    assert s.val.labels.tolist() == [1, 2, 3] and s.train.labels[:2].tolist() == [4, 2]
    assert s.train.images[1, H, W, C] == VALUE  # first image of data_batch_2
    assert s.test.labels.tolist() == [9, 8, 7] and s.test.images[0, H, W, C] == VALUE
    # Extracted atomically: the folder is there, no temp folder is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar10_reads_extracted_folder_without_archive(tmp_path):
    _cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    first = load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=0))
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    again = load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=0))
    assert np.array_equal(first.train.images, again.train.images) and len(again.val) == 0


def test_cifar100_uses_fine_labels(tmp_path):
    names = [f"fine{k}".encode() for k in range(100)]
    _write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", {
        "train": _pickle({b"data": _rows(5, 1), b"fine_labels": [99, 0, 50, 7, 3], b"coarse_labels": [1] * 5}),
        "test": _pickle({b"data": _rows(2, 2), b"fine_labels": [42, 43], b"coarse_labels": [0, 0]}),
        "meta": _pickle({b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}),
    })
    s = load_splits(DataConfig(dataset="cifar100", root=str(tmp_path), val_size=1))
    assert s.num_classes == 100 and s.class_names[99] == "fine99"
    assert s.val.labels.tolist() == [99] and s.train.labels.tolist() == [0, 50, 7, 3]
    assert s.test.labels.tolist() == [42, 43] and s.val.images[0, H, W, C] == VALUE
    assert s.mean == (0.5071, 0.4865, 0.4409)


def test_max_train_caps_the_rest_after_holdout(tmp_path):
    _cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    s = load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=2, max_train=5))
    assert len(s.val) == 2 and len(s.train) == 5
    assert s.train.labels.tolist() == [3, 4, 2, 3, 4]  # rows 2..6 of the training batches
    assert len(s.test) == N_TEST  # the test set is never capped here


def test_val_size_none_is_the_datasets_default(tmp_path, monkeypatch):
    _cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    assert cfg.val_size is None
    # The registered default, 1024 (the papers' holdout), does not fit the 20-image fixture...
    with pytest.raises(DatasetError, match=r"^data.val_size: 1024 must be < the 20 training images"):
        load_splits(cfg)
    # ...and a smaller registered default is what None resolves to.
    monkeypatch.setitem(ds.DATASET_LOADERS, "cifar10", dataclasses.replace(ds.get_dataset("cifar10"), val_size=6))
    s = load_splits(cfg)
    assert (len(s.val), len(s.train)) == (6, 14) and s.val.labels.tolist() == [1, 2, 3, 4, 2, 3]


def test_val_size_too_large_is_one_line_error(tmp_path):
    _cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DatasetError, match=r"^data.val_size: 20 must be < the 20 training images of cifar10$"):
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=20))


def test_reads_pickles_naming_old_numpy_module(tmp_path):
    """The 2009 CIFAR files name `numpy.core.multiarray._reconstruct`, a module numpy 2 only keeps as a shim."""
    data = _pickle({b"data": _rows(2, 1), b"labels": [3, 4]})
    old = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert old != data or b"cnumpy.core.multiarray\n" in data
    (tmp_path / "batch").write_bytes(old)
    got = ds.read_pickle(tmp_path / "batch")
    assert got[b"labels"] == [3, 4] and np.array_equal(got[b"data"], _rows(2, 1))


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))  # not print: Ray Data, once run in the process, replaces it

    _write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py",
               {"batches.meta": pickle.dumps({b"label_names": Evil()}, protocol=2)})
    with pytest.raises(DatasetError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_archive_escaping_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _write_tar(root / "cifar-10-python.tar.gz", "cifar-10-batches-py/../..", {"evil": b"x"})
    with pytest.raises(DatasetError, match="unexpected archive member"):
        load_splits(DataConfig(dataset="cifar10", root=str(root)))
    assert not (tmp_path / "evil").exists() and sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]


# ---------------------------------------------------------------------------------------------------------------
# SVHN.

def _svhn_mat(path: Path, labels: list[int]) -> None:
    n = len(labels)
    x = np.zeros((32, 32, 3, n), np.uint8)
    x[H, W, C, :] = np.arange(n) + 100  # MATLAB layout: (row, col, channel, image)
    scipy.io.savemat(path, {"X": x, "y": np.asarray(labels, np.uint8).reshape(n, 1)})


def test_svhn_mat_layout_and_label_10_is_zero(tmp_path):
    _svhn_mat(tmp_path / "train_32x32.mat", [10, 1, 9, 10, 5])
    _svhn_mat(tmp_path / "test_32x32.mat", [3, 10])
    s = load_splits(DataConfig(dataset="svhn", root=str(tmp_path), val_size=2))
    assert s.val.labels.tolist() == [0, 1] and s.train.labels.tolist() == [9, 0, 5]
    assert s.test.labels.tolist() == [3, 0] and s.class_names == tuple("0123456789")
    assert s.train.images[:, H, W, C].tolist() == [102, 103, 104]
    assert s.train.images.sum() == 102 + 103 + 104  # every other byte stayed zero
    assert (s.mean, s.std) == ((0.5,) * 3, (0.5,) * 3)


# ---------------------------------------------------------------------------------------------------------------
# Missing files and downloads (file:// URLs only: nothing downloads in tests).

@pytest.mark.parametrize("dataset, missing", [("cifar10", "cifar-10-python.tar.gz"),
                                              ("cifar100", "cifar-100-python.tar.gz"),
                                              ("svhn", "train_32x32.mat")])
def test_missing_archive_is_one_line_error(tmp_path, dataset, missing):
    with pytest.raises(DatasetError) as err:
        load_splits(DataConfig(dataset=dataset, root=str(tmp_path)))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / missing) in msg and "data.download=true" in msg
    assert list(tmp_path.iterdir()) == []


def test_download_file_checks_md5(tmp_path):
    src = tmp_path / "mirror" / "train_32x32.mat"
    src.parent.mkdir()
    src.write_bytes(b"svhn bytes")
    dest = tmp_path / "root" / "train_32x32.mat"
    assert ds.download_file(src.as_uri(), dest, _md5(src)) == dest
    assert dest.read_bytes() == b"svhn bytes" and sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_download_file_bad_md5_leaves_nothing(tmp_path):
    src = tmp_path / "archive.tar.gz"
    src.write_bytes(b"truncated")
    dest = tmp_path / "root" / "cifar-10-python.tar.gz"
    with pytest.raises(DatasetError) as err:
        ds.download_file(src.as_uri(), dest, "0" * 32)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and "0" * 32 in msg and _md5(src) in msg
    assert list(dest.parent.iterdir()) == []


def test_load_splits_downloads_missing_archive(tmp_path):
    mirror = _cifar10_archive(tmp_path / "mirror.tar.gz")
    ds.REMOTES["cifar-10-python.tar.gz"] = ds.Remote(mirror.as_uri(), _md5(mirror))
    root = tmp_path / "root"
    s = load_splits(DataConfig(dataset="cifar10", root=str(root), download=True, val_size=3))
    assert len(s.train) == 17 and s.val.images[0, H, W, C] == VALUE
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_placed_archive_with_wrong_md5_is_refused_before_extracting(tmp_path):
    archive = _cifar10_archive(tmp_path / "cifar-10-python.tar.gz")  # its md5 is now the "published" one
    archive.write_bytes(archive.read_bytes()[:-10])  # truncated copy: still starts like a tar.gz
    with pytest.raises(DatasetError) as err:
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=3))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{archive}: md5 {_md5(archive)} != the published")
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # nothing extracted


def test_placed_archive_is_hashed_once_not_on_every_load(tmp_path):
    archive = _cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=3))
    archive.write_bytes(b"changed after extraction")  # only the extracted folder is read from now on
    assert len(load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=3)).train) == 17


def test_download_failure_names_the_url_and_data_root(tmp_path):
    url = (tmp_path / "no-mirror" / "cifar-10-python.tar.gz").as_uri()
    dest = tmp_path / "root" / "cifar-10-python.tar.gz"
    with pytest.raises(DatasetError) as err:
        ds.download_file(url, dest, "0" * 32)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{url}: download failed (")
    assert f"place cifar-10-python.tar.gz in {dest.parent} (data.root)" in msg
    assert list(dest.parent.iterdir()) == []  # no partial file


def test_load_splits_download_failure_is_a_dataset_error(tmp_path):
    url = (tmp_path / "gone.tar.gz").as_uri()
    ds.REMOTES["cifar-10-python.tar.gz"] = ds.Remote(url, "0" * 32)
    with pytest.raises(DatasetError, match=f"^{url}: download failed .* in {tmp_path / 'root'} \\(data.root\\)$"):
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path / "root"), download=True))


def test_official_sources_are_pinned():
    assert {k: v.md5 for k, v in ds.REMOTES.items()} == {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164e9fef3"}
    assert all(v.url.endswith("/" + k) for k, v in ds.REMOTES.items())


# ---------------------------------------------------------------------------------------------------------------
# The check before compute (`check_dataset`): on the driver before generation, on every Ray Train worker.

def _node() -> str:
    from raylab.cluster import this_node

    return this_node()


@pytest.mark.parametrize("dataset, missing", [("cifar10", "cifar-10-python.tar.gz"),
                                              ("cifar100", "cifar-100-python.tar.gz"),
                                              ("svhn", "train_32x32.mat")])
def test_a_missing_dataset_is_one_line_naming_path_node_and_fix(tmp_path, dataset, missing):
    with pytest.raises(DatasetError) as err:
        ds.check_dataset(DataConfig(dataset=dataset, root=str(tmp_path / "data")))
    assert str(err.value) == (
        f"data.dataset={dataset} on node {_node()}: {tmp_path / 'data' / missing}: dataset file missing; set "
        f"data.download=true or place {missing} there (on a cluster: data.root on the shared root every node mounts)")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_archive_is_refused_and_a_good_one_hashed_once_per_version(tmp_path, monkeypatch):
    archive = _cifar10_archive(tmp_path / "cifar-10-python.tar.gz")  # its md5 is now the "published" one
    good = archive.read_bytes()
    archive.write_bytes(good[:-10])  # truncated copy
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), val_size=3)
    with pytest.raises(DatasetError) as err:
        ds.check_dataset(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"data.dataset=cifar10 on node {_node()}: {archive}: md5 ")
    assert "delete it and set data.download=true" in msg and "shared root" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # nothing recorded, nothing extracted
    archive.write_bytes(good)
    hashed = []
    monkeypatch.setattr(ds, "file_digest", lambda path, algorithm: hashed.append(path) or _md5(path))
    ds.check_dataset(cfg)
    ds.check_dataset(cfg)  # the record beside the archive: not hashed again
    assert hashed == [archive] and (tmp_path / ".cifar-10-python.tar.gz.md5").is_file()
    os.utime(archive, ns=(0, archive.stat().st_mtime_ns + 10**9))  # replaced (same size, newer mtime)
    ds.check_dataset(cfg)
    assert hashed == [archive, archive]


def test_the_extracted_folder_is_what_is_checked_once_there(tmp_path):
    """The loader reads the extracted folder alone once it exists: the check follows it."""
    _cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), val_size=3)
    load_splits(cfg)  # extracts
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    ds.check_dataset(cfg)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=f"^data.dataset=cifar10 on node .*: {tmp_path}/cifar-10-batches-py/"
                                           "data_batch_3: dataset file missing from the extracted folder; delete "
                                           "the folder to re-extract the archive"):
        ds.check_dataset(cfg)


def test_svhn_files_are_checked_against_their_md5_and_downloaded_when_allowed(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for split, labels in (("train", [1, 2, 3]), ("test", [4, 5])):
        _svhn_mat(mirror / f"{split}_32x32.mat", labels)
        ds.REMOTES[f"{split}_32x32.mat"] = ds.Remote((mirror / f"{split}_32x32.mat").as_uri(),
                                                     _md5(mirror / f"{split}_32x32.mat"))
    root = tmp_path / "root"
    ds.check_dataset(DataConfig(dataset="svhn", root=str(root), download=True))
    assert sorted(p.name for p in root.iterdir()) == [".test_32x32.mat.md5", ".train_32x32.mat.md5",
                                                      "test_32x32.mat", "train_32x32.mat"]
    (root / "test_32x32.mat").write_bytes(b"not the file")
    with pytest.raises(DatasetError, match=f"svhn on node .*: {root / 'test_32x32.mat'}: md5 "):
        ds.check_dataset(DataConfig(dataset="svhn", root=str(root)))


def test_digits_has_no_file_to_check(tmp_path):
    ds.check_dataset(DataConfig(dataset="digits", root=str(tmp_path / "none")))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# digits (real data, embedded).

@pytest.fixture(scope="module")
def digits():
    return load_splits(DataConfig(dataset="digits", root="unused", val_size=100))


def test_digits_shapes_range_and_balance(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1397, 100, 300)
    assert digits.train.images.shape == (1397, 32, 32, 3) and digits.train.images.dtype == np.uint8
    imgs = digits.train.images
    assert imgs.min() == 0 and imgs.max() == 255
    assert imgs[:, :2].max() == imgs[:, -2:].max() == imgs[:, :, :2].max() == imgs[:, :, -2:].max() == 0  # border
    assert np.array_equal(imgs[..., 0], imgs[..., 2])  # gray in three channels
    assert np.bincount(digits.test.labels, minlength=10).tolist() == [30] * 10
    train_counts = np.bincount(np.concatenate([digits.train.labels, digits.val.labels]), minlength=10)
    assert train_counts.min() >= 140 and train_counts.max() <= 160
    assert 5 <= np.bincount(digits.val.labels, minlength=10).min()  # the shuffled prefix covers every class
    assert digits.class_names == tuple(str(d) for d in range(10))


def test_digits_default_holdout_is_128():
    s = load_splits(DataConfig(dataset="digits", root="unused"))
    assert (len(s.val), len(s.train), len(s.test)) == (128, 1497 - 128, 300)
    assert ds.get_dataset("digits").val_size == 128


def test_digits_is_deterministic(digits):
    again = load_splits(DataConfig(dataset="digits", root="unused", val_size=100))
    for a, b in ((digits.train, again.train), (digits.val, again.val), (digits.test, again.test)):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_digits_split_is_disjoint_and_complete():
    labels = np.arange(1797) % 10
    train, test = ds.digits_split(labels)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1797
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    assert np.bincount(labels[test]).tolist() == [30] * 10


def test_digits_render_keeps_the_digit():
    """A single lit 8x8 cell becomes a smooth blob centred where that cell maps in the 32x32 frame."""
    x = np.zeros((1, 8, 8))
    x[0, 2, 5] = 16
    img = ds.render_digits(x)[0, ..., 0]
    r, c = np.unravel_index(img.argmax(), img.shape)
    centre = lambda i: 2 + (i + 0.5) * 28 / 8 - 0.5  # pad + cell centre under align_corners=False
    assert img.max() >= 200 and abs(r - centre(2)) <= 1 and abs(c - centre(5)) <= 1
    assert 4 < (img > 0).sum() < 60  # spread by bilinear upsampling, not a blocky 3.5x3.5 square or a smear


def test_digits_normalization_constants_match_data():
    mean, std = ds.digits_statistics()
    spec = ds.get_dataset("digits")
    assert np.allclose(mean, spec.mean, atol=1e-4) and np.allclose(std, spec.std, atol=1e-4)
