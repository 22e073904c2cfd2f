"""Per-component dtype and device of an import: validation by field, the float16 VAE default and
its import-time decode check, and the Triton configs written (``KIND_GPU`` with a count)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from clinisynth_lab import builders
from clinisynth_server.catalog import Catalog
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.finetune import imports
from clinisynth_server.finetune.imports import ImportOptions, ImportProgress, ModelImports
from clinisynth_server.finetune.servicer import model_details
from clinisynth_server.store import open_store
from clinisynth_server.triton import repository
from clinisynth_server.triton.backends._base import ModelSpec, TensorSpec


def _fields(options: ImportOptions) -> list[str]:
    return [v.field for v in imports.check_options(options)[1].violations]


def test_unknown_component_or_value_is_named() -> None:
    options = ImportOptions(
        source="imports/u1",
        name="m",
        component_dtypes={"vae": "float64", "decoder": "float32", "unet": "bfloat16"},
        component_devices={"text_encoder": "tpu", "vae": "gpu"},
    )
    assert sorted(_fields(options)) == [
        "component_devices[text_encoder]",
        "component_dtypes[decoder]",
        "component_dtypes[vae]",
    ]


def test_vae_stays_float32_under_float16_unless_named() -> None:
    every = list(imports.COMPONENTS)
    half = imports.component_settings(ImportOptions("s", "m", dtype="float16"), every)
    assert {k: s.dtype for k, s in half.items()} == {
        "unet": "float16",
        "text_encoder": "float16",
        "vae": "float32",
    }
    assert "overflows in float16" in half["vae"].note and not half["unet"].note
    forced = imports.component_settings(
        ImportOptions(
            "s",
            "m",
            dtype="float16",
            device="gpu",
            component_dtypes={"vae": "float16"},
            component_devices={"text_encoder": "cpu"},
        ),
        every,
    )
    assert forced["vae"].dtype == "float16" and not forced["vae"].note
    assert {k: s.device for k, s in forced.items()} == {
        "unet": "gpu",
        "text_encoder": "cpu",
        "vae": "gpu",
    }
    # bfloat16 has float32's range: the VAE follows it.
    bf16 = imports.component_settings(ImportOptions("s", "m", dtype="bfloat16"), every)
    assert {s.dtype for s in bf16.values()} == {"bfloat16"}


def test_a_component_the_folder_lacks_is_named() -> None:
    options = ImportOptions(
        "s", "m", component_dtypes={"vae": "float32"}, component_devices={"unet": "gpu"}
    )
    with pytest.raises(InvalidArgument) as info:
        imports.component_settings(options, ["unet"])
    assert [v.field for v in info.value.violations] == ["component_dtypes[vae]"]


def test_gpu_config_has_a_kind_gpu_instance_group_with_its_count() -> None:
    spec = ModelSpec(
        inputs=(TensorSpec("sample", "float32", (4, -1, -1)),),
        outputs=(TensorSpec("noise_pred", "float32", (4, -1, -1)),),
    )
    text = repository.render_config(
        "m.denoiser",
        spec,
        role="denoiser",
        max_batch_size=8,
        instance_kind="gpu",
        instance_count=3,
        batching=repository.Batching(),
        keep_versions=2,
        parameters={"torch_dtype": "float16"},
    )
    lines = text.splitlines()
    start = lines.index("instance_group [")
    assert lines[start : start + 3] == ["instance_group [", "  { kind: KIND_GPU count: 3 }", "]"]
    assert 'parameters: { key: "torch_dtype" value: { string_value: "float16" } }' in lines


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return builders.build_text_to_image(
        tmp_path_factory.mktemp("sd") / "sd", size=16, image_channels=1
    )


def _imports(tmp: pathlib.Path, folder: pathlib.Path) -> ModelImports:
    store = open_store(str(tmp / "store"))
    store.upload_dir(folder, "imports/u1/")
    (tmp / "repo").mkdir()
    settings = imports.ImportSettings(model_repository=str(tmp / "repo"))
    return ModelImports(store, Catalog(store, ttl_s=0), None, settings)


def test_each_component_gets_its_own_triton_config(
    tmp_path: pathlib.Path, sd_folder: pathlib.Path
) -> None:
    service = _imports(tmp_path, sd_folder)
    events: list[ImportProgress] = []
    view = service.import_model(
        ImportOptions(
            "imports/u1",
            "half",
            dtype="float16",
            device="gpu",
            instances=2,
            component_devices={"text_encoder": "cpu"},
        ),
        events.append,
    )
    configs = {
        role: (tmp_path / "repo" / f"half.{role}" / "config.pbtxt").read_text()
        for role in ("denoiser", "text_encoder", "vae_decode")
    }
    expected = {
        "denoiser": ("GPU", "float16"),
        "text_encoder": ("CPU", "float16"),
        "vae_decode": ("GPU", "float32"),
    }
    for role, (kind, dtype) in expected.items():
        assert f"{{ kind: KIND_{kind} count: 2 }}" in configs[role], role
        assert f'"torch_dtype" value: {{ string_value: "{dtype}" }}' in configs[role], role
    writes = {e.message.split()[-1]: e.message for e in events if e.stage == "write"}
    assert "float32 on gpu" in writes["half.vae_decode"]
    assert "overflows in float16" in writes["half.vae_decode"]
    assert "float16 on cpu" in writes["half.text_encoder"]
    shown = model_details(view)
    assert (shown.dtype, shown.device) == ("float16", "gpu")
    assert {c.role: (c.dtype, c.device) for c in shown.components} == {
        "denoiser": ("float16", "gpu"),
        "text_encoder": ("float16", "cpu"),
        "vae_decode": ("float32", "gpu"),
    }


def _overflowing(folder: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The folder with a VAE whose last conv overflows float16's range (±65504)."""
    import shutil

    from diffusers import AutoencoderKL

    shutil.copytree(folder, out)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"))
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e6)
    vae.save_pretrained(str(out / "vae"))
    return out


def test_a_float16_vae_that_overflows_is_refused_at_import(
    tmp_path: pathlib.Path, sd_folder: pathlib.Path
) -> None:
    bad = _overflowing(sd_folder, tmp_path / "bad")
    service = _imports(tmp_path, bad)
    options = ImportOptions(
        "imports/u1", "bad", dtype="float16", component_dtypes={"vae": "float16"}
    )
    with pytest.raises(InvalidArgument) as info:
        service.import_model(options)
    assert [v.field for v in info.value.violations] == ["component_dtypes[vae]"]
    assert "inf/NaN in float16" in info.value.violations[0].description
    assert repository.list_models(tmp_path / "repo") == []  # nothing reached Triton
    # The default under float16 keeps that VAE in float32: the same folder imports.
    kept = service.import_model(ImportOptions("imports/u1", "bad", dtype="float16"))
    assert kept.record.extra["component_dtypes"]["vae_decode"] == "float32"


def test_a_float16_vae_that_decodes_finite_passes(sd_folder: pathlib.Path) -> None:
    # Ran (not skipped) on this CPU, and the tiny VAE's random weights stay in range.
    assert imports.check_vae_float16(sd_folder / "vae", "cpu") is True
