"""A LoRA adapter imported onto a served Stable Diffusion version gives diffusers' pixels.

Real Triton, real gRPC, the SDK over the finetune and generator services. A tiny SD folder is
built from configs and imported; a diffusers ``pytorch_lora_weights.safetensors`` with known
non-zero weights (peft ``init_lora_weights=False``, a fixed seed; ``lora_alpha`` ≠ ``r`` on the
U-Net so the alpha scaling is exercised) is imported with ``base=``. The served images must be
what ``StableDiffusionPipeline`` computes with the adapter *loaded* (peft layers, not fused, so
the merge is checked against diffusers' own LoRA forward pass), and differ from the base.
Tolerance: one 8-bit level (1/255), as in test_generator_samplers: the PNG quantises to 8 bits
(≤ 0.5/255); merged float32 weights and Triton batches move pixels by ~1e-5.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import clinisynth
from clinisynth_lab import builders
from tests.conftest import import_services

pytestmark = pytest.mark.stack

SEED, N, STEPS, SIZE = 3, 2, 4, 16
PROMPT = "pleural effusion"
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
MISSING = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_x"
MISFIT = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def make_adapter(base: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A U-Net + text-encoder LoRA with seeded, non-zero weights, saved as diffusers does."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"))
    text = CLIPTextModel.from_pretrained(str(base / "text_encoder"))
    torch.manual_seed(11)
    unet_cfg = LoraConfig(r=4, lora_alpha=2, target_modules=UNET_MODULES, init_lora_weights=False)
    text_cfg = LoraConfig(
        r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    unet.add_adapter(unet_cfg)
    text.add_adapter(text_cfg)
    StableDiffusionPipeline.save_lora_weights(
        str(out),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=text_cfg.to_dict(),
    )
    return out


def broken_adapter(good: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The good adapter with one module renamed to one the base lacks and one of another rank."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    name = "pytorch_lora_weights.safetensors"
    with safe_open(str(good / name), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(good / name))
    present = MISSING.replace("to_x", "to_q")
    for side in ("lora_A", "lora_B"):
        tensors[f"unet.{MISSING}.{side}.weight"] = tensors.pop(f"unet.{present}.{side}.weight")
    a = tensors[f"unet.{MISFIT}.lora_A.weight"]
    tensors[f"unet.{MISFIT}.lora_A.weight"] = torch.ones(a.shape[0], a.shape[1] + 8)
    out.mkdir(parents=True)
    save_file(tensors, str(out / name), metadata=metadata)
    return out


@pytest.fixture(scope="module")
def folders(session_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    root = session_dir / "lora"
    sd = builders.build_text_to_image(root / "sd", size=SIZE, image_channels=3)
    adapter = make_adapter(sd, root / "adapter")
    return {"sd": sd, "adapter": adapter, "broken": broken_adapter(adapter, root / "broken")}


@pytest.fixture(scope="module")
def base(folders, catalog, store, model_repository) -> str:  # type: ignore[no-untyped-def]
    """The tiny SD folder registered as a base; not loaded in Triton: only its weights in the
    model repository are read (serving the base itself is test_generator_samplers' subject)."""
    from clinisynth_server import registry

    record = registry.register_folder(
        folders["sd"], "lora-base", catalog=catalog, store=store, model_repository=model_repository
    )
    return str(record.ref)


@pytest.fixture(scope="module")
def client(triton_server, store_url, session_dir, model_repository) -> Iterator[clinisynth.Client]:  # type: ignore[no-untyped-def]
    home = session_dir / "lora-home"
    with (
        import_services(
            "generator", triton_server.grpc_url, store_url, home, model_repository
        ) as endpoints,
        clinisynth.Client(endpoints=endpoints, timeout=300) as c,
    ):
        yield c


def _pipeline(folder: pathlib.Path, adapter: pathlib.Path | None) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))  # peft layers beside the weights, not merged
    pipe.set_progress_bar_config(disable=True)
    images: np.ndarray = pipe(
        PROMPT,
        num_images_per_prompt=N,
        generator=[torch.Generator().manual_seed(SEED + i) for i in range(N)],  # seed + i
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images
    return images


def _served(client: clinisynth.Client, model: str) -> tuple[np.ndarray, dict[str, Any]]:
    res = client.generate(model, prompt=PROMPT, n=N, seed=SEED, steps=STEPS)
    return np.stack([i.to_numpy() for i in res.images]), res.images[0].provenance


def test_lora_import_serves_the_diffusers_lora_pixels(client, folders, base):  # type: ignore[no-untyped-def]
    details = client.import_model(folders["adapter"], name="lora-chest", base=base)
    assert details.base == base and details.version == "1"
    assert details.model.kind == "text_to_image" and all(c.ready for c in details.components)
    assert details.model.digest != client.get_model(base).model.digest  # merged, not the base's
    assert client.get_model("lora-chest").base == base

    got, provenance = _served(client, "lora-chest@1")
    assert provenance["model"]["name"] == "lora-chest"
    expected = _pipeline(folders["sd"], folders["adapter"])
    assert got.shape == expected.shape == (N, SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= 1 / 255
    # The adapter changes the pixels: the base's own pixels are far outside the bound.
    assert np.abs(got - _pipeline(folders["sd"], None)).max() > 8 / 255


def test_lora_that_does_not_fit_names_each_module(client, folders, base, model_repository):  # type: ignore[no-untyped-def]
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.import_model(folders["broken"], name="lora-broken", base=base)
    assert set(info.value.fields) == {f"source.lora.unet.{MISSING}", f"source.lora.unet.{MISFIT}"}
    assert not (model_repository / "lora-broken.denoiser").exists()  # nothing reached Triton
    # An adapter without a base, and a base that is not served, are named too.
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.import_model(folders["adapter"], name="lora-broken")
    assert info.value.fields == ["base"]
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.import_model(folders["adapter"], name="lora-broken", base="no-such-model@1")
    assert info.value.fields == ["base.name"]


def test_lora_merge_matches_diffusers_fuse(folders, tmp_path):  # type: ignore[no-untyped-def]
    """The merged tensors are diffusers' ``fuse_lora`` result (float32 rounding: 1e-6)."""
    from diffusers import StableDiffusionPipeline

    from clinisynth_server.finetune import lora

    updates, problems = lora.plan(folders["adapter"], folders["sd"])
    assert problems == [] and {u.component for u in updates} == {"unet", "text_encoder"}
    assert {u.scale for u in updates} == {0.5, 1.0}  # alpha / r: 2 / 4 (U-Net), 2 / 2 (text)
    lora.merge(folders["adapter"], folders["sd"], tmp_path / "merged", updates)
    fused = StableDiffusionPipeline.from_pretrained(str(folders["sd"]), safety_checker=None)
    fused.load_lora_weights(str(folders["adapter"]))
    fused.fuse_lora()
    fused.unload_lora_weights()
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"), safety_checker=None)
    for part in ("unet", "text_encoder"):
        want, have = getattr(fused, part).state_dict(), getattr(merged, part).state_dict()
        assert want.keys() == have.keys()
        assert max((want[k] - have[k]).abs().max().item() for k in want) < 1e-6
