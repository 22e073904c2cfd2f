"""The out-of-domain guard's decisions (services/clinisynth_server/similarity/guard.py): the
policy names, the score against the recorded calibration, refusal details, what counts as an
indexed model, and the index a model folder gets from a folder of training images."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from clinisynth_server.catalog import ModelRecord
from clinisynth_server.errors import FailedPrecondition, InvalidArgument
from clinisynth_server.similarity import guard
from clinisynth_server.similarity.index import (
    INDEX_DIR,
    build_index,
    component_info,
    save_component,
)


def _record(similarity: dict[str, object] | None, component: bool = True) -> ModelRecord:
    return ModelRecord(
        name="fundus-cf",
        version=3,
        kind="unconditional",
        components={"similarity": "fundus-cf.similarity"} if component else {},
        component_versions={"similarity": 3} if component else {},
        extra={} if similarity is None else {"similarity": similarity},
    )


INDEXED = _record(
    {"digest": "ab" * 32, "extractor": "x-v1", "embedding_q99": 0.1, "domain_threshold": 2.0}
)


@pytest.mark.parametrize(
    ("value", "policy"), [("", "refuse"), ("warn", "warn"), (" Refuse ", "refuse")]
)
def test_policy_names_and_the_default(value: str, policy: str) -> None:
    assert guard.check_policy(value, "domain_guard") == policy
    assert guard.DEFAULT_POLICY == "refuse"


def test_an_unknown_policy_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        guard.check_policy("ignore", "config.domain_guard")
    assert [v.field for v in info.value.violations] == ["config.domain_guard"]


def test_the_score_is_the_distance_in_units_of_the_training_spacing() -> None:
    checks = guard.judge("warn", INDEXED, [0.05, 0.2, 0.3], ["images[0]", "images[1]", "images[2]"])
    assert [c.score for c in checks] == pytest.approx([0.5, 2.0, 3.0])
    # "above the threshold" is strict: a score equal to it is still in domain
    assert [c.decision for c in checks] == [guard.IN_DOMAIN, guard.IN_DOMAIN, guard.OUT_OF_DOMAIN]
    assert {(c.threshold, c.policy, c.index_digest, c.extractor) for c in checks} == {
        (2.0, "warn", "ab" * 32, "x-v1")
    }


def test_refuse_names_the_field_score_and_threshold() -> None:
    with pytest.raises(FailedPrecondition) as info:
        guard.judge("refuse", INDEXED, [0.01, 0.45], ["images[0]", "images[1]"])
    err = info.value
    assert err.reason == guard.REASON == "OUT_OF_DOMAIN_INPUT"
    assert err.message.startswith("images[1]: out of domain for fundus-cf@3")
    assert "domain score 4.500" in err.message and "threshold 2.000" in err.message
    assert err.metadata["field"] == "images[1]"
    assert float(err.metadata["domain_score"]) == pytest.approx(4.5)
    assert float(err.metadata["threshold"]) == pytest.approx(2.0)
    assert err.metadata["policy"] == "refuse" and err.metadata["model"] == "fundus-cf@3"


def test_refuse_passes_inputs_in_domain() -> None:
    checks = guard.judge("refuse", INDEXED, [0.01, 0.19], ["image", "image"])
    assert not any(c.out_of_domain for c in checks)


def test_a_non_finite_distance_is_out_of_domain() -> None:
    (check,) = guard.judge("warn", INDEXED, [math.nan], ["image"])
    assert check.out_of_domain and check.score == math.inf


def test_models_without_a_usable_index_are_not_guarded_and_say_so() -> None:
    assert guard.index_of(INDEXED) is not None
    assert guard.index_of(_record(None)) is None  # no index recorded
    assert guard.index_of(_record({"digest": "x"})) is None  # recorded before the guard
    assert guard.index_of(_record({"embedding_q99": 0.1}, component=False)) is None
    unguarded = guard.DomainGuard(triton=None).check(
        _record(None), np.zeros((2, 3, 8, 8)), policy="refuse", fields=["a", "b"]
    )  # no Triton call is made for an unindexed model
    assert [c.decision for c in unguarded] == [guard.NO_INDEX] * 2
    assert all(c.score is None for c in unguarded)


def test_calibration_is_read_from_an_index_folder(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    index = build_index([rng.random((6, 16, 16, 3))], domain_threshold=3.5)
    save_component(index, tmp_path / INDEX_DIR)
    got = component_info(tmp_path / INDEX_DIR)
    assert got is not None
    assert got["embedding_q99"] == pytest.approx(index.calibration.embedding_q99)
    assert got["domain_threshold"] == 3.5
    assert component_info(tmp_path / "nothing") is None


def test_an_index_is_built_for_a_model_folder_from_training_images(tmp_path: pathlib.Path) -> None:
    from clinisynth_lab.phantoms import fundus

    images, _, _ = fundus.generate(8, seed=4, size=32)
    (tmp_path / "train" / "sub").mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "train" / ("sub" if i % 2 else "") / f"{i}.png")
    assert guard.main([str(tmp_path / "train"), str(tmp_path / "model")]) == 0
    from clinisynth_server.similarity.index import SimilarityIndex

    built = SimilarityIndex.load(tmp_path / "model" / INDEX_DIR)
    assert built.count == 8 and (tmp_path / "model" / INDEX_DIR / "config.json").is_file()
    assert guard.main([]) == 2


def test_ct_and_ultrasound_phantoms_are_deterministic_and_look_their_part() -> None:
    from clinisynth_lab.phantoms import ct, ultrasound

    for module in (ct, ultrasound):
        batch = module.generate(4, seed=3, size=40)
        assert batch.shape == (4, 40, 40) and batch.dtype == np.uint8
        assert np.array_equal(batch[:2], module.generate(2, seed=3, size=40))  # a prefix
        assert np.array_equal(batch[1], module.render(3, 1, size=40))
        assert not np.array_equal(batch[0], batch[1])
        assert module.generate(0).shape == (0, 64, 64)
    slice_ = ct.render(0, 0).astype(float)
    assert slice_[:4].mean() < 20  # air above the body
    assert slice_.max() > 200  # bone
    frame = ultrasound.render(0, 0).astype(float)
    assert frame[-1, 0] == 0 and frame[-1, -1] == 0  # outside the fan is black
    assert frame[40, 32] > 0  # the sector under the probe holds speckle
