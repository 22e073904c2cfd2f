"""Chest-X-ray-like phantoms (PA view) with findings and radiology-style report text.

Why: the Stable-Diffusion adaptation and RoentGen methods (docs/METHODS.md §2, §3) train
text-to-image models on radiographs with report text and check that a prompted finding is present.
Offline we have no chest X-rays, so this module renders grayscale PA radiographs whose findings are
known from the generation parameters (:func:`ground_truth`) and writes matching reports
(:func:`report`); :func:`findings_from_report` is the inverse rule-based labeller (a tiny
CheXpert-style labeller).

Conventions: radiological display (air dark, bone bright) and orientation (the patient's right is
on the image's left), so a *left* pleural effusion is drawn on the image's right side.

Findings (:data:`FINDINGS`, multi-hot column order): ``no_finding``, ``pleural_effusion_left``,
``pleural_effusion_right``, ``cardiomegaly``, ``pneumothorax``. ``no_finding`` is exclusive;
combinations such as cardiomegaly with bilateral effusions are allowed (see :data:`FINDING_SETS`).
Patient variation: lung size and shape, diaphragm height, rib spacing / curvature, heart position,
positioning (rotation, scale, shift) and exposure (gamma, gain, offset, noise).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from clinisynth_lab.phantoms._common import (
    check_count,
    check_size,
    draw_polylines,
    item_rng,
    to_uint8,
)
from clinisynth_server.errors import InvalidArgument

FINDINGS: tuple[str, ...] = (
    "no_finding",
    "pleural_effusion_left",
    "pleural_effusion_right",
    "cardiomegaly",
    "pneumothorax",
)
DEFAULT_SIZE = 64
MIN_SIZE = 32
SEVERITIES: tuple[str, ...] = ("small", "moderate", "large")

# Finding combinations the sampler draws from, with probabilities (sum to 1).
FINDING_SETS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("no_finding",), 0.30),
    (("pleural_effusion_left",), 0.10),
    (("pleural_effusion_right",), 0.10),
    (("pleural_effusion_left", "pleural_effusion_right"), 0.06),
    (("cardiomegaly",), 0.12),
    (("pleural_effusion_left", "cardiomegaly"), 0.04),
    (("pleural_effusion_right", "cardiomegaly"), 0.04),
    (("pleural_effusion_left", "pleural_effusion_right", "cardiomegaly"), 0.04),
    (("pneumothorax",), 0.20),
)


def canonical_findings(findings: Sequence[str] | str) -> tuple[str, ...]:
    """Validate and order a finding set (FINDINGS order); empty means ``("no_finding",)``."""
    if isinstance(findings, str):
        findings = (findings,)
    items = set(findings)
    unknown = items - set(FINDINGS)
    if unknown:
        raise InvalidArgument.for_field("findings", f"unknown findings {sorted(unknown)}")
    if "no_finding" in items and len(items) > 1:
        raise InvalidArgument.for_field("findings", "no_finding cannot be combined with findings")
    if not items:
        return ("no_finding",)
    return tuple(f for f in FINDINGS if f in items)


def multi_hot(findings: Sequence[str]) -> np.ndarray:
    """int8 vector over :data:`FINDINGS`."""
    f = set(canonical_findings(findings))
    return np.array([1 if name in f else 0 for name in FINDINGS], dtype=np.int8)


@dataclass(frozen=True)
class ChestParams:
    """Everything that fixes one radiograph; ground truth is read from here."""

    size: int
    findings: tuple[str, ...]
    effusion: tuple[tuple[str, float, str], ...]  # (side "left"/"right", height fraction, severity)
    pneumothorax: tuple[str, float, str] | None  # (side, collapse factor k, severity)
    ctr: float  # cardiothoracic ratio
    seed_state: int  # seeds texture / markings / noise


def ground_truth(params: ChestParams) -> tuple[str, ...]:
    """The findings present in a rendered image, in :data:`FINDINGS` order."""
    present = []
    sides = {side for side, _, _ in params.effusion}
    if "left" in sides:
        present.append("pleural_effusion_left")
    if "right" in sides:
        present.append("pleural_effusion_right")
    if params.ctr >= 0.55:
        present.append("cardiomegaly")
    if params.pneumothorax is not None:
        present.append("pneumothorax")
    return canonical_findings(present)


def _sample_finding_set(rng: np.random.Generator) -> tuple[str, ...]:
    probs = np.array([p for _, p in FINDING_SETS])
    i = int(rng.choice(len(FINDING_SETS), p=probs / probs.sum()))
    return FINDING_SETS[i][0]


def sample_params(
    rng: np.random.Generator,
    size: int = DEFAULT_SIZE,
    findings: Sequence[str] | None = None,
) -> ChestParams:
    """Draw a patient with the given findings (sampled from :data:`FINDING_SETS` if None)."""
    size = check_size(size, MIN_SIZE)
    fs = canonical_findings(findings) if findings is not None else _sample_finding_set(rng)
    eff: list[tuple[str, float, str]] = []
    for side in ("left", "right"):
        if f"pleural_effusion_{side}" in fs:
            sev = SEVERITIES[int(rng.integers(0, 3))]
            frac = {"small": (0.16, 0.22), "moderate": (0.28, 0.38), "large": (0.45, 0.58)}[sev]
            eff.append((side, float(rng.uniform(*frac)), sev))
    ptx = None
    if "pneumothorax" in fs:
        sev = SEVERITIES[int(rng.integers(0, 3))]
        k = {"small": (0.8, 0.86), "moderate": (0.68, 0.76), "large": (0.52, 0.62)}[sev]
        ptx = ("left" if rng.random() < 0.5 else "right", float(rng.uniform(*k)), sev)
    ctr = float(rng.uniform(0.57, 0.66) if "cardiomegaly" in fs else rng.uniform(0.39, 0.47))
    return ChestParams(size, fs, tuple(eff), ptx, ctr, int(rng.integers(0, 2**63 - 1)))


def _soft(d: np.ndarray, px: float) -> np.ndarray:
    """Coverage from a signed distance in normalised units (positive inside), 1-px ramp."""
    return np.clip(0.5 + d / px, 0.0, 1.0)


def render(params: ChestParams) -> np.ndarray:
    """Render one radiograph (uint8 [size, size]); deterministic given ``params``."""
    size = params.size
    rng = np.random.default_rng(params.seed_state)
    px = 2.0 / size
    lin = (np.arange(size) + 0.5) * px - 1.0
    gy, gx = np.meshgrid(lin, lin, indexing="ij")

    # Positioning: pixel (normalised) -> patient coordinates.
    rot = math.radians(rng.uniform(-3.0, 3.0))
    scale = rng.uniform(0.94, 1.04)
    shift = rng.uniform(-0.03, 0.03, size=2)
    cr, sr = math.cos(rot), math.sin(rot)
    X = (cr * (gx - shift[0]) + sr * (gy - shift[1])) / scale
    Y = (-sr * (gx - shift[0]) + cr * (gy - shift[1])) / scale
    ppx = px / scale

    def to_pixels(xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
        nx = scale * (cr * xp - sr * yp) + shift[0]
        ny = scale * (sr * xp + cr * yp) + shift[1]
        return np.stack([(nx + 1.0) / px - 0.5, (ny + 1.0) / px - 0.5], axis=1)

    # --- patient anatomy ------------------------------------------------------------
    body_w = rng.uniform(0.9, 0.98)
    lung_uc = rng.uniform(0.4, 0.46)
    lung_a = rng.uniform(0.3, 0.35)
    lung_b = rng.uniform(0.6, 0.7)
    lung_yc = rng.uniform(-0.06, 0.02)
    dome_k = rng.uniform(1.3, 1.9)
    right_higher = rng.uniform(0.02, 0.07)
    thorax_half = lung_uc + lung_a

    def lung_distance(side: int, u: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance (positive inside) of a lung; side -1 = image left (patient right)."""
        p = 2.4
        f = (np.abs((u - lung_uc) / lung_a) ** p + np.abs((y - lung_yc) / lung_b) ** p) ** (1 / p)
        d_ell = (1.0 - f) * lung_a
        y_top = lung_yc + 0.62 * lung_b - (right_higher if side < 0 else 0.0)
        d_dome = y_top + dome_k * (u - lung_uc) ** 2 - y
        return np.minimum(d_ell, d_dome)

    img = np.full((size, size), 0.04)
    body = _soft(body_w - np.abs(X) - 0.3 * np.clip(-0.72 - Y, 0, None) ** 1.5, ppx)
    img = img * (1 - body) + 0.5 * body

    lungs = {}
    for side in (-1, 1):
        u = side * X
        lungs[side] = _soft(lung_distance(side, u, Y), ppx)

    # pneumothorax: collapse one lung toward its hilum
    collapsed = {side: lungs[side] for side in (-1, 1)}
    pleural_line = np.zeros_like(img)
    if params.pneumothorax is not None:
        pside = 1 if params.pneumothorax[0] == "left" else -1
        k = params.pneumothorax[1]
        hu, hy = 0.2, 0.05
        u = pside * X
        uu, yy = hu + (u - hu) / k, hy + (Y - hy) / k
        dcol = lung_distance(pside, uu, yy) * k
        collapsed[pside] = _soft(dcol, ppx) * lungs[pside]
        pleural_line = np.exp(-((dcol / (0.7 * ppx)) ** 2)) * lungs[pside]

    # vascular markings radiating from each hilum, drawn only in aerated (collapsed) lung
    lines = []
    for side in (-1, 1):
        for _ in range(int(rng.integers(7, 11))):
            ang = rng.uniform(-1.2, 1.2)
            length = rng.uniform(0.35, 0.6)
            steps = 6
            t = np.linspace(0, 1, steps)
            wob = np.cumsum(rng.normal(0, 0.12, steps))
            ua = 0.16 + np.cos(ang + 0.3 * wob) * length * t
            ya = 0.02 + np.sin(ang + 0.3 * wob) * length * t * 0.9
            pts = to_pixels(side * ua, ya)
            lines.append((pts, max(0.6, 1.3 * size / 64)))
    markings = draw_polylines(size, lines)
    radial = np.clip(1.0 - np.abs(X) / (thorax_half + 0.05), 0.2, 1.0)

    lung_level = rng.uniform(0.13, 0.19)
    for side in (-1, 1):
        la, ca = lungs[side], collapsed[side]
        aer = lung_level + 0.16 * markings * radial + rng.uniform(-0.01, 0.01)
        ptx_region = la - ca
        img = img * (1 - ca) + aer * ca
        img = img * (1 - ptx_region) + (lung_level - 0.06) * ptx_region
    img = img + 0.16 * pleural_line

    # heart and mediastinum
    heart_x = rng.uniform(0.05, 0.11)
    heart_y = rng.uniform(0.17, 0.25)
    ah = params.ctr * thorax_half
    bh = ah * rng.uniform(0.7, 0.82)
    tilt = math.radians(rng.uniform(10, 22))
    hx, hy = X - heart_x, Y - heart_y
    hu = hx * math.cos(tilt) + hy * math.sin(tilt)
    hv = -hx * math.sin(tilt) + hy * math.cos(tilt)
    heart = _soft((1.0 - np.hypot(hu / ah, hv / bh)) * bh, ppx)
    med_w = rng.uniform(0.1, 0.14) + 0.03 * np.clip(Y + 0.2, 0, None)
    knob = _soft(0.075 - np.hypot(X - 0.12, Y + 0.28), ppx)
    mediastinum = np.maximum(_soft(med_w - np.abs(X + 0.01), ppx) * _soft(heart_y - Y, ppx), knob)
    soft_level = rng.uniform(0.54, 0.58)
    dense = np.maximum(heart, mediastinum)
    img = img * (1 - dense) + soft_level * dense
    trachea = _soft(0.03 - np.abs(X + 0.005), ppx) * _soft(-0.3 - Y, ppx) * body
    img = img - 0.2 * trachea

    # gastric bubble under the left hemidiaphragm (image right)
    y_top_left = lung_yc + 0.62 * lung_b
    bubble = _soft(1.0 - np.hypot((X - 0.33) / 0.09, (Y - y_top_left - 0.14) / 0.05), 0.05)
    img = img - 0.25 * bubble * (1 - np.maximum(lungs[1], 0))

    # upper abdomen below the diaphragm is as dense as the heart, so the heart's lower border merges
    below = (
        _soft(Y - (lung_yc + 0.62 * lung_b), 4 * ppx) * body * (1 - np.maximum(lungs[-1], lungs[1]))
    )
    img = img + 0.05 * below

    # pleural effusions: dependent fluid with a meniscus rising laterally
    fluid_total = np.zeros_like(img)
    # own stream: adding / removing an effusion leaves the rest of the patient unchanged
    erng = np.random.default_rng([params.seed_state, 0xEFF])
    for side_name, frac, _sev in params.effusion:
        side = 1 if side_name == "left" else -1
        u = side * X
        y_top = lung_yc + 0.62 * lung_b - (right_higher if side < 0 else 0.0)
        apex = lung_yc - lung_b
        level = y_top - frac * (y_top - apex)
        lat = np.clip((u - 0.1) / (thorax_half - 0.1), 0, 1)
        meniscus = level - erng.uniform(0.12, 0.2) * lat**2
        # density fades upward over a few pixels (fluid layering), sharp below
        fluid = np.clip(0.3 + (Y - meniscus) / (4.0 * ppx), 0, 1) ** 1.5 * lungs[side]
        img = img * (1 - fluid) + erng.uniform(0.5, 0.56) * fluid
        fluid_total = np.maximum(fluid_total, fluid)

    # bones: posterior ribs, clavicles, spine
    rib_lines = []
    n_ribs = int(rng.integers(8, 11))
    y0 = rng.uniform(-0.92, -0.84)
    spacing = rng.uniform(0.14, 0.17)
    curv = rng.uniform(0.9, 1.4)
    rib_w = rng.uniform(0.04, 0.055) / px * scale
    for side in (-1, 1):
        for k in range(n_ribs):
            u = np.linspace(0.07, thorax_half + 0.04, 12)
            yk = y0 + k * spacing + rng.normal(0, 0.008)
            y = yk - 0.22 * (u - 0.07) + curv * (u - 0.07) ** 2
            rib_lines.append((to_pixels(side * u, y), rib_w))
    ribs = draw_polylines(size, rib_lines)
    thorax = _soft(thorax_half + 0.06 - np.abs(X), ppx) * _soft(0.62 - Y, 4 * ppx)
    aerated = np.maximum(collapsed[-1], collapsed[1]) * (1 - fluid_total) * (1 - heart)
    img = img + rng.uniform(0.06, 0.09) * ribs * thorax * (0.35 + 0.65 * aerated)
    clav_lines = []
    for side in (-1, 1):
        u = np.linspace(0.06, 0.62, 8)
        y = -0.7 - 0.2 * (u - 0.06) + 0.12 * (u - 0.34) ** 2 + rng.uniform(-0.03, 0.03)
        clav_lines.append((to_pixels(side * u, y), rng.uniform(0.045, 0.06) / px * scale))
    img = img + 0.14 * draw_polylines(size, clav_lines) * body
    spine = _soft(0.075 - np.abs(X), ppx) * body
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * (Y - y0) / spacing * 1.0)
    img = img + (0.05 + 0.03 * vert) * spine

    # acquisition: blur, exposure curve, noise
    img = ndimage.gaussian_filter(img, 0.55 * size / 64)
    gamma = rng.uniform(0.8, 1.25)
    gain = rng.uniform(0.9, 1.08)
    offset = rng.uniform(-0.04, 0.04)
    img = offset + gain * np.clip(img, 0, 1) ** gamma
    img = img + rng.normal(0, rng.uniform(0.008, 0.018), img.shape)
    return to_uint8(img, 255.0)


# --------------------------------------------------------------------------- reports

_SIZE_WORD = {"small": ("small", "small", "trace"), "moderate": ("moderate",), "large": ("large",)}


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def report(
    findings: Sequence[str] | str,
    rng: np.random.Generator,
    params: ChestParams | None = None,
) -> str:
    """Short radiology-style report for a finding set, with varied phrasing.

    Positive sentences never contain negation words, so :func:`findings_from_report` recovers
    the findings exactly. Severity and pneumothorax side come from ``params`` when given.
    """
    fs = set(canonical_findings(findings))
    sev: dict[str, str] = {}
    ptx_side = "left" if rng.random() < 0.5 else "right"
    ptx_sev = SEVERITIES[int(rng.integers(0, 3))]
    if params is not None:
        sev = {side: s for side, _, s in params.effusion}
        if params.pneumothorax is not None:
            ptx_side, _, ptx_sev = params.pneumothorax
    for side in ("left", "right"):
        sev.setdefault(side, SEVERITIES[int(rng.integers(0, 3))])

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(0, len(options)))]

    def size_word(s: str) -> str:
        return pick(_SIZE_WORD[s])

    sentences: list[str] = []
    left = "pleural_effusion_left" in fs
    right = "pleural_effusion_right" in fs
    cardio = "cardiomegaly" in fs
    if left and right and cardio and rng.random() < 0.4:
        w = size_word(sev["left"])
        sentences.append(
            pick(
                (
                    f"Cardiomegaly with {w} bilateral pleural effusions",
                    f"Enlarged cardiac silhouette with {w} bilateral effusions",
                )
            )
        )
        cardio = left = right = False
    if left and right:
        if sev["left"] == sev["right"] or rng.random() < 0.5:
            w = size_word(sev["left"])
            sentences.append(
                pick(
                    (
                        f"{_cap(w)} bilateral pleural effusions",
                        f"Bilateral {w} pleural effusions",
                        f"There are {w} bilateral effusions",
                    )
                )
            )
        else:
            sentences.append(f"{_cap(size_word(sev['left']))} left pleural effusion")
            sentences.append(f"{_cap(size_word(sev['right']))} right pleural effusion")
        left = right = False
    for flag, side in ((left, "left"), (right, "right")):
        if flag:
            w = size_word(sev[side])
            sentences.append(
                pick(
                    (
                        f"{_cap(w)} {side} pleural effusion",
                        f"There is a {w} {side}-sided pleural effusion",
                        f"{_cap(w)} {side} effusion with blunting of the {side} costophrenic angle",
                        f"{_cap(side)} pleural effusion, {w}",
                    )
                )
            )
    if cardio:
        sentences.append(
            pick(
                (
                    "Cardiomegaly",
                    "The heart is enlarged",
                    "Enlarged cardiac silhouette",
                    "Moderate cardiomegaly",
                    "Cardiac silhouette is enlarged",
                )
            )
        )
    if "pneumothorax" in fs:
        w = ptx_sev
        apical = " apical" if w == "small" and rng.random() < 0.5 else ""
        sentences.append(
            pick(
                (
                    f"{_cap(w)} {ptx_side}{apical} pneumothorax",
                    f"There is a {w} {ptx_side} pneumothorax",
                    f"{_cap(ptx_side)} pneumothorax, {w}, with a visible pleural line",
                )
            )
        )
    if len(sentences) > 1 and rng.random() < 0.3:
        rng.shuffle(sentences)

    # negative statements for what is absent (sometimes), always something for a normal film
    negatives: list[str] = []
    has_eff = bool(fs & {"pleural_effusion_left", "pleural_effusion_right"})
    if "cardiomegaly" not in fs and (fs == {"no_finding"} or rng.random() < 0.6):
        negatives.append(
            pick(
                (
                    "Heart size normal",
                    "Heart size is within normal limits",
                    "Normal cardiac silhouette",
                )
            )
        )
    if not has_eff and "pneumothorax" not in fs and rng.random() < 0.6:
        negatives.append(
            pick(("No pleural effusion or pneumothorax", "No effusion or pneumothorax"))
        )
    else:
        if not has_eff and rng.random() < 0.5:
            negatives.append(pick(("No pleural effusion", "No effusion")))
        if "pneumothorax" not in fs and rng.random() < 0.5:
            negatives.append("No pneumothorax")
    if fs == {"no_finding"}:
        negatives.insert(
            0,
            pick(
                (
                    "No acute cardiopulmonary abnormality",
                    "Lungs are clear",
                    "Normal chest radiograph",
                    "No acute cardiopulmonary process",
                )
            ),
        )
    return " ".join(_cap(s) + "." for s in sentences + negatives)


_NEGATION = re.compile(r"\b(no|not|without|normal|negative|clear|unremarkable)\b")


def findings_from_report(text: str) -> tuple[str, ...]:
    """Rule-based labeller (inverse of :func:`report`): findings asserted in ``text``."""
    found: set[str] = set()
    for sentence in re.split(r"[.;\n]+", text.lower()):
        if not sentence.strip() or _NEGATION.search(sentence):
            continue
        if "effusion" in sentence:
            if "bilateral" in sentence or ("left" in sentence and "right" in sentence):
                found |= {"pleural_effusion_left", "pleural_effusion_right"}
            elif "left" in sentence:
                found.add("pleural_effusion_left")
            elif "right" in sentence:
                found.add("pleural_effusion_right")
        if "cardiomegaly" in sentence or (
            "enlarged" in sentence and ("heart" in sentence or "cardiac" in sentence)
        ):
            found.add("cardiomegaly")
        if "pneumothorax" in sentence:
            found.add("pneumothorax")
    return canonical_findings(sorted(found))


# --------------------------------------------------------------------------- batches


class ChestBatch(NamedTuple):
    """A generated batch: images uint8 [n, H, W], multi-hot labels int8 [n, 5] over FINDINGS."""

    images: np.ndarray
    labels: np.ndarray
    reports: list[str]
    findings: list[tuple[str, ...]]
    params: list[ChestParams]


def generate(
    n: int,
    *,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    findings: Sequence[Sequence[str]] | Sequence[str] | None = None,
) -> ChestBatch:
    """``n`` radiographs with ground-truth labels and one report each.

    ``findings``: None samples from :data:`FINDING_SETS`; one finding set (e.g.
    ``["cardiomegaly"]``) is used for every image; a list of ``n`` sets gives one per image.
    """
    n = check_count(n)
    size = check_size(size, MIN_SIZE)
    per_item: list[Sequence[str] | None]
    if findings is None:
        per_item = [None] * n
    elif len(findings) > 0 and all(isinstance(f, str) for f in findings):
        per_item = [[f for f in findings if isinstance(f, str)]] * n
    else:
        per_item = [list(f) for f in findings]
        if len(per_item) != n:
            raise InvalidArgument.for_field("findings", f"needs n={n} finding sets")
    images = np.empty((n, size, size), dtype=np.uint8)
    params_list: list[ChestParams] = []
    reports: list[str] = []
    for i in range(n):
        rng = item_rng(seed, i)
        p = sample_params(rng, size, per_item[i])
        images[i] = render(p)
        params_list.append(p)
        reports.append(report(p.findings, rng, p))
    truth = [ground_truth(p) for p in params_list]
    labels = np.stack([multi_hot(t) for t in truth]) if n else np.zeros((0, len(FINDINGS)), np.int8)
    return ChestBatch(images, labels, reports, truth, params_list)
