"""A registered Stable Diffusion 1.x folder, asked for no sampler, gives diffusers' pixels.

Through the running generator (gRPC + real Triton): the folder ships PNDM, as SD-1.x folders do,
so the served default must be PNDM with the folder's config, and the PNG must hold what
``StableDiffusionPipeline.from_pretrained(folder)(...)`` computes for the same seeds, steps and
guidance. Tolerance: one 8-bit grey level (1/255): the PNG quantises to 8 bits (≤ 0.5/255) and
Triton's float32 batches differ from the in-process pipeline by ~1e-5 (tests/unit's bound is
1e-4), far below the other half level.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.stack

SEED, N, STEPS = 5, 2, 6
PROMPT = "cardiomegaly"
SD1_PNDM = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


@pytest.fixture(scope="module")
def sd1_folder(session_dir, catalog, store, model_repository, triton_client):  # type: ignore[no-untyped-def]
    from diffusers import PNDMScheduler

    from clinisynth_lab import builders
    from clinisynth_server import registry

    folder = builders.build_text_to_image(session_dir / "sd1-pndm", size=16, image_channels=3)
    PNDMScheduler(**SD1_PNDM).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(builders.sd_model_index("PNDMScheduler")))
    registry.register_folder(
        folder,
        "sd1-tiny",
        catalog=catalog,
        store=store,
        model_repository=model_repository,
        triton=triton_client,
    )
    return folder


def _pipeline(folder, sampler_cls=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    if sampler_cls is not None:
        pipe.scheduler = sampler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_images_per_prompt=N,
        generator=[torch.Generator().manual_seed(SEED + i) for i in range(N)],  # seed + i
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=16,
        width=16,
        output_type="np",
    ).images


def test_no_sampler_gives_the_stable_diffusion_pipeline_pixels(sdk_client, sd1_folder):  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler

    (info,) = [m for m in sdk_client.list_models(name="sd1-tiny") if m.name == "sd1-tiny"]
    assert info.default_sampler == "pndm"
    assert {"pndm", "ddim", "ddpm", "euler", "euler_ancestral", "dpmsolver++"} <= set(info.samplers)

    res = sdk_client.generate("sd1-tiny", prompt=PROMPT, n=N, seed=SEED, steps=STEPS)
    got = np.stack([image.to_numpy() for image in res.images])
    assert res.images[0].provenance["sampler"] == "pndm"
    expected = _pipeline(sd1_folder)
    assert got.shape == expected.shape == (N, 16, 16, 3)
    assert np.abs(got - expected).max() <= 1 / 255
    # The bound tells samplers apart: the same folder under DDIM is far outside it.
    assert np.abs(got - _pipeline(sd1_folder, DDIMScheduler)).max() > 4 / 255
