"""Role ``text_encoder``: CLIP text features for a batch of token ids (transformers
``CLIPTextModel``).

Input ``input_ids`` INT64 [B, L] (the service tokenizes; L variable, batched requests must
share L — pad to ``max_position_embeddings`` as Stable Diffusion does). Outputs
``last_hidden_state`` FP32 [B, L, D] and ``pooler_output`` FP32 [B, D]. One forward per row
unless ``batch_invariant`` is ``false`` (see ``_base``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from clinisynth_server.triton.backends._base import (
    ModelSpec,
    TensorSpec,
    batch_invariant,
    forward_rows,
    read_json,
    require,
    torch_dtype,
)


def model_spec(weights_dir: Path, parameters: Mapping[str, str]) -> ModelSpec:
    config = read_json(weights_dir / "config.json")
    dim = int(config["hidden_size"])
    return ModelSpec(
        inputs=(TensorSpec("input_ids", "int64", (-1,)),),
        outputs=(
            TensorSpec("last_hidden_state", "float32", (-1, dim)),
            TensorSpec("pooler_output", "float32", (dim,)),
        ),
    )


class Backend:
    def __init__(self, weights_dir: Path, parameters: Mapping[str, str], device: str = "cpu"):
        from transformers import CLIPTextModel

        from clinisynth_server.triton.backends._loading import load_model

        self.dtype = torch_dtype(parameters)
        self.device = device
        self.model = load_model(CLIPTextModel, Path(weights_dir), parameters, self.dtype)
        self.model.to(device)
        self.batch_invariant = batch_invariant(parameters)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return forward_rows(self._forward, inputs, invariant=self.batch_invariant)

    def _forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ids = torch.from_numpy(require(inputs, "input_ids", 2).astype(np.int64)).to(self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids)
        return {
            "last_hidden_state": out.last_hidden_state.float().cpu().numpy(),
            "pooler_output": out.pooler_output.float().cpu().numpy(),
        }
