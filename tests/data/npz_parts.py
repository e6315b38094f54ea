"""Reference-format `.npz` parts of any size in almost no disk: `np.savez` layout (a zip64 of stored `.npy`
members), every image all zeros, the image bytes a hole of a sparse file (tests at >= 2M rows, and
bench/bench_data_50m.py at the reference's 50M in 4 parts: 154 GB apparent, a few MB on disk)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

_MASK = 0xFFFFFFFF


def _apply(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector, i = vector >> 1, i + 1
    return out


def crc32_zeros(crc: int, n: int) -> int:
    """zlib.crc32 of `n` zero bytes appended to data whose crc32 is `crc`. The CRC register's update by a zero
    byte is linear over GF(2); its n-th power is composed by squaring (columns taken from zlib itself)."""
    power = [(~zlib.crc32(b"\0", ~(1 << i) & _MASK)) & _MASK for i in range(32)]
    register = ~crc & _MASK
    while n:
        if n & 1:
            register = _apply(power, register)
        power = [_apply(power, column) for column in power]
        n >>= 1
    return ~register & _MASK


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": npy_format.dtype_to_descr(np.dtype(dtype)),
                                            "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _local_header(name: bytes, crc: int, size: int) -> bytes:
    extra = struct.pack("<HHQQ", 1, 16, size, size)  # zip64: uncompressed, compressed
    return struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0, 0, 0, 0, crc, _MASK, _MASK, len(name), len(extra)) \
        + name + extra


def _central_entry(name: bytes, crc: int, size: int, offset: int) -> bytes:
    extra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
    return struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, 0, 0, 0, 0, crc, _MASK, _MASK, len(name),
                       len(extra), 0, 0, 0, 0, _MASK) + name + extra


def write_constant_npz(path: str | Path, labels: np.ndarray) -> Path:
    """An uncompressed .npz with `image` uint8 (N,32,32,3) all zeros (a hole: not written) and `label` int64."""
    path, labels = Path(path), np.asarray(labels, np.int64)
    n = len(labels)
    members = []
    with open(path, "wb") as f:
        image_head = _npy_header((n, 32, 32, 3), np.uint8)
        image_size = len(image_head) + n * 3072
        members.append((b"image.npy", crc32_zeros(zlib.crc32(image_head), n * 3072), image_size, f.tell()))
        f.write(_local_header(members[-1][0], members[-1][1], image_size) + image_head)
        f.seek(n * 3072, 1)
        label_data = _npy_header((n,), np.int64) + labels.tobytes()
        members.append((b"label.npy", zlib.crc32(label_data), len(label_data), f.tell()))
        f.write(_local_header(members[-1][0], members[-1][1], len(label_data)) + label_data)
        directory = f.tell()
        central = b"".join(_central_entry(*m) for m in members)
        f.write(central)
        end64 = f.tell()
        f.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, len(members), len(members),
                            len(central), directory))
        f.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, end64, 1))
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, _MASK, _MASK, 0))
    return path
