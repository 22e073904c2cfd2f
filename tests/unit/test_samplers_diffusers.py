"""Every sampler, and the folder's own default, against diffusers' own pipelines.

A diffusers user loads a folder with ``StableDiffusionPipeline.from_pretrained(folder)`` (or
``DDPMPipeline``) and gets the folder's scheduler; to swap it they write
``pipe.scheduler = SomeScheduler.from_config(pipe.scheduler.config)``. Our loop, given the
registered record's default sampler or a named one, must give those pixels for the same seeds,
steps and guidance.

Tolerance: ``ATOL`` = 1e-4 on [0, 1] pixels. Both sides run the same float32 modules on the same
CPU, so the only difference is the order of rows in the guided batch (diffusers stacks
[uncond, cond], we stack [cond, uncond]) and hence other conv / GEMM blockings: ~1e-6 a step,
amplified by guidance and the steps. 1e-4 is 39x below one 8-bit grey level (1/255), holds on any
CPU whatever its BLAS, and is far below what a wrong sampler or a lost config key costs
(``MIN_SAMPLER_GAP`` below is asserted between samplers, so the tolerance can tell them apart).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from clinisynth_lab import builders
from clinisynth_server import registry
from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.generator.options import GenerateOptions, validate
from clinisynth_server.methods.sampling import Cond, sample, unet_eps_fn, vae_decode_fn
from clinisynth_server.methods.schedulers import SAMPLERS, make_scheduler, sampler_of_config
from clinisynth_server.store import open_store

ATOL = 1e-4
MIN_SAMPLER_GAP = 5e-3  # ≥ 50x the tolerance; the closest two samplers here differ by 1.2e-2
SEEDS = [21, 22]
STEPS = 6
GUIDANCE = 5.0

# Written out here, not imported: the test checks the name → class mapping too.
DIFFUSERS_CLASS: dict[str, Any] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "lms": LMSDiscreteScheduler,
}
# What Stable Diffusion 1.x folders ship (runwayml / CompVis scheduler_config.json).
SD1_PNDM = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():  # type: ignore[no-untyped-def]
    """Tiny models on shared cores: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _registered(folder: pathlib.Path, tmp: pathlib.Path, name: str = "m") -> ModelRecord:
    """The catalog record registration writes for ``folder`` (no Triton needed)."""
    store = open_store(str(tmp / "store"))
    return registry.register_folder(
        folder,
        name,
        catalog=Catalog(store, ttl_s=0),
        store=store,
        model_repository=tmp / "repo",
    )


def _sd1_folder(root: pathlib.Path) -> pathlib.Path:
    """The project's tiny SD builder, with the scheduler an SD-1.x folder ships (PNDM)."""
    folder = builders.build_text_to_image(root, size=16, image_channels=3)
    PNDMScheduler(**SD1_PNDM).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(builders.sd_model_index("PNDMScheduler")))
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return _sd1_folder(tmp_path_factory.mktemp("sd1") / "sd")


@pytest.fixture(scope="module")
def sd_record(sd_folder: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRecord:
    return _registered(sd_folder, tmp_path_factory.mktemp("sd1-reg"))


@pytest.fixture(scope="module")
def sd_ours(sd_folder: pathlib.Path, sd_record: ModelRecord) -> dict[str, torch.Tensor]:
    """Our loop's images for every sampler and for the record's default (key ``""``)."""
    tokenizer = CLIPTokenizer.from_pretrained(str(sd_folder / "tokenizer"))
    text = CLIPTextModel.from_pretrained(str(sd_folder / "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(str(sd_folder / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(sd_folder / "vae")).eval()

    def encode(prompt: str) -> torch.Tensor:
        ids = tokenizer(
            [prompt] * len(SEEDS),
            padding="max_length",
            truncation=True,
            max_length=int(sd_record.extra["max_length"]),
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            return text(ids)[0]

    cond, uncond = encode("cardiomegaly"), encode("")
    latent = int(sd_record.extra["latent_channels"])
    side = sd_record.width // int(sd_record.extra["vae_scale_factor"])
    out = {}
    for name in ("", *SAMPLERS):
        out[name] = sample(
            unet_eps_fn(unet),
            make_scheduler(name or sd_record.default_sampler, sd_record.scheduler),
            SEEDS,
            (latent, side, side),
            num_inference_steps=STEPS,
            cond=Cond(encoder_hidden_states=cond),
            uncond=Cond(encoder_hidden_states=uncond),
            guidance_scale=GUIDANCE,
            decode_fn=vae_decode_fn(vae),
        ).images
    return out


def _sd_pipeline_images(folder: pathlib.Path, sampler: str) -> torch.Tensor:
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    if sampler:  # swapped exactly as diffusers documents it
        kwargs = {"algorithm_type": "dpmsolver++"} if sampler == "dpmsolver++" else {}
        pipe.scheduler = DIFFUSERS_CLASS[sampler].from_config(pipe.scheduler.config, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "cardiomegaly",
        num_images_per_prompt=len(SEEDS),
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=16,
        width=16,
        output_type="pt",
    ).images
    assert isinstance(images, torch.Tensor)
    return images


def test_sampler_names_cover_the_issue() -> None:
    assert set(SAMPLERS) == set(DIFFUSERS_CLASS)  # scipy is installed here, so LMS is too


def test_sd1_folder_default_is_its_pndm_scheduler(sd_record: ModelRecord) -> None:
    assert sd_record.default_sampler == "pndm"
    assert sd_record.samplers == list(SAMPLERS)
    assert sd_record.scheduler["skip_prk_steps"] is True  # the folder's config is kept
    assert sd_record.scheduler["steps_offset"] == 1


@pytest.mark.parametrize("sampler", ["", *SAMPLERS], ids=lambda s: s or "default")
def test_sd_folder_matches_stable_diffusion_pipeline(
    sd_folder: pathlib.Path, sd_ours: dict[str, torch.Tensor], sampler: str
) -> None:
    expected = _sd_pipeline_images(sd_folder, sampler)
    got = sd_ours[sampler]
    assert got.shape == expected.shape == (len(SEEDS), 3, 16, 16)
    assert (got - expected).abs().max().item() < ATOL
    assert (got[0] - got[1]).abs().max().item() > MIN_SAMPLER_GAP  # seeds differ


def test_samplers_differ_by_far_more_than_the_tolerance(sd_ours: dict[str, torch.Tensor]) -> None:
    """Otherwise the agreement above would not show that the right sampler ran."""
    names = list(SAMPLERS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            gap = (sd_ours[a] - sd_ours[b]).abs().max().item()
            assert gap > MIN_SAMPLER_GAP, f"{a} vs {b}: {gap}"


# -- a pixel-space DDPMPipeline folder --------------------------------------------------------


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """What ``DDPMPipeline.save_pretrained`` writes: unet/ + scheduler/ + model_index.json."""
    torch.manual_seed(1)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    folder = tmp_path_factory.mktemp("ddpm") / "ddpm"
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    return folder


def _pixel_pipeline_images(folder: pathlib.Path, sampler: str) -> np.ndarray:
    """diffusers' own pixel pipelines. They neither scale x_T by σ_max nor call
    ``scale_model_input``, so only samplers with σ_max = 1 (not Euler / LMS) have one; those
    are covered by the Stable Diffusion matrix above."""
    base = DDPMPipeline.from_pretrained(str(folder))
    pipe: Any
    if sampler == "ddim":
        pipe = DDIMPipeline(unet=base.unet, scheduler=base.scheduler)  # converts, from_config
    elif sampler == "pndm":
        pipe = PNDMPipeline(
            unet=base.unet, scheduler=PNDMScheduler.from_config(base.scheduler.config)
        )
    elif sampler == "dpmsolver++":
        pipe = base
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            base.scheduler.config, algorithm_type="dpmsolver++"
        )
    else:
        assert sampler == ""
        pipe = base
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=len(SEEDS),
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        num_inference_steps=STEPS,
        output_type="np",
    ).images
    assert isinstance(images, np.ndarray)
    return images


@pytest.mark.parametrize(
    "sampler", ["", "ddim", "pndm", "dpmsolver++"], ids=lambda s: s or "default"
)
def test_ddpm_folder_matches_diffusers_pixel_pipelines(
    ddpm_folder: pathlib.Path, tmp_path: pathlib.Path, sampler: str
) -> None:
    record = _registered(ddpm_folder, tmp_path)
    assert record.kind == "unconditional" and record.default_sampler == "ddpm"
    unet = UNet2DModel.from_pretrained(str(ddpm_folder / "unet")).eval()
    got = sample(
        unet_eps_fn(unet),
        make_scheduler(sampler or record.default_sampler, record.scheduler),
        SEEDS,
        (record.channels, record.height, record.width),
        num_inference_steps=STEPS,
    ).images.permute(0, 2, 3, 1)
    expected = _pixel_pipeline_images(ddpm_folder, sampler)
    assert got.shape == expected.shape == (len(SEEDS), 16, 16, 1)
    assert np.abs(got.numpy() - expected).max() < ATOL
    assert (got[0] - got[1]).abs().max().item() > MIN_SAMPLER_GAP


# -- the default-from-folder rule -------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        (PNDMScheduler(**SD1_PNDM), "pndm"),
        (DDIMScheduler(), "ddim"),
        (DDPMScheduler(), "ddpm"),
        (EulerDiscreteScheduler(), "euler"),
        (EulerAncestralDiscreteScheduler(), "euler_ancestral"),
        (DPMSolverMultistepScheduler(), "dpmsolver++"),
        (LMSDiscreteScheduler(), "lms"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_folder_scheduler_class_is_the_default(
    tmp_path: pathlib.Path, scheduler: Any, expected: str
) -> None:
    folder = builders.build_pixel_unet(tmp_path / "px", size=16)
    (folder / "clinisynth.json").write_text("{}")  # no stated default: the folder's scheduler
    scheduler.save_pretrained(folder / "scheduler")
    record = _registered(folder, tmp_path)
    assert record.default_sampler == expected
    assert record.scheduler["_class_name"] == type(scheduler).__name__


def test_stated_default_wins_and_a_folder_without_scheduler_gets_ddim(
    tmp_path: pathlib.Path,
) -> None:
    stated = builders.build_pixel_unet(tmp_path / "stated", size=16)  # states "ddim" itself
    assert (
        sampler_of_config(json.loads((stated / "scheduler" / "scheduler_config.json").read_text()))
        == "ddpm"
    )
    assert _registered(stated, tmp_path / "a").default_sampler == "ddim"

    bare = tmp_path / "bare"
    UNet2DModel(
        sample_size=16,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    ).save_pretrained(str(bare))
    assert _registered(bare, tmp_path / "b").default_sampler == "ddim"

    sde = builders.build_pixel_unet(tmp_path / "sde", size=16)
    (sde / "clinisynth.json").write_text("{}")
    DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").save_pretrained(sde / "scheduler")
    assert _registered(sde, tmp_path / "c").default_sampler == "ddim"  # not ours to name


def test_unknown_stated_default_is_refused_before_triton(tmp_path: pathlib.Path) -> None:
    folder = builders.build_pixel_unet(tmp_path / "px", size=16)
    (folder / "clinisynth.json").write_text(json.dumps({"default_sampler": "heun"}))
    with pytest.raises(InvalidArgument) as err:
        _registered(folder, tmp_path)
    assert err.value.violations[0].field == "default_sampler"
    assert not (tmp_path / "repo").exists()  # nothing written for Triton


# -- unknown sampler --------------------------------------------------------------------------


def test_unknown_sampler_is_invalid_argument_listing_the_valid_ones(
    sd_folder: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(InvalidArgument) as err:
        make_scheduler("heun", {})
    (violation,) = err.value.violations
    assert err.value.code == "INVALID_ARGUMENT" and violation.field == "sampler"
    assert all(name in violation.description for name in SAMPLERS)

    store = open_store(str(tmp_path / "store"))
    catalog = Catalog(store, ttl_s=0)
    registry.register_folder(
        sd_folder, "sd", catalog=catalog, store=store, model_repository=tmp_path / "repo"
    )
    with pytest.raises(InvalidArgument) as err:
        validate(GenerateOptions(model="sd", prompt="x", sampler="heun"), catalog)
    fields = {v.field: v.description for v in err.value.violations}
    assert set(fields) == {"sampler"}
    assert all(name in fields["sampler"] for name in SAMPLERS)
    _, opts = validate(GenerateOptions(model="sd", prompt="x"), catalog)
    assert opts.sampler == "pndm"
    _, opts = validate(GenerateOptions(model="sd", prompt="x", sampler="Euler_Ancestral"), catalog)
    assert opts.sampler == "euler_ancestral"
