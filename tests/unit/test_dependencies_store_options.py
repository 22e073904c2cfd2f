"""Per-service store settings (CLINISYNTH_<SERVICE>_STORE_<OPTION>) reach the store parsed, and a
bad one is refused by its variable's name before the service starts."""

from __future__ import annotations

import pathlib

import pytest

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.runtime.config import load_config
from clinisynth_server.runtime.dependencies import Dependencies


def _config(tmp_path: pathlib.Path, **extra: str):  # type: ignore[no-untyped-def]
    env = {"CLINISYNTH_STORE_URL": str(tmp_path / "store"), "CLINISYNTH_TRITON_URL": "127.0.0.1:1"}
    env.update(extra)
    return load_config("reward", env=env, port=0, metrics_port=0)


@pytest.mark.parametrize(
    ("name", "value"),
    [("READ_TIMEOUT_S", "soon"), ("CONNECT_TIMEOUT_S", "-1"), ("RETRIES", "2.5")],
)
def test_bad_per_service_store_timeouts_are_named(tmp_path, name: str, value: str) -> None:  # type: ignore[no-untyped-def]
    variable = f"CLINISYNTH_REWARD_STORE_{name}"
    with pytest.raises(InvalidArgument) as err:
        Dependencies.open(_config(tmp_path, **{variable: value}))
    assert err.value.violations[0].field == variable


def test_good_per_service_store_timeouts_open(tmp_path) -> None:  # type: ignore[no-untyped-def]
    deps = Dependencies.open(
        _config(
            tmp_path,
            CLINISYNTH_REWARD_STORE_READ_TIMEOUT_S="5",
            CLINISYNTH_REWARD_STORE_RETRIES="1",
        )
    )
    try:
        assert deps.store.exists("nothing/here") is False
    finally:
        deps.close()
