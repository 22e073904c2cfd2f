"""Class-conditional cytology-like cell phantoms with a clinical-plausibility oracle.

Why: the expert-feedback method (docs/METHODS.md §1) needs a class-conditional generator, experts
who judge plausibility against a checklist, and a reward model. Offline we have no bone-marrow
images and no pathologists, so this module supplies both: procedural grayscale cells whose type is
set by nucleus count / shape / size and cytoplasm texture, and :func:`oracle`, a deterministic
"expert" that applies the same checklist (:data:`CHECKLIST`) the review UI shows to humans.

Image model (bright-field smear, grayscale): bright background (~205-235), mid-gray cytoplasm
(~130-160), dark nuclei (~40-75). Default 32x32; every length scales with ``size / 32``.

Cell types (:data:`CELL_TYPES`, label = index):

- ``lymphocyte``: small cell, one large round nucleus (high nucleus-to-cytoplasm ratio).
- ``neutrophil``: medium cell, three separate small nuclear lobes.
- ``eosinophil``: medium cell, two larger lobes, coarse granular cytoplasm.
- ``monocyte``: large cell, one kidney-shaped (indented) nucleus.

The oracle thresholds the lightly smoothed image at two fixed levels (membrane, nucleus) and
checks every criterion; it accepts ~100 % of real phantoms and rejects phantoms shown with a
wrong label and the corruptions in :data:`CORRUPTIONS` (useful as reward-model negatives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from clinisynth_lab.phantoms._common import (
    balanced_labels,
    check_count,
    check_size,
    draw_disks,
    item_rng,
    soft,
    to_uint8,
    unit_noise,
)
from clinisynth_server.errors import InvalidArgument

CELL_TYPES: tuple[str, ...] = ("lymphocyte", "neutrophil", "eosinophil", "monocyte")
DEFAULT_SIZE = 32
MIN_SIZE = 24

# Oracle intensity thresholds on the smoothed image (independent of size).
MEMBRANE_THRESHOLD = 185.0
NUCLEUS_THRESHOLD = 100.0


@dataclass(frozen=True)
class _Spec:
    """Generation ranges of one cell type, in pixels at 32x32 (scaled with size)."""

    cell_radius: tuple[float, float]
    n_nuclei: int
    nucleus: str  # "round" | "kidney" | "lobes"
    lobe_radius: tuple[float, float] = (0.0, 0.0)
    granular: bool = False
    # Oracle acceptance ranges, 32x32 pixel units (areas scale with (size/32)^2).
    membrane_area: tuple[float, float] = (0.0, 0.0)
    nc_ratio: tuple[float, float] = (0.0, 1.0)
    nucleus_area: tuple[float, float] = (0.0, 1e9)  # per nucleus component


_SPECS: dict[str, _Spec] = {
    "lymphocyte": _Spec(
        cell_radius=(7.4, 8.8),
        n_nuclei=1,
        nucleus="round",
        membrane_area=(130.0, 300.0),
        nc_ratio=(0.24, 0.65),
        nucleus_area=(40.0, 170.0),
    ),
    "neutrophil": _Spec(
        cell_radius=(9.8, 11.0),
        n_nuclei=3,
        nucleus="lobes",
        lobe_radius=(2.1, 2.55),
        membrane_area=(230.0, 430.0),
        nc_ratio=(0.06, 0.3),
        nucleus_area=(5.0, 28.0),
    ),
    "eosinophil": _Spec(
        cell_radius=(10.0, 11.2),
        n_nuclei=2,
        nucleus="lobes",
        lobe_radius=(2.7, 3.15),
        granular=True,
        membrane_area=(240.0, 440.0),
        nc_ratio=(0.08, 0.3),
        nucleus_area=(11.0, 42.0),
    ),
    "monocyte": _Spec(
        cell_radius=(10.8, 12.0),
        n_nuclei=1,
        nucleus="kidney",
        membrane_area=(300.0, 520.0),
        nc_ratio=(0.12, 0.42),
        nucleus_area=(45.0, 190.0),
    ),
}

# Oracle shape/texture thresholds (calibrated on 4,000 phantoms; see tests).
_CONVEX_DEFICIENCY_MAX = 1.5  # px (32-px units): round nuclei and lobes are convex
_KIDNEY_DEFICIENCY_MIN = 2.0  # px: a monocyte nucleus has a visible notch
_MEMBRANE_SOLIDITY_MIN = 0.93
_RIM_MIN_PX = 1.9  # distance (edt, 32-px units) from a nucleus pixel to outside the cell
_GRANULAR_MIN = 3.4
_SMOOTH_MAX = 3.0
_SPLIT_FRACTION = 0.12  # a second membrane component this large (vs the main) = split cell
_MIN_COMPONENT_PX = 2.0  # smaller specks are ignored as noise (32-px units)


@dataclass(frozen=True)
class Criterion:
    """One checklist item, shown to experts and used as a failure name by the oracle."""

    name: str
    description: str


@dataclass(frozen=True)
class OracleVerdict:
    """Plausibility judgement: ``failures`` names the violated :class:`Criterion` items."""

    plausible: bool
    failures: list[str]
    measurements: dict[str, float] = field(default_factory=dict)


def _checklist_for(name: str) -> tuple[Criterion, ...]:
    spec = _SPECS[name]
    lo, hi = spec.cell_radius
    count = {
        1: "exactly one nucleus",
        2: "exactly two nuclear lobes",
        3: "exactly three nuclear lobes",
    }
    shape = {
        "lymphocyte": "The nucleus is large, round and smooth and fills most of the cell.",
        "neutrophil": "The three lobes are small, round and of similar size.",
        "eosinophil": "The two lobes are round, of similar size ('spectacles' pattern).",
        "monocyte": "The nucleus is kidney-shaped (visibly indented on one side).",
    }[name]
    texture = (
        "The cytoplasm is coarsely granular."
        if spec.granular
        else "The cytoplasm is smooth and agranular."
    )
    return (
        Criterion("membrane_present", "A cell with a visible membrane is present."),
        Criterion("membrane_single", "The membrane is one closed outline, not split into pieces."),
        Criterion(
            "membrane_area",
            f"The cell size is typical for a {name} (radius about {lo:.0f}-{hi:.0f} px at 32x32).",
        ),
        Criterion(
            "membrane_clear_of_border",
            "The whole cell lies inside the image; the membrane does not touch the border.",
        ),
        Criterion("membrane_smooth", "The outline is smooth and convex (no clefts or bulges)."),
        Criterion("no_detached_fragments", "No detached fragments or debris outside the cell."),
        Criterion("nuclei_inside_membrane", "Every nucleus lies inside the cell membrane."),
        Criterion("cytoplasm_rim", "A rim of cytoplasm separates every nucleus from the membrane."),
        Criterion("nucleus_count", f"The cell shows {count[spec.n_nuclei]}."),
        Criterion("nucleus_shape", shape),
        Criterion("cytoplasm_texture", texture),
    )


CHECKLIST: dict[str, tuple[Criterion, ...]] = {name: _checklist_for(name) for name in CELL_TYPES}
"""Per cell type, the criteria an expert checks; the oracle's failure names are these names."""


def checklist_dict() -> dict[str, list[dict[str, str]]]:
    """The checklist as plain JSON-able data for the expert-review UI."""
    return {
        name: [{"name": c.name, "description": c.description} for c in crits]
        for name, crits in CHECKLIST.items()
    }


def _label_index(label: int | str) -> int:
    if isinstance(label, str):
        if label not in CELL_TYPES:
            raise InvalidArgument.for_field("label", f"unknown cell type {label!r}")
        return CELL_TYPES.index(label)
    if isinstance(label, bool) or not (0 <= int(label) < len(CELL_TYPES)):
        raise InvalidArgument.for_field(
            "label", f"must be in [0, {len(CELL_TYPES)}), got {label!r}"
        )
    return int(label)


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Nucleus:
    """A nucleus part: ellipse (cx, cy, a, b, angle) and, for kidneys, a circular bite."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float
    bite: tuple[float, float, float] | None = None  # (x, y, r)


@dataclass(frozen=True)
class CellParams:
    """Everything that fixes one phantom's geometry (pixel units of the target size)."""

    label: int
    size: int
    cx: float
    cy: float
    a: float
    b: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]
    nuclei: tuple[_Nucleus, ...]


def _membrane_radius(p: CellParams, theta: np.ndarray) -> np.ndarray:
    """Membrane radius at polar angle ``theta`` measured in the cell frame."""
    r = 1.0 / np.sqrt((np.cos(theta) / p.a) ** 2 + (np.sin(theta) / p.b) ** 2)
    wobble = np.ones_like(theta)
    for k, amp, phase in p.harmonics:
        wobble = wobble + amp * np.cos(k * theta + phase)
    return r * wobble


def _nucleus_outline(nu: _Nucleus, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    u, v = nu.a * np.cos(t), nu.b * np.sin(t)
    ca, sa = math.cos(nu.angle), math.sin(nu.angle)
    return np.stack([nu.cx + u * ca - v * sa, nu.cy + u * sa + v * ca], axis=1)


def _rim_ok(p: CellParams, rim: float) -> bool:
    """Every nucleus outline point lies at least ``rim`` px inside the membrane (radially)."""
    ca, sa = math.cos(p.angle), math.sin(p.angle)
    for nu in p.nuclei:
        pts = _nucleus_outline(nu)
        dx, dy = pts[:, 0] - p.cx, pts[:, 1] - p.cy
        u, v = dx * ca + dy * sa, -dx * sa + dy * ca
        rho, theta = np.hypot(u, v), np.arctan2(v, u)
        if np.any(_membrane_radius(p, theta) - rho < rim):
            return False
    return True


def _gaps_ok(nuclei: tuple[_Nucleus, ...], gap: float) -> bool:
    for i in range(len(nuclei)):
        for j in range(i + 1, len(nuclei)):
            d = math.hypot(nuclei[i].cx - nuclei[j].cx, nuclei[i].cy - nuclei[j].cy)
            if d - max(nuclei[i].a, nuclei[i].b) - max(nuclei[j].a, nuclei[j].b) < gap:
                return False
    return True


def sample_params(
    label: int | str, rng: np.random.Generator, size: int = DEFAULT_SIZE
) -> CellParams:
    """Draw the geometry of one cell of type ``label`` (rejection-sampled until anatomical)."""
    label = _label_index(label)
    size = check_size(size, MIN_SIZE)
    spec = _SPECS[CELL_TYPES[label]]
    s = size / 32.0
    last: CellParams | None = None
    for _ in range(200):
        r = rng.uniform(*spec.cell_radius) * s
        aspect = rng.uniform(0.86, 1.0)
        a, b = r, r * aspect
        angle = rng.uniform(0, np.pi)
        centre = (size - 1) / 2.0
        cx = centre + rng.uniform(-1.2, 1.2) * s
        cy = centre + rng.uniform(-1.2, 1.2) * s
        harmonics = tuple(
            (k, float(rng.uniform(0.0, 0.022)), float(rng.uniform(0, 2 * np.pi))) for k in (3, 4, 5)
        )
        ox, oy = rng.uniform(-0.6, 0.6, size=2) * s
        nuclei: tuple[_Nucleus, ...]
        if spec.nucleus == "round":
            rn = rng.uniform(0.62, 0.72) * b
            nuclei = (
                _Nucleus(cx + ox, cy + oy, rn, rn * rng.uniform(0.9, 1.0), rng.uniform(0, np.pi)),
            )
        elif spec.nucleus == "kidney":
            na = rng.uniform(0.5, 0.56) * r
            nb = rng.uniform(0.38, 0.44) * r
            nang = rng.uniform(0, 2 * np.pi)
            ncx, ncy = cx + 1.6 * ox, cy + 1.6 * oy
            rb = rng.uniform(0.62, 0.7) * na
            dist = nb + rb - rng.uniform(0.7, 0.8) * nb  # indentation depth ~75 % of nb
            bx = ncx - dist * math.sin(nang)
            by = ncy + dist * math.cos(nang)
            nuclei = (_Nucleus(ncx, ncy, na, nb, nang, (bx, by, rb)),)
        else:
            n = spec.n_nuclei
            radii = rng.uniform(*spec.lobe_radius, size=n) * s
            if n == 2:
                gap = rng.uniform(2.4, 3.2) * s
                half = (radii[0] + radii[1] + gap) / 2.0
                phi = rng.uniform(0, np.pi)
                offsets = [(-half, 0.0), (half, 0.0)]
            else:
                rho = rng.uniform(4.4, 4.9) * s
                spread = np.deg2rad(rng.uniform(112.0, 124.0))
                phi = rng.uniform(0, 2 * np.pi)
                offsets = [(rho * math.cos(t), rho * math.sin(t)) for t in (-spread, 0.0, spread)]
                # centre the C-shaped chain on the cell
                mx = sum(o[0] for o in offsets) / n
                offsets = [(o[0] - mx * 0.6, o[1]) for o in offsets]
            cp, sp = math.cos(phi), math.sin(phi)
            nuclei = tuple(
                _Nucleus(
                    cx + ox + u * cp - v * sp,
                    cy + oy + u * sp + v * cp,
                    radii[i],
                    radii[i] * rng.uniform(0.85, 1.0),
                    rng.uniform(0, np.pi),
                )
                for i, (u, v) in enumerate(offsets)
            )
        last = CellParams(label, size, cx, cy, a, b, angle, harmonics, nuclei)
        if _rim_ok(last, 2.3 * s) and _gaps_ok(nuclei, 2.0 * s):
            return last
    assert last is not None
    return last


def _ellipse_distance(xx: np.ndarray, yy: np.ndarray, nu: _Nucleus) -> np.ndarray:
    """Approximate signed distance (px, positive inside) to a nucleus part."""
    dx, dy = xx - nu.cx, yy - nu.cy
    ca, sa = math.cos(nu.angle), math.sin(nu.angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    q = np.sqrt((u / nu.a) ** 2 + (v / nu.b) ** 2)
    d = (1.0 - q) * math.sqrt(nu.a * nu.b)
    if nu.bite is not None:
        bx, by, rb = nu.bite
        d = np.minimum(d, np.hypot(xx - bx, yy - by) - rb)
    return d


def render(p: CellParams, rng: np.random.Generator) -> np.ndarray:
    """Render a cell (uint8 [H, W]); ``rng`` supplies intensities, texture and noise."""
    size = p.size
    s = size / 32.0
    spec = _SPECS[CELL_TYPES[p.label]]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)

    dx, dy = xx - p.cx, yy - p.cy
    ca, sa = math.cos(p.angle), math.sin(p.angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    cell_a = soft(_membrane_radius(p, np.arctan2(v, u)) - np.hypot(u, v))

    nuc_a = np.zeros((size, size))
    for nu in p.nuclei:
        nuc_a = np.maximum(nuc_a, soft(_ellipse_distance(xx, yy, nu)))

    bg = rng.uniform(208.0, 234.0)
    grad = rng.uniform(-0.12, 0.12, size=2) / s
    background = bg + grad[0] * (xx - size / 2) + grad[1] * (yy - size / 2)
    cyto = rng.uniform(132.0, 158.0)
    nuc = rng.uniform(42.0, 72.0)

    cyto_img = cyto + 3.0 * unit_noise(rng, (size, size), 1.6 * s)
    if spec.granular:
        # granules: disks of ~1 px at 32x32 (physical size independent of `size`); dark and
        # bright ones drawn on separate canvases that saturate rather than accumulate.
        n_gran = int(0.5 * np.pi * p.a * p.b / (s * s))
        gx = rng.uniform(p.cx - p.a, p.cx + p.a, n_gran)
        gy = rng.uniform(p.cy - p.a, p.cy + p.a, n_gran)
        gr = rng.uniform(0.45, 0.6, n_gran) * s
        level = rng.uniform(0.7, 1.0, n_gran)
        dark = rng.random(n_gran) < 0.5
        disks = list(zip(gx, gy, gr, strict=True))
        cov_dark = draw_disks(
            size, [d for d, k in zip(disks, dark, strict=True) if k], values=level[dark]
        )
        cov_bright = draw_disks(
            size, [d for d, k in zip(disks, dark, strict=True) if not k], values=level[~dark]
        )
        dark_amp = min(34.0, cyto - 114.0)  # dark granules stay well above the nucleus level
        cyto_img = cyto_img - dark_amp * cov_dark + 34.0 * cov_bright
    img = background * (1.0 - cell_a) + cyto_img * cell_a

    if spec.nucleus == "lobes" and len(p.nuclei) > 1:
        # faint chromatin bridges between consecutive lobes (visual only, above threshold)
        strand = np.zeros((size, size))
        for n0, n1 in zip(p.nuclei[:-1], p.nuclei[1:], strict=True):
            px, py = n1.cx - n0.cx, n1.cy - n0.cy
            length2 = px * px + py * py
            t = np.clip(((xx - n0.cx) * px + (yy - n0.cy) * py) / length2, 0, 1)
            dist = np.hypot(xx - n0.cx - t * px, yy - n0.cy - t * py)
            strand = np.maximum(strand, soft(0.4 * s - dist))
        img = img * (1 - 0.2 * strand) + nuc * 0.2 * strand

    nuc_img = nuc + 5.0 * unit_noise(rng, (size, size), 0.7 * s)
    img = img * (1.0 - nuc_a) + nuc_img * nuc_a
    img = img + rng.normal(0.0, 2.2, size=(size, size))
    return to_uint8(img)


def generate(
    n: int,
    *,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    labels: np.ndarray | list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` cell phantoms: images uint8 [n, size, size] and int64 labels (balanced classes).

    Pass ``labels`` to choose the classes (then ``n`` must equal its length). Image ``i`` is
    a function of ``(seed, i, label)`` only.
    """
    n = check_count(n)
    size = check_size(size, MIN_SIZE)
    if labels is None:
        lab = balanced_labels(n, len(CELL_TYPES), item_rng(seed, 0, stream=1))
    else:
        lab = np.asarray([_label_index(int(x)) for x in labels], dtype=np.int64)
        if lab.shape != (n,):
            raise InvalidArgument.for_field("labels", f"must have length n={n}, got {lab.shape}")
    images = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        rng = item_rng(seed, i)
        images[i] = render(sample_params(int(lab[i]), rng, size), rng)
    return images, lab


# --------------------------------------------------------------------------- oracle


def _hull_count(mask: np.ndarray) -> int:
    """Number of pixels whose centres lie in the convex hull of the mask's pixel centres."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return len(xs)
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    try:
        hull = ConvexHull(pts)
    except QhullError:  # collinear: a line is convex
        return len(xs)
    gy, gx = np.mgrid[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float64)
    eq = hull.equations
    return int(np.count_nonzero(np.all(grid @ eq[:, :2].T + eq[:, 2] <= 1e-9, axis=1)))


def _solidity(mask: np.ndarray) -> float:
    """Digital solidity: 1.0 for a (digitally) convex blob, lower for clefts and bulges."""
    return int(mask.sum()) / max(_hull_count(mask), 1)


def _deficiency(mask: np.ndarray) -> int:
    """Convexity deficiency in pixels: hull pixels the blob leaves empty (a kidney's notch)."""
    return _hull_count(mask) - int(mask.sum())


def oracle(image: np.ndarray, label: int | str) -> OracleVerdict:
    """Judge one grayscale cell image (uint8 [H, W]) shown as class ``label``.

    Thresholds scale with the image side, so any size >= 24 works. ``failures`` lists the
    names of the violated :data:`CHECKLIST` criteria (empty when plausible).
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim != 2 or img.shape[0] != img.shape[1] or img.shape[0] < MIN_SIZE:
        raise InvalidArgument.for_field("image", f"must be a square 2-D image >= {MIN_SIZE} px")
    idx = _label_index(label)
    spec = _SPECS[CELL_TYPES[idx]]
    size = img.shape[0]
    s = size / 32.0
    s2 = s * s
    failures: list[str] = []
    meas: dict[str, float] = {}

    sm = ndimage.gaussian_filter(img.astype(np.float64), 0.6 * s)
    dark = sm < MEMBRANE_THRESHOLD
    comp, ncomp = ndimage.label(dark)
    areas = np.bincount(comp.ravel(), minlength=ncomp + 1)[1:].astype(np.float64)
    keep = [i + 1 for i, a in enumerate(areas) if a >= _MIN_COMPONENT_PX * s2]
    if not keep:
        return OracleVerdict(False, ["membrane_present"], {"membrane_area": 0.0})
    main = max(keep, key=lambda k: areas[k - 1])
    main_area = areas[main - 1]
    others = [areas[k - 1] for k in keep if k != main]
    cell = ndimage.binary_fill_holes(comp == main)
    area = float(cell.sum())
    meas["membrane_area"] = area / s2
    if area < 40 * s2:
        failures.append("membrane_present")
    if any(a >= _SPLIT_FRACTION * main_area for a in others):
        failures.append("membrane_single")
    if any(a < _SPLIT_FRACTION * main_area for a in others):
        failures.append("no_detached_fragments")
    lo, hi = spec.membrane_area
    if not (lo * s2 <= area <= hi * s2):
        failures.append("membrane_area")
    if cell[0, :].any() or cell[-1, :].any() or cell[:, 0].any() or cell[:, -1].any():
        failures.append("membrane_clear_of_border")
    mem_sol = _solidity(cell)
    meas["membrane_solidity"] = mem_sol
    if mem_sol < _MEMBRANE_SOLIDITY_MIN:
        failures.append("membrane_smooth")

    nucmask = ndimage.gaussian_filter(img.astype(np.float64), 0.4 * s) < NUCLEUS_THRESHOLD
    ncomp_lab, n_n = ndimage.label(nucmask)
    n_areas = np.bincount(ncomp_lab.ravel(), minlength=n_n + 1)[1:].astype(np.float64)
    nuclei = [k + 1 for k, a in enumerate(n_areas) if a >= _MIN_COMPONENT_PX * s2]
    meas["nucleus_count"] = float(len(nuclei))
    if any(not cell[ncomp_lab == k].all() for k in nuclei):
        failures.append("nuclei_inside_membrane")
    inside_nuc = nucmask & cell
    if inside_nuc.any():
        edt = ndimage.distance_transform_edt(cell)
        rim = float(edt[inside_nuc].min()) / s
        meas["cytoplasm_rim"] = rim
        if rim < _RIM_MIN_PX:
            failures.append("cytoplasm_rim")
    if len(nuclei) != spec.n_nuclei:
        failures.append("nucleus_count")

    shape_ok = True
    nuc_area = float(sum(n_areas[k - 1] for k in nuclei))
    meas["nc_ratio"] = nuc_area / max(area, 1.0)
    if nuclei:
        nlo, nhi = spec.nc_ratio
        if not (nlo <= meas["nc_ratio"] <= nhi):
            shape_ok = False
        defs = [_deficiency(ncomp_lab == k) / s2 for k in nuclei]
        meas["nucleus_area_min"] = float(min(n_areas[k - 1] for k in nuclei)) / s2
        meas["nucleus_area_max"] = float(max(n_areas[k - 1] for k in nuclei)) / s2
        meas["nucleus_deficiency_max"] = max(defs)
        meas["nucleus_deficiency_min"] = min(defs)
        for k, dfc in zip(nuclei, defs, strict=True):
            a_k = n_areas[k - 1] / s2
            if not (spec.nucleus_area[0] <= a_k <= spec.nucleus_area[1]):
                shape_ok = False
            if spec.nucleus == "kidney":
                if dfc < _KIDNEY_DEFICIENCY_MIN:
                    shape_ok = False
            elif dfc > _CONVEX_DEFICIENCY_MAX:
                shape_ok = False
    else:
        shape_ok = False
    if not shape_ok:
        failures.append("nucleus_shape")

    # Texture: high-pass energy of the cytoplasm. The low-pass is a normalised convolution over
    # cytoplasm pixels only, so membrane and nucleus edges do not leak into the measure.
    region = ndimage.binary_erosion(cell, iterations=max(1, round(s))) & ~ndimage.binary_dilation(
        nucmask, iterations=max(1, round(s))
    )
    cyto = ndimage.binary_erosion(region)
    if cyto.sum() >= 10 * s2:
        f = img.astype(np.float64)
        m = region.astype(np.float64)
        low = ndimage.gaussian_filter(f * m, 1.5 * s) / np.maximum(
            ndimage.gaussian_filter(m, 1.5 * s), 1e-6
        )
        high = ndimage.gaussian_filter(f, 0.5 * s) - low
        gran = float(np.sqrt(np.mean(high[cyto] ** 2)))
        meas["granularity"] = gran
        if spec.granular and gran < _GRANULAR_MIN:
            failures.append("cytoplasm_texture")
        if not spec.granular and gran > _SMOOTH_MAX:
            failures.append("cytoplasm_texture")
    elif spec.granular:
        failures.append("cytoplasm_texture")

    return OracleVerdict(not failures, failures, meas)


def oracle_batch(images: np.ndarray, labels: np.ndarray | list[int]) -> np.ndarray:
    """Vector of plausibility booleans for a batch (convenience for benchmarks)."""
    return np.array([oracle(im, int(y)).plausible for im, y in zip(images, labels, strict=True)])


# --------------------------------------------------------------------------- corruptions

CORRUPTIONS: tuple[str, ...] = (
    "border_crop",
    "extra_nucleus",
    "split_membrane",
    "detached_blob",
    "missing_nucleus",
    "oversized",
)
"""Implausible edits of a real phantom (reward-model negatives and oracle tests)."""


def _levels(img: np.ndarray) -> tuple[float, float, float, np.ndarray, np.ndarray]:
    sm = ndimage.gaussian_filter(img.astype(np.float64), 0.6)
    cell = ndimage.binary_fill_holes(sm < MEMBRANE_THRESHOLD)
    nuc = sm < NUCLEUS_THRESHOLD
    bg = float(np.median(img[~cell])) if (~cell).any() else 220.0
    cyto_px = img[cell & ~ndimage.binary_dilation(nuc, iterations=2)]
    cyto = float(np.median(cyto_px)) if cyto_px.size else 145.0
    nuc_px = img[nuc]
    nucv = float(np.median(nuc_px)) if nuc_px.size else 60.0
    return bg, cyto, nucv, cell, nuc


def _paint_disk(img: np.ndarray, x: float, y: float, r: float, value: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    a = soft(r - np.hypot(xx - x, yy - y))
    return img * (1 - a) + value * a


def corrupt(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Apply one implausibility from :data:`CORRUPTIONS` to a phantom (uint8 in, uint8 out)."""
    if kind not in CORRUPTIONS:
        raise InvalidArgument.for_field("kind", f"unknown corruption {kind!r}; use {CORRUPTIONS}")
    img = np.asarray(image).astype(np.float64)
    size = img.shape[0]
    s = size / 32.0
    bg, cyto, nucv, cell, nuc = _levels(img)
    ys, xs = np.nonzero(cell)
    noise = rng.normal(0.0, 2.2, img.shape)
    if kind == "border_crop":
        axis = int(rng.integers(0, 2))
        coords = ys if axis == 0 else xs
        if rng.random() < 0.5:
            shift = -(int(coords.min()) + int(rng.integers(2, 6)))
        else:
            shift = (size - 1 - int(coords.max())) + int(rng.integers(2, 6))
        out = np.full_like(img, bg) + noise
        src = [slice(None), slice(None)]
        dst = [slice(None), slice(None)]
        if shift >= 0:
            src[axis], dst[axis] = slice(0, size - shift), slice(shift, size)
        else:
            src[axis], dst[axis] = slice(-shift, size), slice(0, size + shift)
        out[tuple(dst)] = img[tuple(src)]
        img = out
    elif kind == "extra_nucleus":
        inner = ndimage.distance_transform_edt(cell)
        free = ndimage.distance_transform_edt(~nuc)
        score = np.minimum(inner, free) + rng.uniform(0, 0.3, img.shape)
        y, x = np.unravel_index(int(np.argmax(score)), score.shape)
        img = _paint_disk(img, float(x), float(y), rng.uniform(2.0, 2.6) * s, nucv)
    elif kind == "split_membrane":
        cy, cx = ys.mean(), xs.mean()
        theta = rng.uniform(0, np.pi)
        off = rng.uniform(-2.0, 2.0) * s
        yy, xx = np.mgrid[0:size, 0:size]
        d = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta) - off
        a = soft(rng.uniform(1.2, 1.8) * s - np.abs(d))
        img = img * (1 - a) + (bg + noise) * a
    elif kind == "detached_blob":
        dist_out = ndimage.distance_transform_edt(~cell)
        yy, xx = np.mgrid[0:size, 0:size]
        border = np.minimum.reduce([xx, yy, size - 1 - xx, size - 1 - yy])
        r = rng.uniform(1.4, 2.4) * s
        ok = (dist_out > r + 2 * s) & (border > r + 1.5 * s)
        cand = np.argwhere(ok)
        if len(cand) == 0:
            cand = np.argwhere(dist_out == dist_out.max())
        y, x = cand[int(rng.integers(len(cand)))]
        img = _paint_disk(img, float(x), float(y), r, nucv if rng.random() < 0.5 else cyto)
    elif kind == "missing_nucleus":
        grown = ndimage.binary_dilation(nuc, iterations=max(1, round(s)))
        img = np.where(grown, cyto + noise, img)
    elif kind == "oversized":
        factor = rng.uniform(1.3, 1.45)
        c = (size - 1) / 2.0
        img = ndimage.affine_transform(
            img, np.eye(2) / factor, offset=c - c / factor, order=1, mode="nearest"
        )
    return to_uint8(img)
