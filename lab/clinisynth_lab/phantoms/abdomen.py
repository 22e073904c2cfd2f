"""Axial abdominal-CT-like phantoms with captions: a *different* domain for pretraining.

Why: the Stable-Diffusion adaptation benchmark (docs/METHODS.md §2) needs a text-to-image model that
was pretrained on something other than chest X-rays and is then adapted to them. This module is
that source domain: grayscale axial slices (soft-tissue window) of the upper abdomen with
image-caption pairs, sharing some vocabulary with chest reports (sizes, left / right) but none of
the anatomy. Default 64x64.

Findings (:data:`FINDINGS`, multi-hot order): ``normal``, ``liver_lesion`` (hypodense round
lesion), ``kidney_cyst`` (left or right kidney), ``ascites`` (fluid rim around the liver).
Radiological orientation: the patient's right (liver) is on the image's left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from clinisynth_lab.phantoms._common import check_count, check_size, item_rng, to_uint8
from clinisynth_server.errors import InvalidArgument

FINDINGS: tuple[str, ...] = ("normal", "liver_lesion", "kidney_cyst", "ascites")
DEFAULT_SIZE = 64
MIN_SIZE = 32


def _ellipse(
    X: np.ndarray, Y: np.ndarray, cx: float, cy: float, a: float, b: float, ang: float, px: float
) -> np.ndarray:
    dx, dy = X - cx, Y - cy
    u = dx * math.cos(ang) + dy * math.sin(ang)
    v = -dx * math.sin(ang) + dy * math.cos(ang)
    d = (1.0 - np.hypot(u / a, v / b)) * min(a, b)
    return np.clip(0.5 + d / px, 0.0, 1.0)


def _sample_findings(rng: np.random.Generator) -> tuple[str, ...]:
    found = [
        f
        for f, p in (("liver_lesion", 0.3), ("kidney_cyst", 0.25), ("ascites", 0.2))
        if rng.random() < p
    ]
    return tuple(found) or ("normal",)


def _canonical(findings: Sequence[str]) -> tuple[str, ...]:
    items = set([findings] if isinstance(findings, str) else findings)
    if items - set(FINDINGS):
        raise InvalidArgument.for_field(
            "findings", f"unknown findings {sorted(items - set(FINDINGS))}"
        )
    if "normal" in items and len(items) > 1:
        raise InvalidArgument.for_field("findings", "normal cannot be combined with findings")
    return tuple(f for f in FINDINGS if f in items) or ("normal",)


def render(
    rng: np.random.Generator, size: int, findings: tuple[str, ...]
) -> tuple[np.ndarray, str]:
    """One slice (uint8 [size, size]) and its caption; ``rng`` fixes the patient."""
    px = 2.0 / size
    lin = (np.arange(size) + 0.5) * px - 1.0
    Y, X = np.meshgrid(lin, lin, indexing="ij")
    bw, bh = rng.uniform(0.78, 0.92), rng.uniform(0.58, 0.7)
    img = np.zeros((size, size))
    body = _ellipse(X, Y, 0, 0.05, bw, bh, 0, px)
    fat = rng.uniform(0.25, 0.32)
    img = img * (1 - body) + fat * body
    muscle = _ellipse(X, Y, 0, 0.06, bw - 0.08, bh - 0.08, 0, px)
    img = img * (1 - muscle) + 0.5 * muscle
    inner = _ellipse(X, Y, 0, 0.04, bw - 0.14, bh - 0.14, 0, px)
    img = img * (1 - inner) + rng.uniform(0.38, 0.42) * inner  # mesenteric fat / bowel
    details: list[str] = []

    liver = (
        _ellipse(
            X,
            Y,
            -0.33,
            -0.05,
            rng.uniform(0.36, 0.44),
            rng.uniform(0.32, 0.4),
            rng.uniform(-0.3, 0.1),
            px,
        )
        * inner
    )
    if "ascites" in findings:
        rim = ndimage.binary_dilation(liver > 0.5, iterations=max(2, size // 24)) & (inner > 0.5)
        img = np.where(rim & (liver < 0.5), rng.uniform(0.3, 0.34), img)  # fluid: near water
        details.append(
            rng.choice(
                [
                    "with ascites",
                    "with free fluid around the liver",
                    "with a small amount of ascites",
                ]
            )
        )
    img = img * (1 - liver) + rng.uniform(0.6, 0.66) * liver
    spleen = _ellipse(X, Y, 0.5, -0.02, 0.14, 0.22, 0.4, px) * inner
    img = img * (1 - spleen) + 0.58 * spleen
    stomach = _ellipse(X, Y, 0.18, -0.3, 0.2, 0.13, 0.3, px) * inner
    img = img * (1 - stomach) + 0.45 * stomach
    gas = _ellipse(X, Y, 0.18, -0.36, 0.12, 0.05, 0.2, px) * stomach
    img = img * (1 - gas) + 0.02 * gas
    kidneys = {}
    for side, name in ((-1, "right"), (1, "left")):
        k = _ellipse(X, Y, side * rng.uniform(0.28, 0.34), 0.33, 0.1, 0.15, side * 0.4, px)
        kidneys[name] = k
        img = img * (1 - k) + 0.66 * k
    aorta = _ellipse(X, Y, 0.05, 0.2, 0.06, 0.06, 0, px)
    img = img * (1 - aorta) + 0.7 * aorta
    vert = _ellipse(X, Y, 0, 0.42, 0.13, 0.12, 0, px)
    img = img * (1 - vert) + 0.95 * vert
    canal = _ellipse(X, Y, 0, 0.52, 0.04, 0.035, 0, px)
    img = img * (1 - canal) + 0.45 * canal
    for _ in range(int(rng.integers(3, 7))):  # bowel loops with gas
        bx, by = rng.uniform(-0.1, 0.3), rng.uniform(0.0, 0.3)
        loop = _ellipse(X, Y, bx, by, 0.05, 0.04, 0, px) * inner * (1 - liver) * (1 - aorta)
        img = img * (1 - loop) + 0.08 * loop

    size_word = ""
    if "liver_lesion" in findings:
        r = rng.uniform(0.05, 0.12)
        size_word = "small" if r < 0.08 else "large"
        ang = rng.uniform(0, 2 * np.pi)
        lx, ly = -0.33 + 0.16 * math.cos(ang), -0.05 + 0.14 * math.sin(ang)
        les = _ellipse(X, Y, lx, ly, r, r * rng.uniform(0.8, 1), 0, px) * (liver > 0.5)
        img = img * (1 - les) + 0.42 * les
        details.insert(0, f"a {size_word} hypodense lesion in the liver")
    if "kidney_cyst" in findings:
        cyst_side = "left" if rng.random() < 0.5 else "right"
        sx = 1 if cyst_side == "left" else -1
        cyst = _ellipse(X, Y, sx * 0.31, 0.33 + rng.uniform(-0.05, 0.05), 0.055, 0.055, 0, px)
        img = img * (1 - cyst) + 0.36 * cyst
        details.append(f"a simple cyst in the {cyst_side} kidney")

    img = ndimage.gaussian_filter(img, 0.5 * size / 64)
    img = img + rng.normal(0, rng.uniform(0.01, 0.025), img.shape)
    if details:
        body_txt = " and ".join(str(d) for d in details)
        caption = str(
            rng.choice(
                [
                    f"Axial CT of the abdomen showing {body_txt}.",
                    f"Abdominal CT slice with {body_txt}.",
                    f"CT abdomen: {body_txt}.",
                ]
            )
        )
    else:
        caption = str(
            rng.choice(
                [
                    "Axial CT of the abdomen, normal study.",
                    "Normal abdominal CT slice.",
                    "CT abdomen without abnormality.",
                ]
            )
        )
    return to_uint8(img, 255.0), caption


class AbdomenBatch(NamedTuple):
    """Images uint8 [n, H, W], multi-hot labels int8 [n, 4] over FINDINGS, captions."""

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]
    findings: list[tuple[str, ...]]


def generate(
    n: int,
    *,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    findings: Sequence[str] | None = None,
) -> AbdomenBatch:
    """``n`` slices with captions; ``findings`` fixes one finding set for all (None: sampled)."""
    n = check_count(n)
    size = check_size(size, MIN_SIZE)
    images = np.empty((n, size, size), dtype=np.uint8)
    caps: list[str] = []
    fsets: list[tuple[str, ...]] = []
    for i in range(n):
        rng = item_rng(seed, i)
        fs = _canonical(findings) if findings is not None else _sample_findings(rng)
        images[i], cap = render(rng, size, fs)
        caps.append(cap)
        fsets.append(fs)
    labels = np.array([[1 if f in fs else 0 for f in FINDINGS] for fs in fsets], dtype=np.int8)
    return AbdomenBatch(images, labels.reshape(n, len(FINDINGS)), caps, fsets)
