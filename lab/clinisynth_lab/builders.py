"""Model folders built from configs (no downloads): tiny ones for tests, small ones for the demo.

They are saved in diffusers' own format and registered through the same code path as real
checkpoints (a RoentGen / Stable Diffusion folder, a DDPM folder), so tests exercise the real
loading code. The tokenizer is a CLIP BPE tokenizer whose vocabulary is built here: every
byte-level character plus whole-word merges for a domain word list, written as ``vocab.json`` /
``merges.txt`` and loaded with ``CLIPTokenizer.from_pretrained`` (never the constructor, which
in transformers 5 silently builds a 3-token vocabulary from explicit file arguments).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence

import torch

from clinisynth_server.finetune.layouts import sd_model_index

# Words the chest / cells / fundus prompts use; each becomes a single token.
DOMAIN_WORDS = [
    "a",
    "chest",
    "x-ray",
    "xray",
    "radiograph",
    "frontal",
    "pa",
    "ap",
    "view",
    "of",
    "with",
    "without",
    "no",
    "acute",
    "finding",
    "findings",
    "normal",
    "small",
    "large",
    "moderate",
    "left",
    "right",
    "bilateral",
    "pleural",
    "effusion",
    "effusions",
    "cardiomegaly",
    "enlarged",
    "heart",
    "size",
    "cardiac",
    "silhouette",
    "pneumothorax",
    "lung",
    "lungs",
    "clear",
    "apex",
    "apical",
    "base",
    "basal",
    "costophrenic",
    "angle",
    "blunting",
    "opacity",
    "consolidation",
    "is",
    "are",
    "the",
    "and",
    "there",
    "in",
    "on",
    "cell",
    "nucleus",
    "nuclei",
    "lymphocyte",
    "neutrophil",
    "eosinophil",
    "monocyte",
    "fundus",
    "retina",
    "lesion",
    "microaneurysm",
    "microaneurysms",
    "exudate",
    "exudates",
    "healthy",
    "optic",
    "disc",
    "macula",
    "vessel",
    "vessels",
    "abdomen",
    "abdominal",
    "liver",
    "kidney",
    "spine",
    "bowel",
    "ct",
    "scan",
    "axial",
    "image",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_tokenizer(
    folder: str | pathlib.Path, words: Iterable[str] = DOMAIN_WORDS, max_length: int = 77
) -> pathlib.Path:
    """A CLIP BPE tokenizer folder: byte-level base vocabulary + whole-word merges."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab: list[str] = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in seen:
                seen.add(merged)
                vocab.append(merged)
            symbols = [merged, *symbols[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    return folder


def _ddpm_scheduler_config() -> dict[str, object]:
    from clinisynth_server.methods.schedulers import DDPM_SCHEDULE

    return dict(DDPM_SCHEDULE)


def build_pixel_unet(
    folder: str | pathlib.Path,
    *,
    classes: Sequence[str] | None = None,
    size: int = 32,
    channels: int = 1,
    block_out_channels: Sequence[int] = (16, 32),
    layers_per_block: int = 1,
    seed: int = 0,
    description: str = "",
    labels: dict[str, str] | None = None,
) -> pathlib.Path:
    """A ``UNet2DModel`` + DDPM scheduler folder (class-conditional when ``classes`` given)."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = pathlib.Path(folder)
    torch.manual_seed(seed)
    n = len(block_out_channels)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        num_class_embeds=len(classes) if classes else None,
        norm_num_groups=8,
    )
    unet.save_pretrained(folder / "unet")
    DDPMScheduler.from_config(_ddpm_scheduler_config()).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    # 25-step demo models: DDIM, not the 1000-step DDPM their training schedule names.
    meta: dict[str, object] = {
        "description": description,
        "labels": labels or {},
        "default_sampler": "ddim",
    }
    if classes:
        meta["classes"] = list(classes)
    (folder / "clinisynth.json").write_text(json.dumps(meta, indent=2))
    return folder


def build_text_to_image(
    folder: str | pathlib.Path,
    *,
    size: int = 32,
    latent_channels: int = 4,
    image_channels: int = 3,
    unet_channels: Sequence[int] = (32, 64),
    text_dim: int = 32,
    seed: int = 0,
    description: str = "",
    labels: dict[str, str] | None = None,
) -> pathlib.Path:
    """A tiny ``StableDiffusionPipeline`` folder (UNet2DCondition + CLIP text + VAE + tokenizer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = pathlib.Path(folder)
    tok_dir = write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        latent_channels=latent_channels,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=size,
    )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=size // factor,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(sd_model_index("DDIMScheduler")))
    (folder / "clinisynth.json").write_text(
        json.dumps({"description": description, "labels": labels or {}}, indent=2)
    )
    return folder


#: Stable Diffusion 1.x's scheduler (what an SD-1.5 folder ships: PNDM with these settings).
SD1_PNDM_SCHEDULER: dict[str, object] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def build_sd15_shaped(
    folder: str | pathlib.Path,
    *,
    seed: int = 0,
    description: str = "SD-1.5-shaped, random weights",
    labels: dict[str, str] | None = None,
) -> pathlib.Path:
    """A ``StableDiffusionPipeline`` folder with Stable Diffusion 1.5's shapes, random weights.

    U-Net as SD-1.5 (``block_out_channels`` 320, 640, 1280, 1280, two layers per block,
    attention head dim 8, cross-attention dim 768, 64×64 latents: ≈ 860 M parameters), a CLIP
    text encoder of ViT-L/14's text size (hidden 768, 12 layers, 12 heads, 49,408-token
    embedding table: ≈ 123 M), the SD VAE (4 latent channels, 128, 256, 512, 512: ≈ 84 M) and
    SD-1.x's PNDM scheduler; 512×512 images. Built from configs under ``seed`` (nothing is
    downloaded); the tokenizer is :func:`write_clip_tokenizer`'s small BPE vocabulary, whose
    ids all fall inside the full-size embedding table. ≈ 4.3 GB of float32 safetensors.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = pathlib.Path(folder)
    tok_dir = write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    # One component at a time, saved and freed: the builder peaks near the U-Net's 3.4 GB.
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.save_pretrained(folder / "unet")
    del unet
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text.save_pretrained(folder / "text_encoder")
    del text
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=512,
    )
    vae.save_pretrained(folder / "vae")
    del vae
    PNDMScheduler(**SD1_PNDM_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(sd_model_index("PNDMScheduler")))
    (folder / "clinisynth.json").write_text(
        json.dumps({"description": description, "labels": labels or {}}, indent=2)
    )
    return folder
