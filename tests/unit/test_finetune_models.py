"""Base models: a served catalog model becomes a plain diffusers folder again (from the Triton
model repository + the store's tokenizer), and store prefixes are recognised by their files."""

from __future__ import annotations

import pathlib

import pytest

from clinisynth_lab import builders
from clinisynth_server import registry
from clinisynth_server.catalog import Catalog
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.finetune import models
from clinisynth_server.store import open_store


@pytest.fixture()
def env(tmp_path: pathlib.Path):  # type: ignore[no-untyped-def]
    store = open_store(str(tmp_path / "store"))
    repo = tmp_path / "repo"
    repo.mkdir()
    return store, Catalog(store, ttl_s=0), repo


def test_catalog_text_to_image_round_trips(env, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    store, catalog, repo = env
    folder = builders.build_text_to_image(tmp_path / "sd", size=32, image_channels=1)
    registry.register_folder(folder, "sd-tiny", catalog=catalog, store=store, model_repository=repo)
    base = models.resolve("sd-tiny", catalog, store, field_name="params[base_model]")
    assert base.kind == "text_to_image" and base.record is not None
    out = models.materialize(base, tmp_path / "out", store=store, model_repository=str(repo))
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.tokenizer("left pleural effusion").input_ids[1:4] != [0, 0, 0]
    assert pipe.unet.config.in_channels == 4


def test_catalog_pixel_model_and_store_prefixes(env, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import UNet2DModel

    store, catalog, repo = env
    folder = builders.build_pixel_unet(tmp_path / "px", classes=["a", "b"], size=16)
    registry.register_folder(folder, "px", catalog=catalog, store=store, model_repository=repo)
    base = models.resolve("px@1", catalog, store, field_name="f")
    assert (base.kind, base.classes) == ("class_conditional", ["a", "b"])
    out = models.materialize(base, tmp_path / "out", store=store, model_repository=str(repo))
    assert UNet2DModel.from_pretrained(out / "unet").config.num_class_embeds == 2

    store.upload_dir(folder, "models/px")
    prefix = models.resolve("models/px", catalog, store, field_name="f")
    assert (prefix.kind, prefix.classes) == ("class_conditional", ["a", "b"])
    with pytest.raises(InvalidArgument) as err:
        models.resolve("nope", catalog, store, field_name="params[base_model]")
    assert err.value.violations[0].field == "params[base_model]"
    with pytest.raises(InvalidArgument):
        models.resolve("models/missing", catalog, store, field_name="f")
