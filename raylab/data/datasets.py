"""Dataset registry and loaders: the original (real) images every stage starts from.

Every dataset becomes uint8 NHWC 32×32×3 images with int64 labels (`ImageSet`). `load_splits` turns a
`DataConfig` into train / validation / test, holding out the *first* `val_size` training images for validation
as Gowal et al. 2020 and Wang et al. 2023 do (1024 images; `data.val_size=None` = the dataset's registered
default), and carries the per-dataset normalization that the models apply inside themselves.

CIFAR-10/100 and SVHN are read from their standard archives in `data.root`: the extracted form, or the original
archive (checked against its published md5, then extracted into place atomically), or — with `data.download=true`
— fetched from the official URL and checked the same way; a failed download says where to place the file by hand.
The embedded default, `digits`, is scikit-learn's handwritten digits (real scans that ship inside the installed
package) rendered to 32×32×3, so everything runs offline.

`check_dataset` is the check before compute, on every node that reads the dataset: the files the loader will read
are in data.root and match their published md5 (hashed once per version of a file: a record beside it), or one
line names the file, the node and the fix.

Add a dataset with `@register_dataset(name, num_classes=..., mean=..., std=..., check=...)` on a function
`(root: Path, download: bool) -> (train, test)`; the names must match `raylab.config.DATASETS`.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np

from raylab.cluster import this_node
from raylab.io import atomic_write_text, file_digest, mkstemp_umask
from raylab.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_SHAPE = (32, 32, 3)  # H, W, C of every image in raylab (datasets, shards, generated sets)


class DatasetError(ValueError):
    """A one-line message naming the dataset file or setting at fault and what to do."""


class DatasetMissing(DatasetError):
    """A dataset file is not in data.root."""


# ---------------------------------------------------------------------------------------------------------------
# Containers.

@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value, so compare sets by identity
class ImageSet:
    """Images uint8 (N, 32, 32, 3) HWC in [0, 255], labels int64 (N,) in [0, len(class_names))."""
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
            raise DatasetError(f"ImageSet.images: expected uint8 array (N, 32, 32, 3), got "
                               f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != images.shape[:1]:
            raise DatasetError(f"ImageSet.labels: expected int64 array ({len(images)},), got "
                               f"{getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise DatasetError(f"ImageSet.labels: values must lie in [0, {len(self.class_names)}), got "
                               f"[{labels.min()}, {labels.max()}]")
        object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: slice | np.ndarray) -> ImageSet:
        """The rows selected by a slice or an index array (a copy, so the parent can be freed)."""
        return ImageSet(self.images[rows].copy(), self.labels[rows].copy(), self.class_names)


@dataclass(frozen=True, eq=False)
class Splits:
    """What a stage trains and evaluates on, plus the normalization models put in their first layer."""
    train: ImageSet
    val: ImageSet
    test: ImageSet
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------------------------
# Registry.

Loader = Callable[[Path, bool], "tuple[ImageSet, ImageSet]"]
Checker = Callable[[Path, bool], None]  # (root, download): raises DatasetError unless the loader will find its files


def _nothing_to_check(root: Path, download: bool) -> None:
    """A dataset that ships inside an installed package (digits) has no file to check."""


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its loader `(root, download) -> (train, test)` and facts known without loading."""
    name: str
    load: Loader
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val_size: int = 1024  # the papers hold out the first 1024 CIFAR-10 training images
    sizes: tuple[int, int] = (0, 0)  # (train, test) images, for plans made without loading (0 = unknown)
    check: Checker = _nothing_to_check  # `check_dataset`: its files are there and intact


DATASET_LOADERS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, *, num_classes: int, mean: Sequence[float], std: Sequence[float],
                     val_size: int = 1024, sizes: tuple[int, int] = (0, 0), check: Checker = _nothing_to_check):
    """Decorator: record `load(root, download) -> (train, test)` under `name`; `val_size` is the default holdout,
    `sizes` the (train, test) image counts, `check` the check of its files before compute."""
    def wrap(load: Loader) -> Loader:
        if name in DATASET_LOADERS:
            raise DatasetError(f"dataset {name!r} is registered twice")
        DATASET_LOADERS[name] = DatasetSpec(name, load, num_classes, tuple(mean), tuple(std), val_size, sizes, check)
        return load
    return wrap


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASET_LOADERS:
        raise DatasetError(f"data.dataset: {name!r} is not one of {', '.join(DATASET_LOADERS)}")
    return DATASET_LOADERS[name]


def load_splits(cfg: DataConfig) -> Splits:
    """Train (minus the first `val_size` images, the dataset's default when None, capped at `max_train`),
    validation and test of `cfg.dataset`."""
    spec = get_dataset(cfg.dataset)
    train, test = spec.load(Path(cfg.root), cfg.download)
    val_size = spec.val_size if cfg.val_size is None else cfg.val_size
    if val_size >= len(train):
        raise DatasetError(f"data.val_size: {val_size} must be < the {len(train)} training images of "
                           f"{cfg.dataset}")
    val, rest = train.take(slice(0, val_size)), train.take(slice(val_size, None))
    if cfg.max_train:
        rest = rest.take(slice(0, cfg.max_train))
    return Splits(rest, val, test, train.class_names, spec.mean, spec.std)


def check_dataset(cfg: DataConfig) -> None:
    """The files `load_splits(cfg)` reads are in data.root and intact, on this node (missing ones downloaded first
    when data.download allows). The driver runs it before generation or training and every Ray Train worker before
    its first step: a dataset left in a job's working directory, which `ray job submit --working-dir` does not ship
    (data/ is gitignored), or a truncated copy fails at once in one line, not when the generation job reads the test
    set after sampling every shard."""
    try:
        get_dataset(cfg.dataset).check(Path(cfg.root), cfg.download)
    except DatasetError as err:
        shared = " (on a cluster: data.root on the shared root every node mounts)"
        raise DatasetError(f"data.dataset={cfg.dataset} on node {this_node()}: {err}"
                           f"{shared if isinstance(err, DatasetMissing) else ''}") from None


def split_identity(cfg: DataConfig) -> tuple[str, int]:
    """(sha256 of the training split's images and labels as training sees them, its row count): the original
    dataset's content identity in a run's lineage."""
    train = load_splits(cfg).train
    h = hashlib.sha256(np.ascontiguousarray(train.images).data)
    h.update(np.ascontiguousarray(train.labels).data)
    return h.hexdigest(), len(train)


# ---------------------------------------------------------------------------------------------------------------
# Files: official sources, checksummed download, atomic extraction.

@dataclass(frozen=True)
class Remote:
    url: str
    md5: str


REMOTES: dict[str, Remote] = {
    "cifar-10-python.tar.gz": Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                     "c58f30108f718f92721af3b95e74349a"),
    "cifar-100-python.tar.gz": Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                                      "eb9058c3a382ffc7106e4002c42a8d85"),
    "train_32x32.mat": Remote("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                              "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test_32x32.mat": Remote("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                             "eb5a983be6a315427106f1b164e9fef3"),
}


def _fetch(url: str, out: BinaryIO, dest: Path) -> str:
    """Copy `url` into `out`; its md5. A failed transfer (no network, HTTP error, missing file) is one line that
    names the URL and says where to put the file by hand: clusters without internet are common."""
    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as src:
            while block := src.read(1 << 20):
                h.update(block)
                out.write(block)
    except OSError as err:  # urllib.error.URLError and HTTPError are OSErrors, as are socket timeouts
        reason = " ".join(str(getattr(err, "reason", None) or err).split())
        raise DatasetError(f"{url}: download failed ({reason}); fetch it yourself and place {dest.name} in "
                           f"{dest.parent} (data.root)") from None
    return h.hexdigest()


def download_file(url: str, dest: str | os.PathLike, md5: str) -> Path:
    """Fetch `url` to a temp file beside `dest`, check its md5, then rename it into place; no partial file stays."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_umask(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            got = _fetch(url, out, dest)
        if got != md5:
            raise DatasetError(f"{dest.name}: checksum mismatch downloading {url} (expected md5 {md5}, got {got})")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def ensure_file(root: Path, filename: str, download: bool) -> Path:
    """`root/filename`, downloaded first when missing and allowed; else a one-line error naming the path."""
    path = root / filename
    if path.is_file():
        return path
    if not download:
        raise DatasetMissing(f"{path}: dataset file missing; set data.download=true or place {filename} there")
    remote = REMOTES[filename]
    log.info("downloading %s to %s", remote.url, path)
    return download_file(remote.url, path, remote.md5)


def check_placed_archive(path: Path) -> None:
    """An archive the user put in data.root matches its published md5 (when known): a truncated copy or another
    release would otherwise fail deep inside extraction or unpickling, or load silently different images."""
    remote = REMOTES.get(path.name)
    if remote is None:
        return
    got = file_digest(path, "md5")
    if got != remote.md5:
        raise DatasetError(f"{path}: md5 {got} != the published {remote.md5} (truncated or another file); replace "
                           f"it with the original from {remote.url} or delete it and set data.download=true")


def verify_recorded(path: Path) -> None:
    """`check_placed_archive` once per version of a file: a record beside it (`.NAME.md5`: size, mtime and the md5
    it matched) lets later checks, on any node that sees the same file, skip hashing 170 MB (CIFAR) or 245 MB
    (SVHN) again; a file whose size or mtime changed is hashed again. A data.root this process cannot write keeps
    no record (hashed on every check)."""
    remote = REMOTES.get(path.name)
    if remote is None:
        return
    stat = path.stat()
    record, seen = path.with_name(f".{path.name}.md5"), f"{stat.st_size} {stat.st_mtime_ns} {remote.md5}\n"
    with contextlib.suppress(OSError):
        if record.read_text() == seen:
            return
    check_placed_archive(path)
    with contextlib.suppress(OSError):
        atomic_write_text(record, seen)


def archive_check(folder: str, archive: str, members: Sequence[str]) -> Checker:
    """The check of a dataset read from `root/folder`, which the loader extracts from `root/archive` when absent:
    the extracted files when the folder is there (raylab extracts only a verified archive, atomically; it is all
    the loader reads), else the archive, placed or downloaded now, against its published md5."""
    def check(root: Path, download: bool) -> None:
        target = root / folder
        if not target.is_dir():
            verify_recorded(ensure_file(root, archive, download))
            return
        missing = [m for m in members if not (target / m).is_file()]
        if missing:
            raise DatasetMissing(f"{target / missing[0]}: dataset file missing from the extracted folder; delete "
                                 "the folder to re-extract the archive")
    return check


def files_check(*names: str) -> Checker:
    """The check of a dataset read straight from files in root: each there (downloaded now when allowed) and
    matching its published md5."""
    def check(root: Path, download: bool) -> None:
        for name in names:
            verify_recorded(ensure_file(root, name, download))
    return check


def _safe_members(tar: tarfile.TarFile, folder: str) -> list[tarfile.TarInfo]:
    """Only plain files and folders under `folder/`: an archive cannot write outside root or plant links."""
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in parts or parts[:1] != (folder,):
            raise DatasetError(f"{tar.name}: unexpected archive member {m.name!r} (expected files under {folder}/)")
    return members


def ensure_extracted(root: Path, folder: str, archive: str, download: bool) -> Path:
    """`root/folder`, extracted from `root/archive` when missing; extraction goes to a temp dir, then a rename."""
    target = root / folder
    if target.is_dir():
        return target
    placed = (root / archive).is_file()
    path = ensure_file(root, archive, download)
    if placed:  # a downloaded archive was just checked; a placed one is checked here, once, before extracting
        check_placed_archive(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root))
    try:
        with tarfile.open(path, "r:gz") as tar:
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=_safe_members(tar, folder), **extra)
        try:
            os.rename(tmp / folder, target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# CIFAR: Python pickles of dicts with bytes keys, rows of 3072 bytes in CHW order.

_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's own array/scalar rebuilders, whatever its version
_SCALAR = np.int64(0).__reduce__()[0]
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    **{(mod, "_reconstruct"): _RECONSTRUCT for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(mod, "scalar"): _SCALAR for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles from Python 3 spell bytes this way
}


class _ArrayUnpickler(pickle.Unpickler):
    """Pickles are programs; the CIFAR batches only need numpy arrays, so nothing else may be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise DatasetError(f"{self.path}: refusing to unpickle {module}.{name} (only numpy arrays allowed)")
        return _SAFE_GLOBALS[(module, name)]


def read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file missing from the extracted folder; delete the folder to "
                           "re-extract the archive")
    with open(path, "rb") as f:
        unpickler = _ArrayUnpickler(f, encoding="bytes")  # the originals are Python 2 pickles
        unpickler.path = path
        return unpickler.load()


def chw_rows_to_hwc(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) rows of R plane, G plane, B plane (CIFAR layout) -> (N, 32, 32, 3)."""
    return np.ascontiguousarray(np.asarray(rows, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _cifar_set(batches: list[dict], label_key: bytes, class_names: tuple[str, ...]) -> ImageSet:
    images = chw_rows_to_hwc(np.concatenate([b[b"data"] for b in batches]))
    labels = np.concatenate([np.asarray(b[label_key], np.int64) for b in batches])
    return ImageSet(images, labels, class_names)


def _load_cifar(folder: Path, train: list[str], test: str, meta: str, label_key: bytes,
                names_key: bytes) -> tuple[ImageSet, ImageSet]:
    names = tuple(n.decode() for n in read_pickle(folder / meta)[names_key])
    train_set = _cifar_set([read_pickle(folder / f) for f in train], label_key, names)
    return train_set, _cifar_set([read_pickle(folder / test)], label_key, names)


CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


# Normalization constants: per-channel mean/std of the training images in [0, 1] (the values used across the
# robustness literature, e.g. Rebuffi et al. 2021 and the Wang et al. 2023 code).
@register_dataset("cifar10", num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616),
                  sizes=(50_000, 10_000), check=archive_check("cifar-10-batches-py", "cifar-10-python.tar.gz",
                                                              [*CIFAR10_TRAIN, "test_batch", "batches.meta"]))
def load_cifar10(root: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    folder = ensure_extracted(root, "cifar-10-batches-py", "cifar-10-python.tar.gz", download)
    return _load_cifar(folder, CIFAR10_TRAIN, "test_batch", "batches.meta", b"labels", b"label_names")


@register_dataset("cifar100", num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                  sizes=(50_000, 10_000), check=archive_check("cifar-100-python", "cifar-100-python.tar.gz",
                                                              ["train", "test", "meta"]))
def load_cifar100(root: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    folder = ensure_extracted(root, "cifar-100-python", "cifar-100-python.tar.gz", download)
    return _load_cifar(folder, ["train"], "test", "meta", b"fine_labels", b"fine_label_names")


# ---------------------------------------------------------------------------------------------------------------
# SVHN: MATLAB v5 files, X (32, 32, 3, N) uint8 and y (N, 1) with 10 standing for the digit 0.

DIGIT_NAMES = tuple(str(d) for d in range(10))


def _svhn_set(path: Path) -> ImageSet:
    import scipy.io  # only SVHN needs it

    mat = scipy.io.loadmat(path)
    images = np.ascontiguousarray(np.asarray(mat["X"], np.uint8).transpose(3, 0, 1, 2))
    labels = np.asarray(mat["y"], np.int64).reshape(-1) % 10  # label 10 is the digit 0
    return ImageSet(images, labels, DIGIT_NAMES)


# SVHN: 0.5/0.5, the convention of the SVHN robustness papers (Gowal et al. 2020), not measured statistics.
@register_dataset("svhn", num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), sizes=(73_257, 26_032),
                  check=files_check("train_32x32.mat", "test_32x32.mat"))
def load_svhn(root: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    return tuple(_svhn_set(ensure_file(root, f"{split}_32x32.mat", download)) for split in ("train", "test"))


# ---------------------------------------------------------------------------------------------------------------
# digits: scikit-learn's 1797 handwritten digits (8×8, values 0..16), the embedded offline default.

DIGITS_TEST_PER_CLASS = 30  # 300 test images, exactly balanced; 1497 remain for train + validation
DIGITS_SEED = 0


def render_digits(images8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) in 0..16 -> (N, 32, 32, 3) uint8.

    Bilinear upsampling to 28×28 then a 2-pixel zero border, the way MNIST's 28×28 digits sit in 32×32 inputs
    (LeCun et al. 1998): strokes stay smooth instead of blocky, and a border lets crop augmentation shift without
    cutting strokes. Gray is copied to three channels so every model sees the CIFAR input shape.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(images8, np.float32) * (255.0 / 16.0)).unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = F.pad(x, (2, 2, 2, 2)).round().clamp(0, 255).to(torch.uint8)  # (N, 1, 32, 32)
    return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1).repeat(3, axis=3))


def digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a fixed shuffle, of which the first 30 of each class are the test set.

    `RandomState` because its stream is frozen by numpy's compatibility policy, so the split never changes.
    Train rows are shuffled again: taking the test rows out of the front skews what is left there towards the
    classes that filled their quota first, and the validation set is the front of train.
    """
    rng = np.random.RandomState(DIGITS_SEED)
    order = rng.permutation(len(labels))
    rank = np.zeros(len(labels), np.int64)  # position of each row among the rows of its class, in shuffled order
    for c in np.unique(labels):
        rows = order[labels[order] == c]
        rank[rows] = np.arange(len(rows))
    is_test = rank[order] < DIGITS_TEST_PER_CLASS
    return rng.permutation(order[~is_test]), order[is_test]


# mean/std: `digits_statistics()` over all 1497 training images, validation prefix included, rounded to 4
# decimals (gray, so the three channels agree); a test recomputes them.
# val_size 128: 1024 would leave 473 of the 1497 training images (the tiny preset's value).
@register_dataset("digits", num_classes=10, mean=(0.2339, 0.2339, 0.2339), std=(0.3124, 0.3124, 0.3124),
                  val_size=128, sizes=(1497, 300))
def load_digits(root: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits as sklearn_digits  # ships inside scikit-learn: no file, no network

    raw = sklearn_digits()
    images, labels = render_digits(raw.images), np.asarray(raw.target, np.int64)
    train, test = digits_split(labels)
    return (ImageSet(images[train], labels[train], DIGIT_NAMES), ImageSet(images[test], labels[test], DIGIT_NAMES))


def digits_statistics() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of the digits training images (how the constants above were made)."""
    x = load_digits(Path("."), False)[0].images.astype(np.float64) / 255.0
    return tuple(map(float, x.mean(axis=(0, 1, 2)))), tuple(map(float, x.std(axis=(0, 1, 2))))
