"""The packed serving layout without Triton: repository layout, config text, record, numbers.

A packed model is one Triton model per served version whose process holds every component; its
config declares each component's tensors as optional ``<role>__<tensor>`` and its parameters as
``<role>__<key>``. Each component's weights lie at ``<repo>/<address>/<version>/weights`` (the
path code reading weights by address uses in both layouts). In process, the packed backend gives
each component's outputs bit for bit equal to the split backends' on the same inputs.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np
import pytest

from clinisynth_lab import builders
from clinisynth_server import registry
from clinisynth_server.catalog import Catalog
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.finetune.imports import ImportOptions, check_options
from clinisynth_server.store import open_store
from clinisynth_server.triton import packing, repository
from clinisynth_server.triton.backends import denoiser, packed, text_encoder, vae_decode
from clinisynth_server.triton.backends._base import merges

ROLES = ("denoiser", "text_encoder", "vae_decode")
_PARAM = re.compile(r'parameters: \{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}')


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return builders.build_text_to_image(
        tmp_path_factory.mktemp("packed") / "chest", size=32, image_channels=1
    )


def _register(root: pathlib.Path, folder: pathlib.Path, layout: str, **kw: Any) -> Any:
    store = open_store(str(root / "store"))
    repo = root / "repo"
    repo.mkdir(exist_ok=True)
    record = registry.register_folder(
        folder,
        "chest",
        catalog=Catalog(store, ttl_s=0.0),
        store=store,
        model_repository=repo,
        layout=layout,
        **kw,
    )
    return record, repo


def _parameters(config: str) -> dict[str, str]:
    return dict(_PARAM.findall(config))


def test_packed_registration_writes_one_triton_model_holding_every_component(
    tmp_path: pathlib.Path, chest: pathlib.Path
) -> None:
    record, repo = _register(
        tmp_path,
        chest,
        "packed",
        instance_count=2,
        triton_parameters={"torch_dtype": "float32", "batch_invariant": "true"},
        role_parameters={"vae_decode": {"torch_dtype": "float32", "extra_knob": "7"}},
    )
    assert record.extra["layout"] == "packed"
    assert record.components == {r: f"chest.packed/{r}" for r in ROLES}
    assert repository.list_models(repo) == ["chest.packed"]  # no per-component Triton model
    assert repository.list_versions(repo, "chest.packed") == [record.version]
    for role, address in record.components.items():
        weights = repo / address / str(record.version) / "weights"
        assert (weights / "config.json").is_file(), role  # where code reading weights looks
    assert repository.packed_component_versions(repo, "chest.packed") == {
        r: [record.version] for r in sorted(ROLES)
    }
    manifest = json.loads(
        (repo / "chest.packed" / str(record.version) / "weights" / "config.json").read_text()
    )
    assert manifest["components"]["denoiser"] == {
        "module": "clinisynth_server.triton.backends.denoiser",
        "weights": f"../../denoiser/{record.version}/weights",
    }
    config = (repo / "chest.packed" / "config.pbtxt").read_text()
    assert "{ kind: KIND_CPU count: 2 }" in config
    # every component's inputs, prefixed and optional (a request carries one component's)
    for name in ("denoiser__sample", "text_encoder__input_ids", "vae_decode__latents"):
        line = next(ln for ln in config.splitlines() if f'name: "{name}"' in ln)
        assert "optional: true" in line, line
    assert 'name: "denoiser__timestep" data_type: TYPE_FP32 dims: [ 1 ] reshape' in config
    for name in ("denoiser__noise_pred", "text_encoder__last_hidden_state", "vae_decode__image"):
        line = next(ln for ln in config.splitlines() if f'name: "{name}"' in ln)
        assert "optional" not in line, line
    params = _parameters(config)
    assert params["clinisynth_role"] == "packed"
    assert params["packed_roles"] == "denoiser,text_encoder,vae_decode"
    assert params["denoiser__unet_class"] == "UNet2DConditionModel"  # the role spec's own
    assert params["vae_decode__extra_knob"] == "7"
    assert "denoiser__extra_knob" not in params  # a role's parameter stays that role's
    assert params["batch_invariant"] == "true"  # shared ones also at the top (the entry reads)
    vae = packing.component_parameters(params, "vae_decode")
    assert (vae["extra_knob"], vae["batch_invariant"]) == ("7", "true")
    assert "clinisynth_role" not in vae and "packed_roles" not in vae
    assert "extra_knob" not in packing.component_parameters(params, "denoiser")


def test_split_is_the_default_and_records_its_layout(
    tmp_path: pathlib.Path, chest: pathlib.Path
) -> None:
    record, repo = _register(tmp_path, chest, "")
    assert record.extra["layout"] == "split"
    assert record.components == {r: f"chest.{r}" for r in ROLES}
    assert repository.list_models(repo) == sorted(f"chest.{r}" for r in ROLES)


def test_packed_refuses_components_on_different_devices(
    tmp_path: pathlib.Path, chest: pathlib.Path
) -> None:
    with pytest.raises(InvalidArgument) as info:
        _register(tmp_path, chest, "packed", role_instance_kinds={"vae_decode": "gpu"})
    assert info.value.violations[0].field == "layout"
    assert "one device" in info.value.violations[0].description


def test_an_unknown_layout_is_refused_by_field(tmp_path: pathlib.Path, chest: pathlib.Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        _register(tmp_path, chest, "bundled")
    assert info.value.violations[0].field == "layout"
    _, errors = check_options(ImportOptions(source="imports/abc", name="m", layout="bundled"))
    assert [v.field for v in errors.violations] == ["layout"]


def test_addresses_and_tensor_names_round_trip() -> None:
    assert packing.split_address("chest.packed/vae_decode") == ("chest.packed", "vae_decode")
    assert packing.split_address("chest.vae_decode") == ("chest.vae_decode", "")
    assert packing.served_model("chest.packed/denoiser") == "chest.packed"
    assert packing.split_tensor_name("vae_decode__image") == ("vae_decode", "image")
    assert packing.split_tensor_name("image") == ("", "image")
    with pytest.raises(InvalidArgument):
        packing.address("m.packed", "bad__role")


def test_packed_backend_gives_the_split_backends_numbers_bit_for_bit(
    tmp_path: pathlib.Path, chest: pathlib.Path
) -> None:
    record, repo = _register(tmp_path, chest, "packed")
    config = (repo / "chest.packed" / "config.pbtxt").read_text()
    backend = packed.Backend(
        repo / "chest.packed" / str(record.version) / "weights", _parameters(config), "cpu"
    )
    rng = np.random.default_rng(0)
    dim = int(json.loads((chest / "unet" / "config.json").read_text())["cross_attention_dim"])
    cases = {
        "text_encoder": (
            text_encoder,
            chest / "text_encoder",
            {"input_ids": rng.integers(0, 50, (2, 77), dtype=np.int64)},
        ),
        "denoiser": (
            denoiser,
            chest / "unet",
            {
                "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
                "timestep": np.array([10.0, 500.0], np.float32),
                "encoder_hidden_states": rng.standard_normal((2, 77, dim), dtype=np.float32),
            },
        ),
        "vae_decode": (
            vae_decode,
            chest / "vae",
            {"latents": rng.standard_normal((2, 4, 16, 16), dtype=np.float32)},
        ),
    }
    for role, (module, weights, inputs) in cases.items():
        alone = module.Backend(weights, {}, "cpu")(inputs)
        both = backend({packing.tensor_name(role, n): a for n, a in inputs.items()})
        assert sorted(both) == sorted(packing.tensor_name(role, n) for n in alone), role
        for name, value in alone.items():
            np.testing.assert_array_equal(both[packing.tensor_name(role, name)], value, role)
    with pytest.raises(ValueError, match="exactly one component"):
        backend({"denoiser__sample": cases["denoiser"][2]["sample"], "vae_decode__latents": 0})
    # Triton may merge queued requests only where the routed component would: never the
    # batch-invariant denoiser's, the row-by-row text encoder's and VAE's yes; a bad one runs alone.
    assert [
        merges(backend, {packing.tensor_name(role, n): a for n, a in inputs.items()})
        for role, (_, _, inputs) in cases.items()
    ] == [True, False, True]
    assert not merges(backend, {"nothing__here": np.zeros(1)})


def test_a_packed_input_error_names_the_callers_input() -> None:
    from clinisynth_server.triton.client import _unprefixed

    err = InvalidArgument.for_field(
        "inputs.vae_decode__latents", "unexpected shape for input 'vae_decode__latents'"
    )
    out = _unprefixed(err, "vae_decode")
    assert [v.field for v in out.violations] == ["inputs.latents"]
    assert "'latents'" in out.message and "__" not in out.message


def test_code_reading_weights_by_address_finds_a_packed_components(
    tmp_path: pathlib.Path,
) -> None:
    from clinisynth_server.counterfactual.guidance import _weights

    folder = builders.build_pixel_unet(tmp_path / "ddpm", size=16)
    store = open_store(str(tmp_path / "store"))
    repo = tmp_path / "repo"
    repo.mkdir()
    record = registry.register_folder(
        folder,
        "cf-denoiser",
        catalog=Catalog(store, ttl_s=0.0),
        store=store,
        model_repository=repo,
        layout="packed",
    )
    found = _weights(repo, record, "denoiser")  # what the counterfactual guidance model links
    assert found == repo / "cf-denoiser.packed" / "denoiser" / str(record.version) / "weights"
    assert (found / "config.json").read_bytes() == (folder / "unet" / "config.json").read_bytes()
