"""B-mode-ultrasound-frame-like phantoms: a fan-shaped sector of speckle on black.

Why: the out-of-domain guard (docs/METHODS.md "Out-of-domain guard") must refuse an ultrasound
frame sent to a model trained on another modality. These frames have the look that sets the
modality apart: a sector fanning out from a probe apex at the top, fully developed speckle
(Rayleigh-distributed, smoothed along the beam), depth attenuation with time-gain compensation,
a bright tissue interface and a few anechoic (dark) structures such as vessels or cysts. Not
anatomically faithful. Default 64x64.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from clinisynth_lab.phantoms._common import check_count, check_size, item_rng, to_uint8

DEFAULT_SIZE = 64
MIN_SIZE = 32
_STREAM = 0x05


def render(seed: int, index: int = 0, *, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One frame, uint8 ``[size, size]``; a pure function of ``(seed, index, size)``."""
    size = check_size(size, MIN_SIZE)
    rng = item_rng(seed, index, _STREAM)
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    ay, ax = -0.05 * s, s * rng.uniform(0.46, 0.54)  # probe apex, just above the frame
    radius = np.hypot(yy - ay, xx - ax)
    theta = np.arctan2(xx - ax, yy - ay)  # 0 straight down
    half = np.deg2rad(rng.uniform(32.0, 42.0))
    near, far = 0.12 * s, s * rng.uniform(0.95, 1.05)
    sector = (np.abs(theta) <= half) & (radius >= near) & (radius <= far)
    # Speckle: the magnitude of complex Gaussian scatter (Rayleigh), blurred along the beam.
    scatter = np.hypot(rng.standard_normal((size, size)), rng.standard_normal((size, size)))
    speckle = ndimage.gaussian_filter(scatter, (1.1, 0.5)) / 1.25
    depth = (radius - near) / (far - near)
    echo = 0.55 * np.exp(-1.2 * depth) + 0.15  # attenuation after time-gain compensation
    img = echo * speckle
    # A bright curved interface (fascia) across the sector.
    interface = np.abs(radius - s * rng.uniform(0.35, 0.5)) < 0.02 * s
    img[interface] += 0.45
    # Anechoic structures: dark discs with a faint bright back wall.
    for _ in range(int(rng.integers(1, 4))):
        r0, t0 = s * rng.uniform(0.45, 0.85), rng.uniform(-0.6, 0.6) * half
        cy, cx = ay + r0 * np.cos(t0), ax + r0 * np.sin(t0)
        rr = s * rng.uniform(0.05, 0.1)
        d = np.hypot(yy - cy, xx - cx)
        img[d < rr] *= 0.08
        img[(d >= rr) & (d < rr + 0.025 * s) & (yy > cy)] += 0.25
    img = np.where(sector, np.clip(img, 0.0, 1.0), 0.0)
    return to_uint8(img, 255.0)


def generate(n: int, *, seed: int = 0, size: int = DEFAULT_SIZE) -> np.ndarray:
    """``n`` frames, uint8 ``[n, size, size]``; frame ``i`` is ``render(seed, i, size=size)``."""
    n = check_count(n)
    if not n:
        return np.zeros((0, size, size), np.uint8)
    return np.stack([render(seed, i, size=size) for i in range(n)])
