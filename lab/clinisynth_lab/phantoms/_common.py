"""Helpers shared by the phantom generators: seeding, argument checks, anti-aliased drawing.

Every generator derives one independent ``numpy.random.Generator`` per item from
``(seed, index)`` so item ``i`` of a batch does not depend on the batch size: ``generate(10)``
is a prefix of ``generate(100)`` for the same seed (only the label permutation differs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from clinisynth_server.errors import InvalidArgument

MAX_BATCH = 1_000_000


def item_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """An independent generator for item ``index`` of a batch seeded with ``seed``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index), int(stream)])


def check_count(n: int, field: str = "n") -> int:
    """Validate a batch size: a non-negative int no larger than :data:`MAX_BATCH`."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 or n > MAX_BATCH:
        raise InvalidArgument.for_field(field, f"must be an int in [0, {MAX_BATCH}], got {n!r}")
    return int(n)


def check_size(size: int, minimum: int, field: str = "size") -> int:
    """Validate an image side length in pixels (square images only)."""
    if (
        isinstance(size, bool)
        or not isinstance(size, (int, np.integer))
        or not (minimum <= size <= 1024)
    ):
        raise InvalidArgument.for_field(field, f"must be an int in [{minimum}, 1024], got {size!r}")
    return int(size)


def balanced_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels whose class counts differ by at most one, in random order."""
    return rng.permutation(np.arange(n, dtype=np.int64) % n_classes)


def soft(d: np.ndarray | float) -> np.ndarray:
    """Pixel coverage from a signed distance in pixels (positive inside): a 1-px linear ramp."""
    return np.clip(np.asarray(d, dtype=np.float64) + 0.5, 0.0, 1.0)


def unit_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation (a texture field)."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    std = float(field.std())
    return field / std if std > 0 else field


def draw_polylines(
    size: int,
    lines: Sequence[tuple[np.ndarray, float]],
    *,
    supersample: int = 4,
) -> np.ndarray:
    """Anti-aliased coverage [0, 1] of polylines given in pixel coordinates with widths in px.

    PIL draws at ``supersample`` x resolution and the result is box-filtered down, which is
    an order of magnitude faster than evaluating per-pixel distances to every segment.
    """
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for points, width in lines:
        pts = ((np.asarray(points, dtype=np.float64) + 0.5) * supersample).ravel().tolist()
        w = max(1, round(width * supersample))
        draw.line(pts, fill=255, width=w)  # no round joints: ~5x faster, notches are sub-pixel
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def draw_disks(
    size: int,
    disks: Sequence[tuple[float, float, float]],
    *,
    values: Sequence[float] | np.ndarray | None = None,
    supersample: int = 4,
) -> np.ndarray:
    """Anti-aliased coverage [0, 1] of disks ``(x, y, radius)`` in pixel coordinates.

    With ``values`` (each in [0, 1]) every disk is painted at its own level instead of 1;
    later disks overwrite earlier ones, so overlaps never accumulate.
    """
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for i, (x, y, r) in enumerate(disks):
        cx, cy, rr = (x + 0.5) * supersample, (y + 0.5) * supersample, r * supersample
        fill = 255 if values is None else round(255 * min(1.0, max(0.0, float(values[i]))))
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=fill)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def to_uint8(img: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Round and clip a float image (``img * scale``) to uint8."""
    return np.clip(np.rint(img * scale), 0, 255).astype(np.uint8)
