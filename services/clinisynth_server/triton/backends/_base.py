"""What a role is: tensor specs for ``config.pbtxt`` plus a batched numpy-in / numpy-out backend.

No torch here: the repository builder imports this in processes that never run a model.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

#: numpy dtype → Triton config ``data_type``.
TRITON_DTYPES: dict[str, str] = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output, shape *without* the batch dimension (-1 = variable).

    ``dims=()`` means one scalar per batch item (sent as shape ``[B]``); it is written as
    ``dims: [1]`` with ``reshape { shape: [] }`` because Triton forbids empty ``dims``.
    """

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def triton_dtype(self) -> str:
        return TRITON_DTYPES[np.dtype(self.dtype).name]


@dataclass(frozen=True)
class ModelSpec:
    """The role-specific part of a model's ``config.pbtxt``."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: Mapping[str, str] = field(default_factory=dict)


class Backend(Protocol):
    """A loaded model: a batch of named numpy arrays in, a batch of named arrays out.

    The same object runs in-process (tests, benchmarks) and inside Triton, so both give
    identical numbers. Constructed as ``Backend(weights_dir, parameters, device)``.
    """

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class BackendInputError(ValueError):
    """A request tensor the backend cannot use; surfaces as Triton INVALID_ARG."""


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def has_weight_files(weights_dir: Path) -> bool:
    """True when the folder holds a checkpoint, False for a config-only (seeded) model."""
    suffixes = {".safetensors", ".bin", ".pt", ".pth"}
    return any(p.suffix in suffixes for p in weights_dir.iterdir() if p.is_file())


def configure_torch_threads(parameters: Mapping[str, str], instance_count: int = 1) -> None:
    """Cap torch's threads so N instances on a small CPU box do not oversubscribe it.

    ``torch_threads`` parameter wins; default is ``cpu_count // instance_count`` (≥ 1).
    """
    import torch

    default = max(1, (os.cpu_count() or 1) // max(1, instance_count))
    threads = int(parameters.get("torch_threads", default))
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # interop threads can only be set once
        torch.set_num_interop_threads(1)


def batch_invariant(parameters: Mapping[str, str]) -> bool:
    """The ``batch_invariant`` parameter (default ``true``): no request shares another's forward.

    A batched GEMM / conv picks other blockings per batch size, so a row's float32 output can
    move by ~1e-6 with its batch-mates. In this mode the denoiser runs each request as its own
    forward (the generator sends one image per request) and the text encoder / VAE each row, so
    a request's output is the same whatever Triton's dynamic batcher queued beside it (the
    replay contract). ``false`` trades that for batched throughput.
    """
    value = parameters.get("batch_invariant", "true").strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"batch_invariant parameter must be 'true' or 'false', got {value!r}")
    return value == "true"


def configure_gpu_determinism(device: str, parameters: Mapping[str, str]) -> None:
    """On a GPU in ``batch_invariant`` mode, ask for deterministic cuDNN / cuBLAS algorithms.

    A batch of one fixes the shapes, but cuDNN autotuning and atomics-based kernels can still
    pick or order work differently per run there. Not exercised by the CPU test suite.
    """
    if not device.startswith("cuda") or not batch_invariant(parameters):
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def merges(backend: Any, inputs: Mapping[str, np.ndarray]) -> bool:
    """Whether ``backend`` may compute this request in one forward with other requests.

    A backend says no through a ``merges(inputs)`` method (the denoiser in ``batch_invariant``
    mode); without one, requests of the same shapes share a forward.
    """
    rule = getattr(backend, "merges", None)
    return True if rule is None else bool(rule(inputs))


def forward_rows(
    forward: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    inputs: Mapping[str, np.ndarray],
    *,
    invariant: bool,
) -> dict[str, np.ndarray]:
    """``forward(inputs)``, or with ``invariant`` one ``forward`` per batch row, concatenated."""
    if not invariant:
        return forward(inputs)
    size = next(iter(inputs.values())).shape[0]
    rows = [forward({n: a[i : i + 1] for n, a in inputs.items()}) for i in range(size)]
    return {n: np.concatenate([row[n] for row in rows]) for n in rows[0]}


def torch_dtype(parameters: Mapping[str, str]) -> Any:
    """The compute dtype (``torch_dtype`` parameter: float32 default, float16/bfloat16 on GPU)."""
    import torch

    name = parameters.get("torch_dtype", "float32")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"torch_dtype parameter must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def require(inputs: Mapping[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    """Fetch a batched input and check its rank (Triton checks dtype and fixed dims).

    Returns a C-contiguous, writable array (Triton hands out read-only buffers, which
    ``torch.from_numpy`` warns about); copies only when needed.
    """
    if name not in inputs:
        raise BackendInputError(f"input '{name}' is required")
    arr = inputs[name]
    if arr.ndim != ndim:
        raise BackendInputError(f"input '{name}' must have rank {ndim}, got shape {arr.shape}")
    return np.require(arr, requirements=["C", "W"])
