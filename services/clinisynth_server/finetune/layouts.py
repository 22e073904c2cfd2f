"""On-disk layouts the product reads and writes: data-set folders and pipeline folders.

The names live here, not with the code that writes example data sets, so a hospital's own folder
and a generated one are read by the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MANIFEST_NAME = "manifest.jsonl"
LABELS_NAME = "labels.jsonl"
CLASSES_NAME = "classes.json"
IMAGES_DIR = "images"
IMAGE_FIELDS = ("image", "file")  # the first is written; "file" is read from older sets
TEXT_FIELDS = ("prompt", "text", "caption")  # likewise


def field_value(rec: Mapping[str, Any], names: Sequence[str]) -> Any:
    """The value of the first of ``names`` present in ``rec`` (a field and its older aliases)."""
    return next((rec[n] for n in names if n in rec), None)


def sd_model_index(scheduler_class: str) -> dict[str, object]:
    """``model_index.json`` of a StableDiffusionPipeline folder (no safety checker)."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
