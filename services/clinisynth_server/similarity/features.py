"""The fixed feature extractor behind the memorization gate and the out-of-domain guard.

Two views of an image, both deterministic, weight-free and identical on every machine (numpy and
PIL only, float64 inside), so an index built at training compares with images scored years later:

- :func:`thumbnails` — pixel space: the grayscale image box-filtered to ``THUMB`` × ``THUMB``,
  zero mean, unit norm. Two images are near-copies when their thumbnails are close; brightness and
  contrast shifts do not hide a copy. For the small images this project trains on (32–64 px) this
  is nearly the image itself.
- :func:`embed` — appearance: intensity and gradient histograms, a radial power spectrum, a coarse
  layout and colour statistics, each block unit-norm, weighted, concatenated and unit-norm. It
  separates acquisition domains (a colour fundus photograph, a CT slice, an ultrasound sector) and
  is what the domain score measures.

Both take ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1 or 3) floats in [0, 1] and return ``[N, D]``
float32 rows; distances between rows are Euclidean, in [0, 2].
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Recorded in every index: an index built by another extractor version is refused, not compared.
EXTRACTOR = "clinisynth-features-v1"
THUMB = 16
_WORK = 64  # the side every image is resampled to before the appearance features
_HIST_BINS = 16
_GRAD_BINS = 16
_SPECTRUM_BANDS = 12
_LAYOUT = 8
#: Block weights of :func:`embed` (intensity, gradients, spectrum, layout, colour).
_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)


def as_batch(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, C]`` float64 in [0, 1] from ``[H, W]``, ``[N, H, W]`` or ``[N, H, W, C]``."""
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {arr.shape}")
    if arr.shape[-1] == 4:  # RGBA: alpha carries no anatomy
        arr = arr[..., :3]
    return np.clip(arr, 0.0, 1.0)


def _gray(batch: np.ndarray) -> np.ndarray:
    if batch.shape[-1] == 1:
        return batch[..., 0]
    return batch @ np.array([0.299, 0.587, 0.114])


def _resize(gray: np.ndarray, side: int) -> np.ndarray:
    """Box-filtered resize of one ``[H, W]`` image (PIL in float mode: exact and portable)."""
    if gray.shape == (side, side):
        return gray
    img = Image.fromarray(gray.astype(np.float32), mode="F")
    return np.asarray(img.resize((side, side), Image.Resampling.BOX), dtype=np.float64)


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 1e-12)


def thumbnails(images: np.ndarray, size: int = THUMB) -> np.ndarray:
    """Zero-mean, unit-norm grayscale thumbnails, ``[N, size²]`` float32 (a flat image is 0)."""
    gray = _gray(as_batch(images))
    rows = np.stack([_resize(g, size).ravel() for g in gray])
    rows -= rows.mean(axis=1, keepdims=True)
    return _unit(rows).astype(np.float32)


def _spectrum_bands(side: int) -> np.ndarray:
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.rfftfreq(side), indexing="ij")
    radius = np.hypot(fy, fx)
    edges = np.geomspace(1.0 / side, 0.5 * np.sqrt(2) + 1e-9, _SPECTRUM_BANDS + 1)
    return np.digitize(radius, edges) - 1  # -1 = the DC term, dropped


_BANDS = _spectrum_bands(_WORK)


def _appearance(gray: np.ndarray, rgb: np.ndarray) -> list[np.ndarray]:
    g = _resize(gray, _WORK)
    hist = np.histogram(g, bins=_HIST_BINS, range=(0.0, 1.0))[0].astype(np.float64)
    gy, gx = np.gradient(g)
    mag = np.hypot(gx, gy)
    grad = np.histogram(np.minimum(mag, 0.5), bins=_GRAD_BINS, range=(0.0, 0.5))[0]
    power = np.abs(np.fft.rfft2(g - g.mean())) ** 2
    bands = np.array([power[b == _BANDS].mean() for b in range(_SPECTRUM_BANDS)])
    spectrum = np.log1p(bands * 1e3)
    spectrum -= spectrum.mean()
    layout = _resize(g, _LAYOUT).ravel()
    layout -= layout.mean()
    flat = rgb.reshape(-1, rgb.shape[-1])
    if flat.shape[1] == 1:
        flat = np.repeat(flat, 3, axis=1)
    saturation = flat.max(axis=1) - flat.min(axis=1)
    colour = np.concatenate([flat.mean(axis=0), flat.std(axis=0), [saturation.mean()]])
    # Histograms as square roots of frequencies (Hellinger geometry); every block unit-norm below.
    return [np.sqrt(hist / hist.sum()), np.sqrt(grad / grad.sum()), spectrum, layout, colour]


def embed(images: np.ndarray) -> np.ndarray:
    """Appearance embeddings, ``[N, D]`` float32, unit norm (see the module docstring)."""
    batch = as_batch(images)
    gray = _gray(batch)
    rows = []
    for g, rgb in zip(gray, batch, strict=True):
        blocks = _appearance(g, rgb)
        rows.append(
            np.concatenate([w * _unit(b[None])[0] for w, b in zip(_WEIGHTS, blocks, strict=True)])
        )
    return _unit(np.stack(rows)).astype(np.float32)


def dimensions() -> tuple[int, int]:
    """(embedding size, thumbnail size) of this extractor version."""
    return embed(np.zeros((1, 8, 8))).shape[1], THUMB * THUMB
