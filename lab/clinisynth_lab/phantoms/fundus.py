"""Fundus-photograph-like RGB phantoms with lesions and paired healthy / diseased renders.

Why: the counterfactual method (docs/METHODS.md §4) edits a real fundus image toward "healthy" or
"diseased" and is judged by whether it changed the lesions and nothing else. That needs ground
truth no real data set has: the SAME eye rendered with and without lesions. Here the anatomy
(vessel tree, optic disc, macula, pigmentation, camera exposure and sensor noise) is a pure
function of a ``patient_id``; lesions are drawn on top from a separate ``lesion_seed``, so
:func:`render_pair` returns two images that differ only inside the returned lesion mask.

Lesions (diabetic-retinopathy-like): microaneurysms (small dark red dots), dot hemorrhages
(larger dark red blots) and hard exudates (yellow clusters), placed in the posterior pole. The
binary label is 0 healthy / 1 any lesion; the mask marks pixels whose lesion coverage is
>= :data:`MASK_COVERAGE` (every pixel that differs from the healthy render is within one pixel
of the mask). Default 64x64; lengths scale with size.
"""

from __future__ import annotations

import math

import numpy as np

from clinisynth_lab.phantoms._common import (
    check_count,
    check_size,
    draw_disks,
    draw_polylines,
    to_uint8,
    unit_noise,
)
from clinisynth_server.errors import InvalidArgument

DEFAULT_SIZE = 64
MIN_SIZE = 32
LABELS: tuple[str, ...] = ("healthy", "lesion")
LESION_KINDS: tuple[str, ...] = ("microaneurysm", "hemorrhage", "hard_exudate")
MASK_COVERAGE = 0.3


def patient_ids(n: int, seed: int) -> np.ndarray:
    """The patient ids :func:`generate` uses for a batch (63-bit ints, derived from seed)."""
    n = check_count(n)
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, 0xF0D05])
    return (ss.generate_state(max(n, 1), np.uint64)[:n] >> np.uint64(1)).astype(np.int64)


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    length: float,
    step: float,
    wiggle: float,
) -> np.ndarray:
    n = max(2, int(length / step))
    pts = [start]
    h = heading
    for _ in range(n):
        h += rng.normal(0.0, wiggle)
        pts.append(pts[-1] + step * np.array([math.cos(h), math.sin(h)]))
    return np.array(pts)


def _anatomy(patient_id: int, size: int) -> tuple[np.ndarray, dict[str, float]]:
    """Healthy eye (float RGB [H, W, 3], before noise) and landmarks, from the patient id."""
    rng = np.random.default_rng([int(patient_id) & 0x7FFFFFFFFFFFFFFF, 0xE7E])
    px = 2.0 / size
    lin = (np.arange(size) + 0.5) * px - 1.0
    Y, X = np.meshgrid(lin, lin, indexing="ij")

    def to_px(p: np.ndarray) -> np.ndarray:
        return (p + 1.0) / px - 0.5

    side = 1 if rng.random() < 0.5 else -1  # +1: disc on the image right (right eye)
    rd = rng.uniform(0.13, 0.155)
    dx, dy = side * rng.uniform(0.36, 0.44), rng.uniform(-0.06, 0.06)
    mx, my = dx - side * rng.uniform(0.52, 0.6), dy + rng.uniform(0.0, 0.06)
    radius = rng.uniform(0.93, 0.98)

    base = np.array([rng.uniform(0.7, 0.85), rng.uniform(0.28, 0.38), rng.uniform(0.1, 0.16)])
    r2 = X**2 + Y**2
    vignette = 1.0 - rng.uniform(0.25, 0.4) * r2
    tex = 0.035 * unit_noise(rng, (size, size), 2.5 * size / 64)
    img = base[None, None, :] * (vignette + tex)[..., None]
    macula = np.exp(-((X - mx) ** 2 + (Y - my) ** 2) / (2 * rng.uniform(0.1, 0.14) ** 2))
    img = img * (1.0 - 0.3 * macula)[..., None]
    fovea = np.exp(-((X - mx) ** 2 + (Y - my) ** 2) / (2 * 0.03**2))
    img = img * (1.0 - 0.15 * fovea)[..., None]

    # optic disc with a brighter cup
    dd = np.hypot(X - dx, Y - dy)
    disc = np.clip(0.5 + (rd - dd) / px, 0, 1) * 0.7 + 0.3 * np.exp(
        -(dd**2) / (2 * (rd * 0.9) ** 2)
    )
    disc_col = np.array([0.98, rng.uniform(0.78, 0.86), rng.uniform(0.5, 0.6)])
    img = img * (1 - disc[..., None]) + disc_col * disc[..., None]
    cup = np.exp(-(((X - dx - side * 0.15 * rd) ** 2 + (Y - dy) ** 2) / (2 * (0.4 * rd) ** 2)))
    img = img + 0.06 * cup[..., None]

    # vessels: two temporal arcades (artery + vein each) around the macula, nasal branches
    s64 = size / 64.0
    veins: list[tuple[np.ndarray, float]] = []
    arteries: list[tuple[np.ndarray, float]] = []
    disc_c = np.array([dx, dy])
    for up in (-1, 1):
        for kind, store, width in (("v", veins, 1.7), ("a", arteries, 1.25)):
            rx = rng.uniform(0.42, 0.5) + (0.03 if kind == "a" else 0.0)
            ry = rng.uniform(0.3, 0.38) + (0.02 if kind == "a" else 0.0)
            phis = np.linspace(
                np.deg2rad(rng.uniform(15, 30)), np.deg2rad(rng.uniform(115, 145)), 14
            )
            # the arc opens up temporally (radius grows) so the two arcades never meet
            grow = 1.0 + rng.uniform(0.25, 0.45) * (phis - phis[0]) / (phis[-1] - phis[0])
            arc = np.stack(
                [mx + side * rx * np.cos(phis) * grow, my + up * ry * np.sin(phis) * grow], axis=1
            )
            arc[:, 0] += np.cumsum(rng.normal(0, 0.008, len(phis)))
            arc[:, 1] += np.cumsum(rng.normal(0, 0.008, len(phis)))
            path = np.vstack([disc_c + rng.normal(0, 0.01, 2), arc])
            store.append((to_px(path[:9]), width * s64))  # proximal, thick
            store.append((to_px(path[8:]), width * 0.7 * s64))  # distal, tapering
            for _ in range(int(rng.integers(3, 6))):
                j = int(rng.integers(2, len(path) - 1))
                direction = path[j] - np.array([mx, my])
                h = math.atan2(direction[1], direction[0]) + rng.uniform(-0.6, 0.6)
                if rng.random() < 0.35:  # small branch toward the macula, stops short of it
                    h += math.pi
                    length = rng.uniform(0.1, 0.18)
                else:
                    length = rng.uniform(0.15, 0.35)
                twig = _walk(rng, path[j], h, length, 0.04, 0.2)
                store.append((to_px(twig), width * 0.6 * s64))
        for store, width in ((veins, 1.3), (arteries, 1.0)):
            h = math.atan2(up * rng.uniform(0.5, 1.2), side * 1.0)
            twig = _walk(rng, disc_c, h, rng.uniform(0.35, 0.55), 0.05, 0.15)
            store.append((to_px(twig), width * s64))
    vein_a = draw_polylines(size, veins)
    art_a = draw_polylines(size, arteries)
    vein_col = np.array([0.5, 0.1, 0.07]) * rng.uniform(0.9, 1.1)
    art_col = np.array([0.7, 0.2, 0.1]) * rng.uniform(0.9, 1.1)
    img = img * (1 - vein_a[..., None]) + vein_col * vein_a[..., None]
    img = img * (1 - art_a[..., None]) + art_col * art_a[..., None]

    fov = np.clip(0.5 + (radius - np.sqrt(r2)) / px, 0, 1)
    img = img * fov[..., None]
    gain = rng.uniform(0.85, 1.1)
    landmarks = {
        "side": float(side),
        "disc_x": dx,
        "disc_y": dy,
        "disc_r": rd,
        "macula_x": mx,
        "macula_y": my,
        "radius": radius,
        "gain": gain,
        "noise_seed": float(rng.integers(0, 2**31 - 1)),
    }
    return img * gain, landmarks


def _lesions(
    size: int, lm: dict[str, float], lesion_seed: int, patient_id: int
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(kind, coverage [H, W], RGB colour) layers for the lesions of one (patient, seed)."""
    rng = np.random.default_rng([int(patient_id) & 0x7FFFFFFFFFFFFFFF, int(lesion_seed), 0x1E5])
    s64 = size / 64.0
    px = 2.0 / size

    def place(k: int) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        while len(out) < k:
            r = 0.55 * math.sqrt(rng.random())
            a = rng.uniform(0, 2 * np.pi)
            x, y = lm["macula_x"] + r * math.cos(a), lm["macula_y"] + r * math.sin(a)
            if math.hypot(x - lm["disc_x"], y - lm["disc_y"]) < lm["disc_r"] + 0.08:
                continue
            if math.hypot(x, y) > lm["radius"] - 0.12:
                continue
            out.append((x, y))
        return out

    def disks(centres: list[tuple[float, float]], rlo: float, rhi: float) -> np.ndarray:
        d = [
            ((x + 1) / px - 0.5, (y + 1) / px - 0.5, rng.uniform(rlo, rhi) * s64)
            for x, y in centres
        ]
        return draw_disks(size, d)

    n_ma = int(rng.integers(1, 6))
    n_hem = int(rng.integers(0, 3))
    n_clusters = int(rng.integers(0, 3))
    if n_ma + n_hem + n_clusters < 2:
        n_clusters += 1
    layers = []
    if n_ma:
        layers.append(
            ("microaneurysm", disks(place(n_ma), 0.9, 1.25), np.array([0.42, 0.05, 0.04]))
        )
    if n_hem:
        layers.append(("hemorrhage", disks(place(n_hem), 1.6, 2.4), np.array([0.48, 0.07, 0.05])))
    if n_clusters:
        centres = []
        for cx, cy in place(n_clusters):
            for _ in range(int(rng.integers(2, 6))):
                centres.append((cx + rng.normal(0, 0.04), cy + rng.normal(0, 0.04)))
        layers.append(("hard_exudate", disks(centres, 0.9, 1.5), np.array([0.95, 0.86, 0.42])))
    return layers


def render_patient(
    patient_id: int,
    *,
    size: int = DEFAULT_SIZE,
    lesions: bool = False,
    lesion_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One eye: RGB uint8 [size, size, 3] and its lesion mask bool [size, size].

    The anatomy and noise depend on ``patient_id`` only; with ``lesions`` the lesion layers
    from ``lesion_seed`` are drawn on top, so pixels outside the mask's 1-px neighbourhood are
    byte-identical to the healthy render.
    """
    size = check_size(size, MIN_SIZE)
    img, lm = _anatomy(int(patient_id), size)
    mask = np.zeros((size, size), dtype=bool)
    if lesions:
        for _kind, cov, col in _lesions(size, lm, lesion_seed, int(patient_id)):
            img = img * (1 - cov[..., None]) + col * lm["gain"] * cov[..., None]
            mask |= cov >= MASK_COVERAGE
    noise = np.random.default_rng(int(lm["noise_seed"])).normal(0, 0.012, img.shape)
    return to_uint8(np.clip(img + noise, 0, 1), 255.0), mask


def render_pair(
    patient_id: int, *, size: int = DEFAULT_SIZE, lesion_seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same eye healthy and with lesions: (healthy, lesioned, mask) — counterfactual truth."""
    healthy, _ = render_patient(patient_id, size=size, lesions=False)
    diseased, mask = render_patient(patient_id, size=size, lesions=True, lesion_seed=lesion_seed)
    return healthy, diseased, mask


def generate(
    n: int,
    *,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    lesion_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` eyes of distinct patients: images uint8 [n, H, W, 3], labels int64 (0 healthy /
    1 lesion), lesion masks bool [n, H, W].

    Exactly ``round(n * lesion_fraction)`` images have lesions. Image ``i`` equals
    ``render_patient(patient_ids(n, seed)[i], lesions=bool(labels[i]), lesion_seed=seed)``.
    """
    n = check_count(n)
    size = check_size(size, MIN_SIZE)
    if not (0.0 <= float(lesion_fraction) <= 1.0):
        raise InvalidArgument.for_field("lesion_fraction", "must be in [0, 1]")
    k = round(n * float(lesion_fraction))
    order = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0x1AB]).permutation(n)
    labels = np.zeros(n, dtype=np.int64)
    labels[order[:k]] = 1
    ids = patient_ids(n, seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        images[i], masks[i] = render_patient(
            int(ids[i]), size=size, lesions=bool(labels[i]), lesion_seed=seed
        )
    return images, labels, masks
