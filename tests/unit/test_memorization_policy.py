"""The memorization gate's decisions and the pieces that carry an index to Triton."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from clinisynth_server.errors import FailedPrecondition
from clinisynth_server.similarity import gate
from clinisynth_server.similarity.index import (
    INDEX_DIR,
    build_index,
    component_info,
    save_component,
)

FAR = gate.Check(distance=0.9, threshold=0.2, row=3, embedding_distance=0.4)
NEAR = gate.Check(distance=0.01, threshold=0.2, row=5, embedding_distance=0.0)


def test_policy_names() -> None:
    assert gate.check_policy("") == gate.DEFAULT_POLICY == "regenerate"
    assert gate.check_policy(" Refuse ") == "refuse"
    with pytest.raises(ValueError, match="must be one of"):
        gate.check_policy("sometimes")


@pytest.mark.parametrize("policy", gate.POLICIES)
def test_an_unflagged_image_is_always_kept(policy: str) -> None:
    assert gate.decide(policy, FAR, tries=1) == "keep"


def test_flagged_image_per_policy() -> None:
    assert gate.decide("flag", NEAR, tries=1) == "keep"
    assert gate.decide("off", NEAR, tries=1) == "keep"
    assert gate.decide("refuse", NEAR, tries=1) == "refuse"
    assert gate.decide("regenerate", NEAR, tries=1, max_tries=3) == "resample"
    assert gate.decide("regenerate", NEAR, tries=2, max_tries=3) == "resample"
    assert gate.decide("regenerate", NEAR, tries=3, max_tries=3) == "refuse"


def test_threshold_is_strict() -> None:
    """At exactly the threshold an image is not a near-copy (``distance < threshold``)."""
    assert not gate.Check(0.2, 0.2, 0, 0.0).flagged
    assert gate.Check(np.nextafter(0.2, 0.0), 0.2, 0, 0.0).flagged


def test_verdicts_and_provenance_fields() -> None:
    assert gate.verdict("flag", NEAR, 1, "d" * 64, "ext").decision == "flagged"
    assert gate.verdict("regenerate", FAR, 2, "d", "ext").decision == "regenerated"
    kept = gate.verdict("regenerate", FAR, 1, "d" * 64, "clinisynth-features-v1")
    assert kept.decision == "passed"
    fields = kept.provenance()
    assert fields["memorization"] == "passed"
    assert float(fields["memorization_distance"]) == pytest.approx(0.9)
    assert float(fields["memorization_threshold"]) == pytest.approx(0.2)
    assert fields["memorization_index"] == "d" * 64
    assert fields["memorization_extractor"] == "clinisynth-features-v1"
    assert gate.Verdict(gate.NO_INDEX).provenance() == {"memorization": "no index"}


def test_refusal_names_distance_and_threshold() -> None:
    err = gate.refusal("regenerate", 2, NEAR, 3)
    assert isinstance(err, FailedPrecondition) and err.code == "FAILED_PRECONDITION"
    assert "0.010000" in err.message and "0.200000" in err.message
    assert "after 3 samples" in err.message
    assert err.reason == gate.REASON
    assert err.metadata["distance"] == "0.010000" and err.metadata["threshold"] == "0.200000"


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, 16, 16)).astype(np.float32)


def test_served_index_folder_and_backend(tmp_path: pathlib.Path) -> None:
    """The component folder loads in the Triton backend; a training image is its own copy."""
    from clinisynth_server.triton.backends import similarity as backend

    train = _images(12, 0)
    index = build_index([train])
    folder = tmp_path / INDEX_DIR
    save_component(index, folder)
    assert json.loads((folder / "config.json").read_text())["extractor"] == index.extractor
    info = component_info(folder)
    assert info is not None and info["count"] == 12
    assert info["memorization_threshold"] == pytest.approx(index.thresholds.memorization)
    assert component_info(tmp_path / "absent") is None

    model = backend.Backend(folder, {}, "cpu")
    queries = np.concatenate([train[:3], _images(3, 1)])[:, None]  # [B, 1, H, W]
    out = model({"images": queries})
    assert out["pixel_index"][:3].tolist() == [0, 1, 2]
    assert (out["pixel_distance"][:3] < 1e-3).all()
    assert out["memorized"].tolist() == [True, True, True, False, False, False]


def test_job_index_of_training_layout(tmp_path: pathlib.Path) -> None:
    """A job indexes its [N, C, H, W] training array; one image gives no index (no calibration)."""
    from clinisynth_server.finetune import memorization

    train = _images(6, 2)[:, None]
    index = memorization.from_array(train, seed=1, source="job x")
    assert index is not None and index.count == 6 and index.meta["source"] == "job x"
    found = index.nearest(np.transpose(train[:2], (0, 2, 3, 1)))
    assert index.memorized(found).all()
    memorization.write(index, tmp_path / "model")
    assert component_info(tmp_path / "model" / INDEX_DIR) is not None
    assert memorization.from_array(train[:1]) is None
    memorization.write(None, tmp_path / "none")
    assert not (tmp_path / "none").exists()
