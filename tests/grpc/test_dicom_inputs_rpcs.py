"""Bad DICOM through the running services, and what the SDK sends as item names (issue #19
items 6 and 2): real reward and counterfactual services (real gRPC status codes, real store).

A handful of the corruptions of ``tests/unit/test_decode_dicom_inputs.py`` go to reward Score
and counterfactual CreateCounterfactual: each is INVALID_ARGUMENT naming the field and the
problem, never INTERNAL. Then the SDK enqueues local files for review by path: the stored items
carry the base name (or the caller's ``names``), nothing of the caller's folders.
"""

from __future__ import annotations

import json
import pathlib

import grpc
import numpy as np
import pytest
from PIL import Image

import clinisynth
from clinisynth.v1 import (
    common_pb2,
    counterfactual_pb2,
    counterfactual_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)
from tests.unit.test_decode_dicom_inputs import CORRUPTIONS

pytestmark = pytest.mark.stack

#: One corruption per failure class the services must name (id → words in the message).
CASES = {
    "cut-in-pixels-middle": "truncated",
    "cut-last-byte": "truncated",
    "unknown-vr-rows": "Rows",
    "missing-BitsAllocated": "missing BitsAllocated",
    "photometric-cmyk": "CMYK",
    "syntax-mpeg2": "unsupported transfer syntax",
    "garbage-JPEG 2000 Image Compression": "1.2.840.10008.1.2.4.91",
}
BAD = {name: data for name, data, _ in CORRUPTIONS if name in CASES}


@pytest.fixture(scope="module")
def services(triton_server, store_url, session_dir, reward_model):  # type: ignore[no-untyped-def]
    """Reward and counterfactual services; a reward model for the class is registered, so
    Score reaches the image (without one it stops at ``model.name`` first)."""
    from tests.conftest import start_service

    home = session_dir / "dicom-inputs"
    reward = start_service("reward", triton_server.grpc_url, store_url, home / "reward")
    cf = start_service("counterfactual", triton_server.grpc_url, store_url, home / "cf")
    channels = [grpc.insecure_channel(s.address) for s in (reward, cf)]
    yield (
        reward,
        reward_pb2_grpc.RewardServiceStub(channels[0]),
        counterfactual_pb2_grpc.CounterfactualServiceStub(channels[1]),
    )
    for channel in channels:
        channel.close()
    reward.stop(0)
    cf.stop(0)


def _refused(call, words: str, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details() and words in info.value.details(), info.value.details()


@pytest.mark.parametrize("case", sorted(CASES))
def test_score_refuses_bad_dicom_naming_the_problem(services, case: str) -> None:  # type: ignore[no-untyped-def]
    _, reward, _ = services
    request = reward_pb2.ScoreRequest(
        images=[common_pb2.Image(dicom=BAD[case])],
        condition=common_pb2.Condition(class_name="neutrophil"),
    )
    _refused(lambda: reward.Score(request, timeout=60), CASES[case], "images[0]")


@pytest.mark.parametrize("case", sorted(CASES))
def test_counterfactual_refuses_bad_dicom_naming_the_problem(services, case: str) -> None:  # type: ignore[no-untyped-def]
    _, _, cf = services
    request = counterfactual_pb2.CounterfactualRequest(
        image=common_pb2.Image(dicom=BAD[case]),
        target_class="neutrophil",
        diffusion_model=common_pb2.ModelRef(name="absent-denoiser"),
        robust_classifier=common_pb2.ModelRef(name="absent-robust"),
        plain_classifier=common_pb2.ModelRef(name="absent-plain"),
    )
    _refused(lambda: cf.CreateCounterfactual(request, timeout=60), CASES[case], "image.dicom")


def _png(path: pathlib.Path, seed: int) -> pathlib.Path:
    """A unique image per file: review items are content-addressed, so no two may collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_review_items_never_carry_the_callers_folders(services, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reward_server, _, _ = services
    secret_dir = tmp_path / "Doe_John_1970" / "study-4711"
    files = [_png(secret_dir / f"cell{i}.png", 1000 + i) for i in range(2)]
    labelled = _png(secret_dir / "cell-labelled.png", 1002)
    with clinisynth.Client(endpoints={"reward": reward_server.address}, timeout=60) as client:
        by_path = client.review.enqueue(files, class_name="neutrophil")
        by_label = client.review.enqueue(
            [str(labelled)], class_name="neutrophil", names=["batch7-item1"]
        )
    names = []
    for item in by_path + by_label:
        stored = store.get_bytes(f"review/items/{item.id}.json")
        assert b"Doe_John" not in stored and str(tmp_path).encode() not in stored
        names.append(json.loads(stored)["name"])
    assert names == ["cell0.png", "cell1.png", "batch7-item1"]
