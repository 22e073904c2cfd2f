"""Load a diffusers / transformers model from a weights folder, or build it seeded from config.

A folder with only ``config.json`` plus the ``random_init_seed`` parameter gives a model with
fixed random weights: the sample repository and tests need no checkpoint files that way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clinisynth_server.triton.backends._base import has_weight_files


def load_model(cls: Any, weights_dir: Path, parameters: Mapping[str, str], dtype: Any) -> Any:
    """``cls.from_pretrained(weights_dir)``, or ``cls`` from its config under a fixed seed."""
    import torch

    if has_weight_files(weights_dir):
        model = cls.from_pretrained(str(weights_dir), torch_dtype=dtype)
    else:
        seed = parameters.get("random_init_seed")
        if seed is None:
            raise FileNotFoundError(
                f"{weights_dir} holds no weight files and no 'random_init_seed' parameter is set"
            )
        torch.manual_seed(int(seed))
        if hasattr(cls, "from_config"):  # diffusers
            model = cls.from_config(cls.load_config(str(weights_dir)))
        else:  # transformers
            model = cls(cls.config_class.from_pretrained(str(weights_dir)))
        model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model
