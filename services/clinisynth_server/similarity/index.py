"""The similarity index of a model's training images: near-copy and domain checks against it.

Built once from the training images (:func:`build_index`), stored beside the checkpoint as
``similarity.safetensors`` (the rows) + ``similarity.json`` (extractor version, calibration,
thresholds, digest) — no pickle — and loaded wherever images are compared with it.

Calibration is leave-one-out on the training set itself: for a sample of training images, the
distance to the nearest *other* training image. Those distances say how close two distinct images
of this distribution usually are, so both thresholds are relative to them:

- **memorization** (thumbnail distance): a generated image closer to a training image than
  ``memorization_ratio`` × the 5th percentile of the leave-one-out distances is a near-copy;
- **domain score**: an input's embedding distance to its nearest training image divided by the
  99th percentile of the leave-one-out embedding distances; above ``domain_threshold`` it lies far
  outside the training distribution.

The index names no image: neighbours are row numbers, never file names or patient identifiers.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from clinisynth_server.similarity import features

ROWS_FILE = "similarity.safetensors"
META_FILE = "similarity.json"
DEFAULT_MEMORIZATION_RATIO = 0.5
DEFAULT_DOMAIN_THRESHOLD = 2.0
_CALIBRATION_SAMPLE = 1024
_QUERY_CHUNK = 64
_FLOOR = 1e-6  # a training set of identical images still gets positive scales
_DUPLICATE = 1e-3  # rows closer than this are the same image (float32 rounding of unit rows)


class IndexFileError(ValueError):
    """An index file that is missing, malformed, of another extractor version, or tampered."""


@dataclass(frozen=True)
class Calibration:
    """Leave-one-out nearest-neighbour distances of the training set (what "close" means)."""

    count: int
    sample: int
    pixel_q05: float
    pixel_median: float
    embedding_median: float
    embedding_q99: float


@dataclass(frozen=True)
class Thresholds:
    memorization: float  # thumbnail distance; below it a generated image is a near-copy
    domain: float  # domain score; above it an input is out of domain


@dataclass(frozen=True)
class Neighbours:
    """Per query image: the nearest training row and distance, in each view."""

    pixel_distance: np.ndarray
    pixel_index: np.ndarray
    embedding_distance: np.ndarray
    embedding_index: np.ndarray


def nearest_rows(
    query: np.ndarray,
    base: np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    beyond: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean nearest row of ``base`` for each ``query`` row: (distance, index).

    ``exclude[i]`` (a row of ``base``) is skipped for query ``i``, and so is every row within
    ``beyond`` of it — leave-one-out calibration that also looks past exact duplicates.
    """
    if len(base) == 0:
        raise IndexFileError("the index has no rows")
    q = np.asarray(query, dtype=np.float32)
    b = np.asarray(base, dtype=np.float32)
    b_sq = np.einsum("ij,ij->i", b, b)
    dist = np.empty(len(q), dtype=np.float32)
    idx = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), _QUERY_CHUNK):
        chunk = q[start : start + _QUERY_CHUNK]
        d2 = b_sq[None, :] - 2.0 * (chunk @ b.T) + np.einsum("ij,ij->i", chunk, chunk)[:, None]
        if exclude is not None:
            rows = np.arange(len(chunk))
            d2[rows, exclude[start : start + len(chunk)]] = np.inf
        if beyond > 0:
            d2[d2 <= beyond * beyond] = np.inf
        best = np.argmin(d2, axis=1)
        idx[start : start + len(chunk)] = best
        dist[start : start + len(chunk)] = np.sqrt(np.maximum(d2[np.arange(len(chunk)), best], 0.0))
    return dist, idx


@dataclass(frozen=True)
class SimilarityIndex:
    """Training rows in both views, with the calibration and thresholds derived from them."""

    embeddings: np.ndarray  # [N, D] float32, unit norm
    thumbnails: np.ndarray  # [N, P] float32, zero mean, unit norm
    calibration: Calibration
    thresholds: Thresholds
    extractor: str = features.EXTRACTOR
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.embeddings)

    def nearest(self, images: np.ndarray) -> Neighbours:
        """Nearest training image of each of ``images`` (``[N, H, W(, C)]`` in [0, 1])."""
        pd, pi = nearest_rows(features.thumbnails(images), self.thumbnails)
        ed, ei = nearest_rows(features.embed(images), self.embeddings)
        return Neighbours(pd, pi, ed, ei)

    def memorized(self, neighbours: Neighbours) -> np.ndarray:
        """True where an image is a near-copy of a training image."""
        return np.asarray(neighbours.pixel_distance < self.thresholds.memorization)

    def domain_score(self, neighbours: Neighbours) -> np.ndarray:
        """Embedding distance in units of the training set's own 99th-percentile spacing."""
        scale = max(self.calibration.embedding_q99, _FLOOR)
        return np.asarray(neighbours.embedding_distance / scale, dtype=np.float32)

    def out_of_domain(self, neighbours: Neighbours) -> np.ndarray:
        return self.domain_score(neighbours) > self.thresholds.domain

    def with_thresholds(
        self, *, memorization_ratio: float | None = None, domain_threshold: float | None = None
    ) -> SimilarityIndex:
        """The same rows under other thresholds (a model's settings override the defaults)."""
        return SimilarityIndex(
            self.embeddings,
            self.thumbnails,
            self.calibration,
            _thresholds(self.calibration, memorization_ratio, domain_threshold),
            self.extractor,
            self.meta,
        )

    # ------------------------------------------------------------------ files

    def save(self, folder: str | pathlib.Path) -> list[pathlib.Path]:
        """Write the two files into ``folder``; returns their paths."""
        from safetensors.numpy import save_file

        out = pathlib.Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        rows = out / ROWS_FILE
        save_file(
            {
                "embeddings": np.ascontiguousarray(self.embeddings, dtype=np.float32),
                "thumbnails": np.ascontiguousarray(self.thumbnails, dtype=np.float32),
            },
            str(rows),
        )
        meta = {
            "extractor": self.extractor,
            "count": self.count,
            "calibration": asdict(self.calibration),
            "thresholds": asdict(self.thresholds),
            "rows_sha256": hashlib.sha256(rows.read_bytes()).hexdigest(),
            "meta": dict(self.meta),
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return [rows, out / META_FILE]

    @classmethod
    def load(cls, folder: str | pathlib.Path) -> SimilarityIndex:
        """Read and check an index folder (extractor version, digest, shapes, finite rows)."""
        from safetensors.numpy import load_file

        root = pathlib.Path(folder)
        try:
            meta = json.loads((root / META_FILE).read_text())
            raw = (root / ROWS_FILE).read_bytes()
        except (OSError, ValueError) as exc:
            raise IndexFileError(f"similarity index in {root.name!r} is unreadable: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("extractor") != features.EXTRACTOR:
            found = meta.get("extractor") if isinstance(meta, dict) else None
            raise IndexFileError(
                f"similarity index extractor {found!r} is not {features.EXTRACTOR!r}: "
                "rebuild the index"
            )
        if hashlib.sha256(raw).hexdigest() != meta.get("rows_sha256"):
            raise IndexFileError(f"{ROWS_FILE} does not match the digest in {META_FILE}")
        tensors = load_file(str(root / ROWS_FILE))
        emb, thumbs = tensors.get("embeddings"), tensors.get("thumbnails")
        dims = features.dimensions()
        if (
            emb is None
            or thumbs is None
            or emb.ndim != 2
            or thumbs.ndim != 2
            or len(emb) != len(thumbs)
            or (emb.shape[1], thumbs.shape[1]) != dims
            or len(emb) != meta.get("count")
            or not (np.isfinite(emb).all() and np.isfinite(thumbs).all())
        ):
            raise IndexFileError(f"{ROWS_FILE} has unexpected shapes or values")
        try:
            calibration = Calibration(**meta["calibration"])
            thresholds = Thresholds(**meta["thresholds"])
        except (KeyError, TypeError) as exc:
            raise IndexFileError(f"{META_FILE} is malformed: {exc}") from exc
        return cls(emb, thumbs, calibration, thresholds, meta["extractor"], meta.get("meta", {}))


def _quantile(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q)) if len(values) else 0.0


def _thresholds(
    cal: Calibration, memorization_ratio: float | None, domain_threshold: float | None
) -> Thresholds:
    ratio = DEFAULT_MEMORIZATION_RATIO if memorization_ratio is None else memorization_ratio
    domain = DEFAULT_DOMAIN_THRESHOLD if domain_threshold is None else domain_threshold
    return Thresholds(memorization=ratio * max(cal.pixel_q05, _FLOOR), domain=domain)


def build_index(
    batches: Iterable[np.ndarray],
    *,
    memorization_ratio: float | None = None,
    domain_threshold: float | None = None,
    calibration_sample: int = _CALIBRATION_SAMPLE,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
) -> SimilarityIndex:
    """Index the training images (batches of ``[n, H, W(, C)]`` in [0, 1]) and calibrate.

    Needs at least two images (leave-one-out has nothing to compare with one). Exact duplicates in
    the training set are left out of the near-copy scale, so a set with repeats still flags copies.
    """
    emb_parts: list[np.ndarray] = []
    thumb_parts: list[np.ndarray] = []
    for batch in batches:
        if len(batch) == 0:
            continue
        emb_parts.append(features.embed(batch))
        thumb_parts.append(features.thumbnails(batch))
    if not emb_parts or sum(len(p) for p in emb_parts) < 2:
        raise ValueError("a similarity index needs at least two training images")
    emb = np.concatenate(emb_parts)
    thumbs = np.concatenate(thumb_parts)
    rng = np.random.default_rng(seed)
    n = len(emb)
    sample = np.sort(rng.choice(n, size=min(n, calibration_sample), replace=False))
    pd, _ = nearest_rows(thumbs[sample], thumbs, exclude=sample, beyond=_DUPLICATE)
    ed, _ = nearest_rows(emb[sample], emb, exclude=sample, beyond=_DUPLICATE)
    distinct, ed = pd[np.isfinite(pd)], ed[np.isfinite(ed)]
    cal = Calibration(
        count=n,
        sample=len(sample),
        pixel_q05=_quantile(distinct, 0.05),
        pixel_median=_quantile(distinct, 0.5),
        embedding_median=_quantile(ed, 0.5),
        embedding_q99=_quantile(ed, 0.99),
    )
    return SimilarityIndex(
        emb,
        thumbs,
        cal,
        _thresholds(cal, memorization_ratio, domain_threshold),
        features.EXTRACTOR,
        dict(meta or {}),
    )


#: The sub-folder of a checkpoint / model folder that holds its index (a Triton component folder).
INDEX_DIR = "similarity"
COMPONENT_CONFIG = "config.json"


def save_component(index: SimilarityIndex, folder: str | pathlib.Path) -> list[pathlib.Path]:
    """Write ``index`` as a servable folder: the two index files plus a small ``config.json``.

    The ``config.json`` is what makes the folder a Triton component folder (the repository copies
    it as the ``similarity`` role's weights); it repeats the extractor and digest for readers.
    """
    out = pathlib.Path(folder)
    paths = index.save(out)
    meta = json.loads((out / META_FILE).read_text())
    config = {
        "_class_name": "SimilarityIndex",
        "extractor": meta["extractor"],
        "rows_sha256": meta["rows_sha256"],
        "count": meta["count"],
    }
    (out / COMPONENT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return [*paths, out / COMPONENT_CONFIG]


def component_info(folder: str | pathlib.Path) -> dict[str, Any] | None:
    """What the catalog records of an index folder (digest, extractor, count, thresholds).

    None when ``folder`` holds no index; :class:`IndexFileError` when it holds a broken one.
    """
    root = pathlib.Path(folder)
    if not (root / META_FILE).is_file():
        return None
    index = SimilarityIndex.load(root)
    meta = json.loads((root / META_FILE).read_text())
    return {
        "digest": str(meta["rows_sha256"]),
        "extractor": index.extractor,
        "count": index.count,
        "memorization_threshold": float(index.thresholds.memorization),
        "pixel_q05": float(index.calibration.pixel_q05),
        # The input side (the out-of-domain guard): the domain scale and its threshold.
        "embedding_q99": float(index.calibration.embedding_q99),
        "domain_threshold": float(index.thresholds.domain),
        "source": str(index.meta.get("source", "")),
    }
