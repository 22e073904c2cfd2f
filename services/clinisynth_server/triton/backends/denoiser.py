"""Role ``denoiser``: one noise prediction ε̂(x_t, t, c) for a batch (a sampler step's forward).

Checkpoints: diffusers ``UNet2DModel`` (unconditional, or class-conditional through
``class_labels``) or ``UNet2DConditionModel`` (``encoder_hidden_states``, optionally also
``class_labels``). Inputs, batch dimension first:

- ``sample`` FP32 [B, C, H, W] (H, W variable), ``timestep`` FP32 [B] (integer steps welcome
  as floats: Triton fixes one dtype per input);
- ``class_labels`` INT64 [B] when the checkpoint has a class embedding;
- ``encoder_hidden_states`` FP32 [B, L, D] for ``UNet2DConditionModel``.

Output ``noise_pred`` FP32 [B, C_out, H, W].

With the ``batch_invariant`` parameter (default ``true``) each request is its own forward,
never merged with others, so its output does not depend on what the dynamic batcher queued
beside it (see ``_base``); the generator sends one image per request (its guided pair, the
shapes diffusers' pipeline uses for one image). ``false`` merges requests into one forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from clinisynth_server.triton.backends._base import (
    BackendInputError,
    ModelSpec,
    TensorSpec,
    batch_invariant,
    read_json,
    require,
    torch_dtype,
)

CONDITION_CLASS = "UNet2DConditionModel"
UNCONDITIONAL_CLASS = "UNet2DModel"


def _has_class_embedding(config: Mapping[str, object]) -> bool:
    return config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None


def model_spec(weights_dir: Path, parameters: Mapping[str, str]) -> ModelSpec:
    config = read_json(weights_dir / "config.json")
    kind = config.get("_class_name")
    if kind not in (CONDITION_CLASS, UNCONDITIONAL_CLASS):
        raise ValueError(f"denoiser needs a {UNCONDITIONAL_CLASS} or {CONDITION_CLASS}, got {kind}")
    in_ch = int(config.get("in_channels", 3))
    out_ch = int(config.get("out_channels", in_ch))
    inputs = [
        TensorSpec("sample", "float32", (in_ch, -1, -1)),
        TensorSpec("timestep", "float32", ()),
    ]
    if _has_class_embedding(config):
        inputs.append(TensorSpec("class_labels", "int64", ()))
    if kind == CONDITION_CLASS:
        dim = int(config["cross_attention_dim"])
        inputs.append(TensorSpec("encoder_hidden_states", "float32", (-1, dim)))
    outputs = (TensorSpec("noise_pred", "float32", (out_ch, -1, -1)),)
    return ModelSpec(inputs=tuple(inputs), outputs=outputs, parameters={"unet_class": kind})


class Backend:
    """A diffusers UNet in eval mode; ``__call__`` is one batched forward."""

    def __init__(self, weights_dir: Path, parameters: Mapping[str, str], device: str = "cpu"):
        import diffusers

        from clinisynth_server.triton.backends._loading import load_model

        config = read_json(Path(weights_dir) / "config.json")
        self.kind = str(config["_class_name"])
        cls = getattr(diffusers, self.kind)
        self.dtype = torch_dtype(parameters)
        self.device = device
        self.model = load_model(cls, Path(weights_dir), parameters, self.dtype).to(device)
        self.class_conditional = _has_class_embedding(config)
        self.batch_invariant = batch_invariant(parameters)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._forward(inputs)

    def merges(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """Whether Triton's queued requests may share one forward (``run_grouped``)."""
        return not self.batch_invariant

    def _forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        sample = require(inputs, "sample", 4)
        timestep = require(inputs, "timestep", 1)
        if timestep.shape[0] != sample.shape[0]:
            raise BackendInputError("input 'timestep' must have one value per sample")
        kwargs: dict[str, torch.Tensor] = {}
        if self.class_conditional:
            labels = require(inputs, "class_labels", 1)
            kwargs["class_labels"] = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        if self.kind == CONDITION_CLASS:
            ehs = require(inputs, "encoder_hidden_states", 3)
            kwargs["encoder_hidden_states"] = torch.from_numpy(ehs).to(
                self.device, self.dtype, copy=True
            )
        # Copies into torch's (64-byte aligned) allocator: the same layout whatever buffer
        # Triton handed in, so no alignment-dependent kernel path differs between calls.
        x = torch.from_numpy(sample).to(self.device, self.dtype, copy=True)
        t = torch.from_numpy(timestep).to(self.device)
        with torch.inference_mode():
            out = self.model(x, t, return_dict=False, **kwargs)[0]
        return {"noise_pred": out.float().cpu().numpy()}
