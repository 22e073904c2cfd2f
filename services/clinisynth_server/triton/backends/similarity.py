"""Role ``similarity``: generated images FP32 [B, C, H, W] in [0, 1] → nearest training image.

The weights folder is a model's similarity index (``similarity.safetensors`` + ``similarity.json``
+ ``config.json``; see :mod:`clinisynth_server.similarity.index`). Outputs per image: the nearest
thumbnail (pixel-space) distance and row, the nearest embedding distance, and ``memorized`` (the
pixel distance under the index's calibrated threshold). Numpy only: no torch, no weights, the same
numbers in every process.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from clinisynth_server.triton.backends._base import (
    BackendInputError,
    ModelSpec,
    TensorSpec,
    require,
)


def model_spec(weights_dir: Path, parameters: Mapping[str, str]) -> ModelSpec:
    return ModelSpec(
        inputs=(TensorSpec("images", "float32", (-1, -1, -1)),),
        outputs=(
            TensorSpec("pixel_distance", "float32", ()),
            TensorSpec("pixel_index", "int64", ()),
            TensorSpec("embedding_distance", "float32", ()),
            TensorSpec("memorized", "bool", ()),
        ),
    )


class Backend:
    def __init__(self, weights_dir: Path, parameters: Mapping[str, str], device: str) -> None:
        from clinisynth_server.similarity.index import SimilarityIndex

        self.index = SimilarityIndex.load(weights_dir)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = require(inputs, "images", 4)
        if images.shape[1] not in (1, 3):
            raise BackendInputError(f"images must be [B, 1 or 3, H, W], got shape {images.shape}")
        if not np.isfinite(images).all():
            raise BackendInputError("images must be finite")
        hwc = np.transpose(images, (0, 2, 3, 1))
        found = self.index.nearest(hwc)
        return {
            "pixel_distance": found.pixel_distance.astype(np.float32),
            "pixel_index": found.pixel_index.astype(np.int64),
            "embedding_distance": found.embedding_distance.astype(np.float32),
            "memorized": self.index.memorized(found).astype(np.bool_),
        }
