"""Asking a model's ``similarity`` Triton component about images: the one call both checks use.

The memorization gate (generated images) and the out-of-domain guard (inputs) send ``[B, C, H, W]``
float32 images in [0, 1] to the same component and read different outputs of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clinisynth_server.catalog import ModelRecord

COMPONENT = "similarity"


def query(
    triton: Any,
    record: ModelRecord,
    images: np.ndarray,
    outputs: Sequence[str],
    *,
    batch: int,
    timeout_s: float | None = None,
) -> dict[str, np.ndarray]:
    """``outputs`` of ``record``'s similarity component for ``images``, one value per image,
    in Triton calls of at most ``batch`` images."""
    name = record.components[COMPONENT]
    version = str(record.component_versions[COMPONENT])
    arr = np.asarray(images, dtype=np.float32)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in outputs}
    for start in range(0, len(arr), batch):
        res = triton.infer(
            name,
            {"images": np.ascontiguousarray(arr[start : start + batch])},
            list(outputs),
            version=version,
            timeout_s=timeout_s,
        )
        for key in outputs:
            parts[key].append(np.asarray(res[key]).reshape(-1))
    return {key: np.concatenate(chunks) if chunks else np.empty(0) for key, chunks in parts.items()}
