"""Role ``vae_decode``: scaled latents FP32 [B, C_lat, h, w] → ``image`` FP32 [B, C, H, W] in
[-1, 1]. Divides by ``scaling_factor`` (and adds ``shift_factor``) itself; see ``_vae``."""

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
        inputs=(TensorSpec("latents", "float32", (latent_ch, -1, -1)),),
        outputs=(TensorSpec("image", "float32", (image_ch, -1, -1)),),
    )


class Backend(VaeBase):
    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return forward_rows(self._forward, inputs, invariant=self.batch_invariant)

    def _forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        z = torch.from_numpy(require(inputs, "latents", 4)).to(self.device, self.dtype, copy=True)
        z = z / self.scaling_factor + self.shift_factor
        with torch.inference_mode():
            image = self.model.decode(z, return_dict=False)[0]
        return {"image": image.float().cpu().numpy()}
