"""Atomic file writes and content hashes: partial outputs are never visible as complete."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import filelock


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def mkstemp_umask(prefix: str, suffix: str, dir: str | os.PathLike) -> tuple[int, str]:
    """`tempfile.mkstemp`, but the file gets the mode of any file the user creates (0666 minus the umask), not
    0600: renamed into place on a cluster's shared root, the team reads the shards, manifests and checkpoints."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a hidden temp file beside `path`, fsync it, then rename it into place (the file
    follows the umask: `mkstemp_umask`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_umask(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (shards, checkpoints and archives can be large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, busy: Optional[Exception] = None) -> Iterator[None]:
    """An exclusive lock on `path` (a small lock file) for the duration of the block, the one file lock of raylab
    (the `filelock` package, installed with torch): waits for it, or, given `busy`, raises that at once when
    another holder has it (also a second lock object on the same file in this process)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), is_singleton=False)
    try:
        lock.acquire(timeout=0 if busy is not None else -1)
    except filelock.Timeout:
        raise busy from None
    try:
        yield
    finally:
        lock.release()
