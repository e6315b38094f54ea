"""Image mosaics, the one grid helper of raylab: the EDM sample PNGs (raylab.generate.sample_local) and the
report figures (raylab.tracking.plots) both tile with it."""
from __future__ import annotations

import numpy as np


def tile(images: np.ndarray, per_row: int, pad: int = 2, error: type[Exception] = ValueError) -> np.ndarray:
    """uint8 NHWC (1 or 3 channels) → one HWC mosaic, `per_row` images per row (fewer columns when there are
    fewer images), `pad` white pixels around each; missing tiles are white. Bad input raises `error`."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3) or not len(images):
        raise error(f"image grid: expected a non-empty uint8 NHWC array with 1 or 3 channels, got "
                    f"{images.dtype} {tuple(images.shape)}")
    if per_row < 1:
        raise error(f"image grid: per_row={per_row} must be >= 1")
    n, h, w, c = images.shape
    cols, rows = min(per_row, n), -(-n // per_row)
    canvas = np.full((rows * cols, h + pad, w + pad, c), 255, np.uint8)
    canvas[:n, :h, :w] = images
    mosaic = canvas.reshape(rows, cols, h + pad, w + pad, c).transpose(0, 2, 1, 3, 4)
    mosaic = mosaic.reshape(rows * (h + pad), cols * (w + pad), c)
    return np.pad(mosaic, ((pad, 0), (pad, 0), (0, 0)), constant_values=255)
