"""Reward-filtered generation: best-of-n and min_reward scored by a reward model in Triton."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clinisynth
from tests.conftest import CELL_CLASSES

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def cells_reward(session_dir, catalog, store, model_repository, triton_client, registered_models):
    from clinisynth_server import registry
    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.reward.scoring import write_reward_folder

    torch.manual_seed(0)
    model = RewardModel(
        RewardModelConfig(num_classes=4, in_channels=1, backbone="small_cnn", backbone_width=8)
    ).eval()
    folder = write_reward_folder(
        model,
        session_dir / "reward-filter",
        classes=CELL_CLASSES,
        width=16,
        labels={"domain": "cells"},
    )
    return registry.register_folder(
        folder,
        "cells-tiny-reward",
        catalog=catalog,
        store=store,
        model_repository=model_repository,
        triton=triton_client,
    )


def test_best_of_n_keeps_the_highest_scoring_candidates(
    sdk_client, cells_reward, catalog, triton_client
):
    from clinisynth_server.reward.scoring import score_arrays

    opts = {"class_name": "neutrophil", "steps": 3, "format": "raw", "seed": 40}
    kept = sdk_client.generate(
        "cells-tiny", n=2, best_of_n=4, reward_model="cells-tiny-reward", **opts
    )
    assert kept.candidates == 8 and len(kept.images) == 2
    # The same 8 candidates without the filter (seeds 40..47), scored independently.
    everything = sdk_client.generate("cells-tiny", n=8, **opts)
    pixels = np.stack([img.to_numpy() for img in everything.images])
    scores = score_arrays(catalog, triton_client, pixels, "neutrophil", model="cells-tiny-reward")
    best = sorted(range(8), key=lambda i: -scores[i])[:2]
    assert sorted(img.seed for img in kept.images) == sorted(40 + i for i in best)
    for img in kept.images:
        assert img.reward == pytest.approx(float(scores[img.seed - 40]), abs=1e-4)
        assert img.provenance["extra"]["reward_model"] == "cells-tiny-reward"


def test_min_reward_returns_only_passing_images(sdk_client, cells_reward, catalog, triton_client):
    from clinisynth_server.reward.scoring import score_arrays

    opts = {"class_name": "monocyte", "steps": 3, "format": "raw", "seed": 60}
    probe = sdk_client.generate("cells-tiny", n=8, **opts)
    scores = score_arrays(
        catalog,
        triton_client,
        np.stack([i.to_numpy() for i in probe.images]),
        "monocyte",
        model="cells-tiny-reward",
    )
    threshold = float(np.median(scores))
    res = sdk_client.generate(
        "cells-tiny", n=2, min_reward=threshold, reward_model="cells-tiny-reward", **opts
    )
    assert res.images and all(img.reward >= threshold for img in res.images)
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        sdk_client.generate("cells-tiny", n=1, min_reward=1.5, **opts)
    assert info.value.fields == ["reward_filter.min_reward"]
