"""Bring your own scorer through the running stack, with the async SDK: a reward folder and a
classifier folder import, serve (the reward scores images by name@version), and retire.

Real Triton, real gRPC (finetune + reward services); the folders are written by the project's
own writers from tiny untrained models (weights do not matter here, serving does).
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest

import clinisynth
from tests.conftest import import_services

pytestmark = pytest.mark.stack
CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def folders(session_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    import torch

    from clinisynth_lab.toy import write_classifier_folder
    from clinisynth_server.methods.classifier import Classifier, ClassifierConfig
    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.reward.scoring import write_reward_folder

    torch.manual_seed(0)
    base = session_dir / "byom-scorers"
    reward = write_reward_folder(
        RewardModel(RewardModelConfig(num_classes=2, in_channels=1, backbone_width=4)),
        base / "reward",
        classes=CLASSES,
        width=16,
        labels={"domain": "skin"},
    )
    classifier = write_classifier_folder(
        base / "classifier",
        Classifier(ClassifierConfig(num_classes=2, in_channels=1, backbone_width=4)),
        classes=CLASSES,
        size=16,
        channels=1,
        robust=False,
        domain="skin",
    )
    return {"reward": reward, "classifier": classifier}


@pytest.fixture(scope="module")
def services(triton_server, store_url, session_dir, model_repository) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    home = session_dir / "byom-scorers-home"
    with import_services(
        "reward", triton_server.grpc_url, store_url, home, model_repository
    ) as endpoints:
        yield endpoints


async def _poll_score(client: clinisynth.AsyncClient, image: np.ndarray, model: str) -> list:  # type: ignore[type-arg]
    """Score until the reward service's catalog cache sees the new version (~2 s)."""
    for _ in range(50):
        try:
            return await client.score([image], class_name="malignant", model=model)
        except clinisynth.InvalidArgumentError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"the reward service never served {model}")


def test_async_reward_folder_import_scores_and_retires(services, folders) -> None:  # type: ignore[no-untyped-def]
    image = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)

    async def scenario() -> None:
        events: list[clinisynth.ProgressEvent] = []
        async with clinisynth.AsyncClient(endpoints=services, timeout=300) as client:
            details = await client.import_model(
                folders["reward"], name="byom-reward", progress=events.append
            )
            assert details.model.kind == "reward" and details.model.classes == CLASSES
            assert [c.role for c in details.components] == ["scorer"]
            assert details.components[0].ready
            assert [e.stage for e in events if e.stage != "upload"][-1] == "record"

            ref = f"byom-reward@{details.version}"
            scores = await _poll_score(client, image, ref)
            assert len(scores) == 1 and 0.0 <= scores[0].p_aligned <= 1.0
            assert scores[0].model_version == ref

            shown = await client.get_model(ref)
            assert shown.model.digest == details.model.digest and not shown.retired
            gone = await client.delete_model(ref)
            assert gone.retired and not any(c.ready for c in gone.components)

    asyncio.run(scenario())


def test_classifier_folder_import_is_served_then_retired(services, folders) -> None:  # type: ignore[no-untyped-def]
    with clinisynth.Client(endpoints=services, timeout=300) as client:
        details = client.import_model(folders["classifier"], name="byom-classifier")
        assert details.model.kind == "classifier" and details.model.classes == CLASSES
        assert [c.role for c in details.components] == ["classifier"]
        assert details.components[0].ready
        ref = f"byom-classifier@{details.version}"
        shown = client.get_model("byom-classifier")  # the latest served version
        assert shown.version == details.version and shown.model.digest == details.model.digest
        gone = client.delete_model(ref)
        assert gone.retired and not any(c.ready for c in gone.components)
        assert client.get_model(ref).retired  # provenance stays resolvable
