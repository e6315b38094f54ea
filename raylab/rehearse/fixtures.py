"""A CIFAR-10 archive in the real format, of images this code draws: the dress rehearsal's dataset, so that nothing
is downloaded and no one else's data is copied.

`cifar-10-python.tar.gz` holds `cifar-10-batches-py/` with `data_batch_1..5`, `test_batch` and `batches.meta`:
Python pickles (protocol 2) of bytes-keyed dicts, `data` an (N, 3072) uint8 array of CHW rows, `labels` a list of
ints. Class k's images are a tint and a stripe frequency of their own under noise: learnable (the rehearsal's
2-epoch scorer reached 36% on the 10 classes), and weak enough for an 8/255 adversary to flip, so AutoAttack ends
quickly. It tests mechanics, not accuracy.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCHES = 5


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 32, 32, 3) uint8: class k is a tint of hue k/10 (amplitude 16 gray levels) in stripes of period 2 + k,
    under Gaussian noise (sd 40). The signal is two eps = 8/255 strong, so an adversary flips most images and
    AutoAttack's later attacks have few robust points left to work on: the rehearsal's evaluation stays short."""
    k = np.asarray(labels, np.float64)[:, None, None, None]
    angle = 2 * np.pi * (k / len(CLASSES) + np.arange(3)[None, None, None, :] / 3)
    stripes = np.cos(2 * np.pi * np.arange(32)[None, :, None, None] / (2 + k))
    images = 128 + 16 * np.cos(angle) * (0.5 + 0.5 * stripes) + rng.normal(0, 40, (len(labels), 32, 32, 3))
    return np.clip(np.broadcast_to(images, (len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)


def _batch(labels: np.ndarray, rng: np.random.Generator, name: str) -> bytes:
    rows = synthetic_images(labels, rng).transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # HWC -> CHW rows
    return pickle.dumps({b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": rows},
                        protocol=2)


def cifar10_files(train_per_class: int, test_per_class: int, seed: int = 0) -> dict[str, bytes]:
    """The archive's members: classes shuffled within each split, the training split cut into 5 batches."""
    rng = np.random.default_rng(seed)
    train = rng.permutation(np.repeat(np.arange(len(CLASSES)), train_per_class))
    files = {f"data_batch_{i + 1}": _batch(part, rng, f"training batch {i + 1} of {TRAIN_BATCHES}")
             for i, part in enumerate(np.array_split(train, TRAIN_BATCHES))}
    files["test_batch"] = _batch(rng.permutation(np.repeat(np.arange(len(CLASSES)), test_per_class)), rng,
                                 "testing batch 1 of 1")
    files["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CLASSES],
                                          b"num_cases_per_batch": len(train) // TRAIN_BATCHES,
                                          b"num_vis": 3072}, protocol=2)
    return files


def write_cifar10_archive(root: str | Path, train_per_class: int = 50, test_per_class: int = 20,
                          seed: int = 0) -> Path:
    """`root/cifar-10-python.tar.gz`, written to a temp name and renamed into place."""
    path = Path(root) / ARCHIVE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{ARCHIVE}.part")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, data in cifar10_files(train_per_class, test_per_class, seed).items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)
    return path


def place_cifar10(root: str | Path, train_per_class: int = 50, test_per_class: int = 20, seed: int = 0) -> Path:
    """The archive in `root` and its extracted folder beside it, as a first load leaves them (and torchvision's
    layout): the loader reads the folder. The archive cannot match CIFAR-10's published md5, which raylab checks
    before extracting an archive it finds (tests/data cover that path with archives they register)."""
    archive = write_cifar10_archive(root, train_per_class, test_per_class, seed)
    target = Path(root) / FOLDER
    if not target.is_dir():
        tmp = Path(root) / f".{FOLDER}.part"
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        (tmp / FOLDER).rename(target)
        tmp.rmdir()
    return archive
