"""Axial CT-slice-like phantoms (bone window): a grey body, a bright bone ring, darker organs.

Why: the out-of-domain guard (docs/METHODS.md "Out-of-domain guard") must refuse a CT slice sent
to a model trained on another modality (a fundus photograph model, a cytology reward model). These
slices are that foreign input: grayscale, a dark air background around an elliptical body, a
bright ring of ribs and a vertebra, two dark lungs and a mid-grey mediastinum, with quantum-like
noise and a patient table. They are not anatomically faithful; they only need the look — the
intensity layout, edges and texture — of a CT slice. Default 64x64.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from clinisynth_lab.phantoms._common import check_count, check_size, item_rng, to_uint8

DEFAULT_SIZE = 64
MIN_SIZE = 32
_STREAM = 0xC7


def _inside(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    return np.asarray(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)


def render(seed: int, index: int = 0, *, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One slice, uint8 ``[size, size]``; a pure function of ``(seed, index, size)``."""
    size = check_size(size, MIN_SIZE)
    rng = item_rng(seed, index, _STREAM)
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = s * rng.uniform(0.47, 0.53), s * rng.uniform(0.47, 0.53)
    ry, rx = s * rng.uniform(0.30, 0.36), s * rng.uniform(0.40, 0.46)
    img = np.full((size, size), 0.02)
    body = _inside(yy, xx, cy, cx, ry, rx)
    img[body] = rng.uniform(0.42, 0.5)  # soft tissue
    # Lungs: two dark ellipses either side of the mediastinum.
    for side in (-1.0, 1.0):
        lung = _inside(
            yy, xx, cy - 0.05 * ry, cx + side * 0.45 * rx, 0.7 * ry, rng.uniform(0.3, 0.38) * rx
        )
        img[lung & body] = rng.uniform(0.06, 0.12)
    heart = _inside(yy, xx, cy + 0.05 * ry, cx + 0.1 * rx, 0.4 * ry, 0.28 * rx)
    img[heart] = rng.uniform(0.36, 0.42)
    # Bone: a ring of ribs just inside the skin, a vertebra behind the heart.
    ring = _inside(yy, xx, cy, cx, 0.92 * ry, 0.93 * rx) & ~_inside(
        yy, xx, cy, cx, 0.84 * ry, 0.86 * rx
    )
    angle = np.arctan2(yy - cy, xx - cx)
    ribs = np.cos(angle * rng.integers(9, 14)) > -0.2
    img[ring & ribs] = rng.uniform(0.9, 1.0)
    vertebra = _inside(yy, xx, cy + 0.7 * ry, cx, 0.16 * ry, 0.12 * rx)
    img[vertebra] = 0.95
    # Patient table below the body.
    table = (yy > cy + ry + 0.04 * s) & (yy < cy + ry + 0.08 * s) & (np.abs(xx - cx) < 0.45 * s)
    img[table] = 0.55
    img = ndimage.gaussian_filter(img, 0.6)
    img += rng.normal(0.0, 0.035, img.shape) * (img > 0.05)
    return to_uint8(np.clip(img, 0.0, 1.0), 255.0)


def generate(n: int, *, seed: int = 0, size: int = DEFAULT_SIZE) -> np.ndarray:
    """``n`` slices, uint8 ``[n, size, size]``; slice ``i`` is ``render(seed, i, size=size)``."""
    n = check_count(n)
    if not n:
        return np.zeros((0, size, size), np.uint8)
    return np.stack([render(seed, i, size=size) for i in range(n)])
