"""Glue between Triton's python backend and a role's :class:`Backend` (runs inside the stub).

``execute`` receives every request of one dynamic batch. Requests whose non-batch shapes
agree (same H, W, L …) are concatenated and run as one forward; each group's output is
split back per request. Triton counts the whole call as one execution.
"""

from __future__ import annotations

import importlib
import json
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clinisynth_server.triton.backends._base import (
    BackendInputError,
    configure_gpu_determinism,
    configure_torch_threads,
    merges,
)


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """``parameters { key … value { string_value … } }`` as a flat dict."""
    raw = model_config.get("parameters") or {}
    return {key: str(value.get("string_value", "")) for key, value in raw.items()}


def weights_dir_for(model_dir: Path, version: str, parameters: Mapping[str, str]) -> Path:
    """``<model>/<version>/weights`` unless the ``weights_dir`` parameter names another folder."""
    override = parameters.get("weights_dir")
    return Path(override) if override else model_dir / version / "weights"


def run_grouped(
    backend: Any, batches: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray] | Exception]:
    """Run requests through ``backend``, one forward per group of shape-compatible requests
    (a request the backend will not merge, :func:`_base.merges`, is a group of its own)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, tensors in enumerate(batches):
        key: tuple[Any, ...] = tuple(
            sorted((name, arr.shape[1:], arr.dtype.str) for name, arr in tensors.items())
        )
        if not merges(backend, tensors):
            key = (index, *key)
        groups.setdefault(key, []).append(index)
    results: list[dict[str, np.ndarray] | Exception] = [RuntimeError("not run")] * len(batches)
    for members in groups.values():
        names = batches[members[0]].keys()
        merged = {n: np.concatenate([batches[i][n] for i in members]) for n in names}
        try:
            outputs = backend(merged)
        except Exception as exc:
            for i in members:
                results[i] = exc
            continue
        start = 0
        for i in members:
            size = next(iter(batches[i].values())).shape[0]
            results[i] = {n: arr[start : start + size] for n, arr in outputs.items()}
            start += size
    return results


def python_model(module_path: str) -> type:
    """Build the ``TritonPythonModel`` class for the role implemented in ``module_path``."""

    class TritonPythonModel:
        """Triton python-backend model delegating to ``{module_path}.Backend``."""

        def initialize(self, args: dict[str, str]) -> None:
            self.config = json.loads(args["model_config"])
            parameters = model_parameters(self.config)
            count = sum(int(g.get("count", 1)) for g in self.config.get("instance_group", []))
            configure_torch_threads(parameters, instance_count=count or 1)
            device = "cpu"
            if args.get("model_instance_kind") == "GPU":
                device = f"cuda:{args['model_instance_device_id']}"
            configure_gpu_determinism(device, parameters)
            weights = weights_dir_for(
                Path(args["model_repository"]), args["model_version"], parameters
            )
            module = importlib.import_module(module_path)
            self.backend = module.Backend(weights, parameters, device)
            self.inputs = [spec["name"] for spec in self.config["input"]]

        def execute(self, requests: list[Any]) -> list[Any]:
            import triton_python_backend_utils as pb_utils

            batches: list[dict[str, np.ndarray]] = []
            for request in requests:
                tensors = {}
                for name in self.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        tensors[name] = tensor.as_numpy()
                batches.append(tensors)
            responses = []
            for result in run_grouped(self.backend, batches):
                if isinstance(result, Exception):
                    responses.append(pb_utils.InferenceResponse(error=_triton_error(result)))
                else:
                    outputs = [
                        pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in result.items()
                    ]
                    responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            return responses

        def finalize(self) -> None:
            self.backend = None

    TritonPythonModel.__doc__ = f"Triton python-backend model delegating to {module_path}.Backend"
    return TritonPythonModel


def _triton_error(exc: Exception) -> Any:
    """A ``TritonError`` with INVALID_ARG for bad inputs, INTERNAL (and traceback) otherwise."""
    import triton_python_backend_utils as pb_utils

    error_cls = pb_utils.TritonError
    if isinstance(exc, BackendInputError):
        return error_cls(str(exc), error_cls.INVALID_ARG)
    message = f"{type(exc).__name__}: {exc}"
    pb_utils.Logger.log_error("".join(traceback.format_exception(exc)))
    return error_cls(message, error_cls.INTERNAL)
