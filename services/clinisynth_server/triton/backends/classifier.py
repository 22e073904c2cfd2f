"""Role ``classifier``: calibrated logits of an image classifier for a batch.

Checkpoint: a :class:`clinisynth_server.methods.classifier.Classifier` folder (``config.json`` with
``kind: classifier`` + ``model.safetensors``), as the finetune service's classifier job and
:func:`clinisynth_lab.toy.build_toy_models` write it. The counterfactual service
uses it for P(target) of the input and of the result; the guided steps go through ``cf_guidance``.

Input ``images`` FP32 [B, C, H, W] in [0, 1] (H, W variable; the backbone pools globally).
Output ``logits`` FP32 [B, num_classes] (already divided by the fitted temperature).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clinisynth_server.triton.backends._base import (
    BackendInputError,
    ModelSpec,
    TensorSpec,
    read_json,
    require,
)


def _classifier_config(weights_dir: Path) -> dict[str, Any]:
    meta = read_json(weights_dir / "config.json")
    if meta.get("kind") != "classifier":
        raise ValueError(f"{weights_dir} holds a {meta.get('kind')!r} checkpoint, not a classifier")
    config: dict[str, Any] = meta["config"]
    return config


def model_spec(weights_dir: Path, parameters: Mapping[str, str]) -> ModelSpec:
    config = _classifier_config(Path(weights_dir))
    channels = int(config.get("in_channels", 3))
    classes = int(config.get("num_classes", 2))
    return ModelSpec(
        inputs=(TensorSpec("images", "float32", (channels, -1, -1)),),
        outputs=(TensorSpec("logits", "float32", (classes,)),),
    )


class Backend:
    """A classifier in eval mode (BatchNorm statistics fixed: results independent of batching)."""

    def __init__(self, weights_dir: Path, parameters: Mapping[str, str], device: str = "cpu"):
        from clinisynth_server.methods.classifier import Classifier

        self.device = device
        self.model = Classifier.load(Path(weights_dir), map_location=device)
        self.model.requires_grad_(False)
        self.channels = self.model.config.in_channels

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        images = require(inputs, "images", 4)
        if images.shape[1] != self.channels:
            raise BackendInputError(
                f"input 'images' must have {self.channels} channels, got shape {images.shape}"
            )
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(images).to(self.device, torch.float32))
        return {"logits": logits.float().cpu().numpy()}
