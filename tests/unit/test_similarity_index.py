"""The similarity index: near-copies flagged, new images not, other domains far, files checked."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from clinisynth_lab.phantoms import cells, fundus
from clinisynth_server.similarity import features
from clinisynth_server.similarity.index import (
    META_FILE,
    ROWS_FILE,
    IndexFileError,
    SimilarityIndex,
    build_index,
)


@pytest.fixture(scope="module")
def eyes() -> np.ndarray:
    return fundus.generate(240, seed=3, size=32)[0].astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def index(eyes: np.ndarray) -> SimilarityIndex:
    return build_index([eyes[:100], eyes[100:200]])


def test_rows_do_not_depend_on_the_batch(eyes: np.ndarray) -> None:
    # Per-image features: an image's row is the same alone or in a batch (float64 inside, so the
    # only difference allowed is none).
    np.testing.assert_array_equal(features.embed(eyes[:5])[2], features.embed(eyes[2:3])[0])
    np.testing.assert_array_equal(
        features.thumbnails(eyes[:5])[4], features.thumbnails(eyes[4:5])[0]
    )


def test_near_copies_are_flagged_and_new_images_are_not(
    eyes: np.ndarray, index: SimilarityIndex
) -> None:
    rng = np.random.default_rng(0)
    copies = np.clip(eyes[:50] + rng.normal(0.0, 0.01, eyes[:50].shape), 0.0, 1.0)
    shifted = np.clip(eyes[50:100] * 0.9 + 0.05, 0.0, 1.0)  # contrast / brightness do not hide it
    near = index.nearest(copies)
    assert index.memorized(near).all()
    np.testing.assert_array_equal(near.pixel_index, np.arange(50))
    assert index.memorized(index.nearest(shifted)).all()
    held_out = index.nearest(eyes[200:])  # other patients of the same distribution
    assert not index.memorized(held_out).any()
    assert (index.domain_score(held_out) < index.thresholds.domain).all()


def test_other_domains_score_far_outside(index: SimilarityIndex) -> None:
    smear = cells.generate(20, seed=1)[0].astype(np.float32) / 255.0
    score = index.domain_score(index.nearest(smear))
    assert (score > index.thresholds.domain).all(), score
    assert index.out_of_domain(index.nearest(smear)).all()


def test_thresholds_follow_the_calibration(index: SimilarityIndex) -> None:
    cal = index.calibration
    assert cal.count == 200 and cal.sample == 200
    assert 0 < cal.pixel_q05 <= cal.pixel_median
    assert index.thresholds.memorization == pytest.approx(0.5 * cal.pixel_q05)
    stricter = index.with_thresholds(memorization_ratio=0.25, domain_threshold=5.0)
    assert stricter.thresholds.memorization == pytest.approx(0.25 * cal.pixel_q05)
    assert stricter.thresholds.domain == 5.0


def test_duplicates_in_the_training_set_keep_a_positive_scale(eyes: np.ndarray) -> None:
    idx = build_index([np.concatenate([eyes[:20], eyes[:20]])])
    assert idx.thresholds.memorization > 0
    assert idx.memorized(idx.nearest(eyes[:20])).all()


def test_save_load_round_trip_and_tamper_checks(
    index: SimilarityIndex, eyes: np.ndarray, tmp_path: pathlib.Path
) -> None:
    index.save(tmp_path)
    loaded = SimilarityIndex.load(tmp_path)
    assert loaded.calibration == index.calibration and loaded.thresholds == index.thresholds
    a, b = index.nearest(eyes[:7]), loaded.nearest(eyes[:7])
    np.testing.assert_array_equal(a.pixel_index, b.pixel_index)
    np.testing.assert_array_equal(a.pixel_distance, b.pixel_distance)

    rows = tmp_path / ROWS_FILE
    blob = bytearray(rows.read_bytes())
    blob[-1] ^= 0x01
    rows.write_bytes(bytes(blob))
    with pytest.raises(IndexFileError, match="digest"):
        SimilarityIndex.load(tmp_path)

    index.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["extractor"] = "another-extractor"
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="rebuild"):
        SimilarityIndex.load(tmp_path)
    with pytest.raises(IndexFileError, match="unreadable"):
        SimilarityIndex.load(tmp_path / "missing")


def test_one_image_cannot_be_calibrated(eyes: np.ndarray) -> None:
    with pytest.raises(ValueError, match="two"):
        build_index([eyes[:1]])
