"""A reward-filtered Generate that names no reward model defaults to one its caller may see.

The generator's scorer (runtime/dependencies.py) resolves the default reward model in the
caller's view of the catalog, so another tenant's private reward model is never picked; with no
visible model the request is refused by field, before any Triton call.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument, Unavailable
from clinisynth_server.runtime.config import load_config
from clinisynth_server.runtime.dependencies import Dependencies
from clinisynth_server.store import open_store
from clinisynth_server.tenancy import Viewer


def _reward(name: str, tenant: str) -> ModelRecord:
    return ModelRecord(
        name,
        1,
        "reward",
        {"scorer": f"{name}.scorer"},
        {"scorer": 1},
        classes=["lymphocyte"],
        width=8,
        height=8,
        labels={"tenant": tenant},
    )


@pytest.fixture()
def catalog(tmp_path: pathlib.Path) -> Catalog:
    catalog = Catalog(open_store(str(tmp_path / "store")), ttl_s=0.0)
    catalog.put(_reward("a-reward", tenant="a"))
    return catalog


def test_another_tenants_private_reward_model_is_not_the_default(
    catalog: Catalog, tmp_path: pathlib.Path
) -> None:
    # The generator's scorer, as its app builds it (nothing listens on the Triton address:
    # reaching Triton — UNAVAILABLE — shows the default resolved to a model).
    env = {
        "CLINISYNTH_STORE_URL": str(tmp_path / "store"),
        "CLINISYNTH_TRITON_URL": "127.0.0.1:1",
    }
    deps = Dependencies.open(load_config("generator", env=env, port=0))
    scorer = deps.reward_scorer()
    images = np.zeros((1, 8, 8), dtype=np.float32)
    try:
        with pytest.raises(InvalidArgument) as refused:
            scorer(images, "lymphocyte", "", "", catalog=catalog.seen_by(Viewer("b")))
        assert "no reward model is registered" in str(refused.value)
        assert refused.value.violations[0].field.startswith("reward_filter.reward_model")
        # Tenant a's own view, and an admin's, find it and go on to Triton.
        for viewer in (Viewer("a"), Viewer("ops", admin=True)):
            with pytest.raises(Unavailable):
                scorer(images, "lymphocyte", "", "", catalog=catalog.seen_by(viewer))
    finally:
        deps.close()
