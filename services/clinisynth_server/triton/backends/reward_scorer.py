"""Role ``reward_scorer``: the feedback method's reward model r(x, y) (docs/METHODS.md §1).

Checkpoint: a :class:`clinisynth_server.methods.reward_model.RewardModel` folder
(``config.json`` kind ``reward_model`` + ``model.safetensors``), usually with the
``clinisynth.json`` that :func:`clinisynth_server.reward.scoring.write_reward_folder` writes
(it fixes the input size). Inputs, batch dimension first:

- ``image`` FP32 [B, C, H, W] in [0, 1] (H, W fixed to the model's size when ``clinisynth.json``
  names it, else variable);
- ``class_label`` INT64 [B] for class conditioning, or ``text_embedding`` FP32 [B, D] for the
  text-conditioned variant.

Outputs ``logits`` FP32 [B, 2] (index 0 = aligned) and ``p_aligned`` FP32 [B, 1] = softmax[0].
"""

from __future__ import annotations

import json
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


def _meta(weights_dir: Path) -> dict[str, Any]:
    path = weights_dir / "clinisynth.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def model_spec(weights_dir: Path, parameters: Mapping[str, str]) -> ModelSpec:
    meta = read_json(weights_dir / "config.json")
    if meta.get("kind") != "reward_model":
        raise ValueError(f"reward_scorer needs a reward_model checkpoint, got {meta.get('kind')}")
    config = meta["config"]
    extra = _meta(weights_dir)
    channels = int(config.get("in_channels", 3))
    height, width = int(extra.get("height", -1) or -1), int(extra.get("width", -1) or -1)
    inputs = [TensorSpec("image", "float32", (channels, height, width))]
    if config.get("conditioning", "class") == "class":
        inputs.append(TensorSpec("class_label", "int64", ()))
        cond = "class"
    else:
        inputs.append(TensorSpec("text_embedding", "float32", (int(config["text_dim"]),)))
        cond = "text"
    outputs = (
        TensorSpec("logits", "float32", (2,)),
        TensorSpec("p_aligned", "float32", (1,)),
    )
    return ModelSpec(inputs=tuple(inputs), outputs=outputs, parameters={"conditioning": cond})


class Backend:
    """A RewardModel in eval mode; ``__call__`` is one batched forward."""

    def __init__(self, weights_dir: Path, parameters: Mapping[str, str], device: str = "cpu"):
        from clinisynth_server.methods.reward_model import RewardModel

        self.device = device
        self.model = RewardModel.load(Path(weights_dir), map_location=device)
        self.model.requires_grad_(False)
        self.config = self.model.config

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        image = require(inputs, "image", 4)
        if image.shape[1] != self.config.in_channels:
            raise BackendInputError(
                f"input 'image' must have {self.config.in_channels} channels, got {image.shape}"
            )
        if self.config.conditioning == "class":
            labels = require(inputs, "class_label", 1).astype(np.int64)
            k = self.config.num_classes
            if labels.size and (labels.min() < 0 or labels.max() >= k):
                raise BackendInputError(
                    f"input 'class_label' must be in [0, {k}), got {labels.min()}..{labels.max()}"
                )
            cond = torch.from_numpy(np.ascontiguousarray(labels))
        else:
            cond = torch.from_numpy(np.ascontiguousarray(require(inputs, "text_embedding", 2)))
        if cond.shape[0] != image.shape[0]:
            raise BackendInputError("every image needs one condition (batch sizes differ)")
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            logits = self.model(x, cond.to(self.device)).float()
            p = logits.softmax(dim=1)[:, :1]
        return {"logits": logits.cpu().numpy(), "p_aligned": p.cpu().numpy()}
