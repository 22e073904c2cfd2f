"""Retired versions and aliases in the catalog: the one resolver of model references."""

from __future__ import annotations

import pathlib

import pytest

from clinisynth_lab import builders
from clinisynth_server import registry
from clinisynth_server.catalog import Catalog
from clinisynth_server.errors import FailedPrecondition, InvalidArgument
from clinisynth_server.store import open_store


@pytest.fixture()
def catalog(tmp_path: pathlib.Path) -> Catalog:
    store = open_store(str(tmp_path / "store"))
    catalog = Catalog(store, ttl_s=0.0)
    folder = builders.build_pixel_unet(tmp_path / "m", classes=["a", "b"], size=16)
    for _ in range(2):
        registry.register_folder(
            folder, "px", catalog=catalog, store=store, model_repository=tmp_path / "repo"
        )
    return catalog


def test_alias_resolves_where_versions_do_and_moves(catalog: Catalog) -> None:
    catalog.set_alias(catalog.get("px", "1"), "stable")
    assert catalog.get("px", "stable").version == 1
    catalog.set_alias(catalog.get("px", "2"), "stable")
    assert catalog.get("px", "stable").version == 2
    with pytest.raises(InvalidArgument) as err:
        catalog.get("px", "nightly")
    assert [v.field for v in err.value.violations] == ["model.version"]
    for bad in ("3", "", "a/b", "x" * 65):
        with pytest.raises(InvalidArgument) as err:
            catalog.set_alias(catalog.get("px", "1"), bad)
        assert [v.field for v in err.value.violations] == ["alias"]


def test_a_retired_version_is_neither_served_nor_listed_but_resolvable(catalog: Catalog) -> None:
    catalog.set_alias(catalog.get("px", "2"), "stable")
    catalog.retire(catalog.get("px", "2"))
    assert [r.version for r in catalog.list(all_versions=True)] == [1]
    assert catalog.get("px").version == 1 and catalog.is_latest(catalog.get("px", "1"))
    for ref in ("2", "stable"):
        with pytest.raises(FailedPrecondition) as err:
            catalog.get("px", ref)
        assert err.value.reason == "MODEL_RETIRED"
    assert catalog.get("px", "2", include_retired=True).version == 2
    assert catalog.next_version("px") == 3  # numbers are never reused
    catalog.retire(catalog.get("px", "1"))
    with pytest.raises(FailedPrecondition):
        catalog.get("px")
    with pytest.raises(FailedPrecondition):
        catalog.set_alias(catalog.get("px", "1", include_retired=True), "back")
