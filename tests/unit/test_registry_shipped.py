"""Shipped demo models: registered once, re-registered when a release ships them retrained, and
never registered over the user's own version of the same name."""

from __future__ import annotations

import json
import pathlib

from clinisynth_lab import builders
from clinisynth_server import registry
from clinisynth_server.catalog import Catalog
from clinisynth_server.store import open_store


def _ship(root: pathlib.Path, name: str, release: int) -> pathlib.Path:
    """A shipped folder; another release retrained it (other weights, other metadata)."""
    from safetensors.torch import load_file, save_file

    folder = builders.build_pixel_unet(root / name, classes=["a", "b"], size=16)
    weights = next((folder / "unet").glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v + 0.01 * release for k, v in state.items()}, weights)
    (folder / "clinisynth.json").write_text(
        json.dumps({"classes": ["a", "b"], "description": f"release {release}"})
    )
    return folder


def _register_updates(shipped: pathlib.Path, catalog: Catalog, store, repo) -> list[str]:  # type: ignore[no-untyped-def]
    done = []
    for folder, digest in registry.shipped_updates(shipped, catalog):
        registry.register_folder(
            folder,
            folder.name,
            catalog=catalog,
            store=store,
            model_repository=repo,
            labels={registry.SHIPPED_LABEL: digest},
        )
        done.append(folder.name)
    return done


def test_shipped_models_register_once_and_upgrade_when_retrained(tmp_path: pathlib.Path) -> None:
    store = open_store(str(tmp_path / "store"))
    catalog = Catalog(store, ttl_s=0)
    repo = tmp_path / "repo"
    repo.mkdir()
    shipped = tmp_path / "shipped"
    _ship(shipped, "cells", release=0)
    _ship(shipped, "mine", release=0)
    (shipped / "not-a-model").mkdir()  # no clinisynth.json: ignored

    assert _register_updates(shipped, catalog, store, repo) == ["cells", "mine"]
    assert _register_updates(shipped, catalog, store, repo) == []  # second start: nothing new

    # The user promotes their own version of "mine" (no shipped label) ...
    own = builders.build_pixel_unet(tmp_path / "own", classes=["a", "b"], size=16)
    registry.register_folder(own, "mine", catalog=catalog, store=store, model_repository=repo)
    # ... then a release ships both models retrained.
    _ship(shipped, "cells", release=1)
    _ship(shipped, "mine", release=1)
    assert _register_updates(shipped, catalog, store, repo) == ["cells"]
    cells = catalog.get("cells")
    assert cells.version == 2
    assert cells.labels[registry.SHIPPED_LABEL] == registry.folder_digest([shipped / "cells"])
    assert (
        catalog.get("mine").version == 2
        and registry.SHIPPED_LABEL not in catalog.get("mine").labels
    )
    assert _register_updates(shipped, catalog, store, repo) == []
