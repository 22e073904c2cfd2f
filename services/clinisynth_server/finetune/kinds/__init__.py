"""The job kinds, by name. Each module holds one kind: its parameter specs, check and trainer.

``KINDS`` (every kind, for the service) imports them all; a worker imports only its own kind with
:func:`load`, so a classifier job never pays for importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clinisynth_server.finetune.kinds.base import KindSpec

NAMES = (
    "diffusion_pretrain",
    "text_to_image_adaptation",
    "reward_model",
    "reward_finetune",
    "classifier",
)


def load(name: str) -> KindSpec:
    """The spec of kind ``name`` (``KeyError`` when there is no such kind)."""
    if name not in NAMES:
        raise KeyError(name)
    spec: KindSpec = importlib.import_module(f"{__name__}.{name}").SPEC
    return spec


def __getattr__(attr: str) -> Any:
    if attr == "KINDS":
        return {name: load(name) for name in NAMES}
    raise AttributeError(attr)


__all__ = ["KINDS", "NAMES", "load"]
