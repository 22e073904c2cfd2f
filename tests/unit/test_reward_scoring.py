"""Preprocessing and model choice shared by the reward service and reward-filtered generation."""

from __future__ import annotations

import numpy as np
import pytest

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.reward.scoring import Condition, resolve_model, to_model_input
from clinisynth_server.reward.text import embed_text
from clinisynth_server.store import open_store


def record(name: str, created: float, classes: list[str], channels: int = 1) -> ModelRecord:
    extra = {"conditioning": "class"} if classes else {"conditioning": "text", "text_dim": 8}
    return ModelRecord(
        name=name,
        version=1,
        kind="reward",
        components={"scorer": f"{name}.rs"},
        component_versions={"scorer": 1},
        classes=classes,
        width=8,
        height=8,
        channels=channels,
        created=created,
        extra=extra,
    )


def test_to_model_input_channels_resize_and_size_check():
    rec = record("r", 1.0, ["a", "b"])
    gray = np.random.default_rng(0).random((8, 8), dtype=np.float32)
    rgb = np.stack([gray] * 3, axis=2)
    out = to_model_input([gray, rgb], rec, resize=False)
    assert out.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(out[0, 0], gray, atol=1e-6)
    np.testing.assert_allclose(out[1, 0], gray, atol=1e-5)  # luma of equal channels
    with pytest.raises(InvalidArgument) as info:
        to_model_input([np.zeros((16, 16), np.float32)], rec, resize=False)
    assert info.value.violations[0].field == "images[0]"
    assert to_model_input([np.zeros((16, 16), np.float32)], rec, resize=True).shape == (1, 1, 8, 8)


def test_default_model_is_the_newest_that_can_judge_the_condition(tmp_path):
    catalog = Catalog(open_store(str(tmp_path)), ttl_s=0)
    catalog.put(record("old-cells", 1.0, ["a", "b"]))
    catalog.put(record("new-cells", 2.0, ["a", "b"]))
    catalog.put(record("other", 3.0, ["c", "d"]))
    catalog.put(record("text", 4.0, []))
    assert resolve_model(catalog, "", "", Condition(class_name="a")).name == "new-cells"
    assert resolve_model(catalog, "", "", Condition(prompt="effusion")).name == "text"
    with pytest.raises(InvalidArgument):
        resolve_model(catalog, "", "", Condition(class_name="zzz"))


def test_text_embedding_is_deterministic_and_separates_findings():
    a, b, c = embed_text(
        ["small pleural effusion", "small pleural effusion", "no effusion, normal heart"], 64
    )
    np.testing.assert_array_equal(a, b)
    assert abs(np.linalg.norm(a) - 1) < 1e-6 and float(a @ c) < 0.9


def test_score_reward_field_is_a_deprecated_alias_of_p_aligned() -> None:
    """``ImageScore.reward`` repeats ``p_aligned``: deprecated, still filled for old clients."""
    from clinisynth.v1 import reward_pb2
    from clinisynth_server.reward import service as svc
    from clinisynth_server.reward.servicer import RewardServicer

    assert reward_pb2.ImageScore.DESCRIPTOR.fields_by_name["reward"].GetOptions().deprecated
    assert not reward_pb2.ImageScore.DESCRIPTOR.fields_by_name["p_aligned"].GetOptions().deprecated
    servicer = RewardServicer.__new__(RewardServicer)  # the message mapping needs no service
    msg = servicer._score_msg(svc.ImageScore(3, 0.61, record("r", 1.0, ["a", "b"])))
    assert msg.index == 3 and msg.p_aligned == pytest.approx(0.61)
    assert msg.reward == msg.p_aligned
