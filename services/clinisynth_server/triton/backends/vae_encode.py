"""Role ``vae_encode``: ``image`` FP32 [B, C, H, W] in [-1, 1] → scaled latent distribution.

Outputs ``latents`` (the posterior mean, scaled: ``(mean - shift) * scaling_factor``) and
``latents_std`` (posterior std, scaled): deterministic, so the caller samples
``latents + latents_std * noise`` with its own seeded generator when it wants a sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from clinisynth_server.triton.backends._base import (
    ModelSpec,
    TensorSpec,
    forward_rows,
    require,
)
from clinisynth_server.triton.backends._vae import VaeBase, vae_channels


def model_spec(weights_dir: Path, parameters: Mapping[str, str]) -> ModelSpec:
    image_ch, latent_ch = vae_channels(weights_dir)
    return ModelSpec(
        inputs=(TensorSpec("image", "float32", (image_ch, -1, -1)),),
        outputs=(
            TensorSpec("latents", "float32", (latent_ch, -1, -1)),
            TensorSpec("latents_std", "float32", (latent_ch, -1, -1)),
        ),
    )


class Backend(VaeBase):
    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return forward_rows(self._forward, inputs, invariant=self.batch_invariant)

    def _forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(require(inputs, "image", 4)).to(self.device, self.dtype, copy=True)
        with torch.inference_mode():
            dist = self.model.encode(x, return_dict=False)[0]
        mean = (dist.mean - self.shift_factor) * self.scaling_factor
        std = dist.std * self.scaling_factor
        return {"latents": mean.float().cpu().numpy(), "latents_std": std.float().cpu().numpy()}
