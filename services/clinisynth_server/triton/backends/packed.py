"""Role ``packed``: every component of one served model in one process, dispatched by name.

The Triton config (``repository.write_packed_model``) declares each component's tensors as
optional ``<role>__<tensor>`` inputs and ``<role>__<tensor>`` outputs; a request carries one
component's inputs, so its prefix names the component. The ``weights`` folder is a manifest:
role → the role module and its weights folder (relative to the manifest). Each component is the
same :class:`Backend` object its split model would load, with the same parameters, so both
layouts give identical numbers. One process holds them all: no parallelism between components of
one model, and a crash takes every component down (docs/OPERATIONS.md, "serving memory").
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clinisynth_server.triton import packing
from clinisynth_server.triton.backends._base import BackendInputError, ModelSpec, merges, read_json


def model_spec(weights_dir: Path, parameters: Mapping[str, str]) -> ModelSpec:
    """Not written through ``write_model``: ``repository.write_packed_model`` builds the config
    from each component's own spec."""
    raise ValueError("a packed model is written by repository.write_packed_model")


class Backend:
    """Each component's backend, loaded in manifest order; ``__call__`` routes one component."""

    def __init__(self, weights_dir: Path, parameters: Mapping[str, str], device: str = "cpu"):
        manifest = read_json(Path(weights_dir) / "config.json")
        self.parts: dict[str, Any] = {}
        for role, entry in manifest["components"].items():
            module = importlib.import_module(str(entry["module"]))
            folder = (Path(weights_dir) / str(entry["weights"])).resolve()
            self.parts[role] = module.Backend(
                folder, packing.component_parameters(parameters, role), device
            )

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        role, part = self._route(inputs)
        out = part({packing.split_tensor_name(n)[1]: a for n, a in inputs.items()})
        return {packing.tensor_name(role, n): a for n, a in out.items()}

    def merges(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """The routed component's rule for sharing one forward (``run_grouped``)."""
        try:
            _, part = self._route(inputs)
        except BackendInputError:
            return False  # run alone, so the error reaches only this request
        return merges(part, {packing.split_tensor_name(n)[1]: a for n, a in inputs.items()})

    def _route(self, inputs: Mapping[str, np.ndarray]) -> tuple[str, Any]:
        roles = {packing.split_tensor_name(name)[0] for name in inputs}
        if len(roles) != 1 or "" in roles:
            raise BackendInputError(
                f"inputs of a packed model name exactly one component (<role>__<input>); "
                f"got {sorted(inputs)}"
            )
        role = roles.pop()
        part = self.parts.get(role)
        if part is None:
            raise BackendInputError(f"input '{next(iter(inputs))}': no component {role!r} here")
        return role, part
