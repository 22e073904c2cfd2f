"""Shared loading for the ``vae_decode`` / ``vae_encode`` roles (diffusers ``AutoencoderKL``).

Scaling convention — the VAE side owns it, so samplers only ever see *scaled* latents:
``vae_encode`` returns ``(mean - shift_factor) * scaling_factor`` and ``vae_decode`` undoes it
(``latents / scaling_factor + shift_factor``) before decoding. Images are in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clinisynth_server.triton.backends._base import batch_invariant, read_json, torch_dtype


class VaeBase:
    def __init__(self, weights_dir: Path, parameters: Mapping[str, str], device: str = "cpu"):
        from diffusers import AutoencoderKL

        from clinisynth_server.triton.backends._loading import load_model

        self.dtype = torch_dtype(parameters)
        self.device = device
        self.model: Any = load_model(AutoencoderKL, Path(weights_dir), parameters, self.dtype)
        self.model.to(device)
        self.scaling_factor = float(self.model.config.scaling_factor or 1.0)
        self.shift_factor = float(getattr(self.model.config, "shift_factor", None) or 0.0)
        self.batch_invariant = batch_invariant(parameters)


def vae_channels(weights_dir: Path) -> tuple[int, int]:
    """(image channels, latent channels) from the checkpoint's config."""
    config = read_json(weights_dir / "config.json")
    return int(config.get("in_channels", 3)), int(config.get("latent_channels", 4))
