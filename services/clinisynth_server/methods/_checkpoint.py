"""One checkpoint layout for the methods' small models: ``config.json`` + ``model.safetensors``.

``config.json`` holds ``{"kind": ..., "format_version": 1, "config": {...}}`` so a folder says what
it is before any tensor is read (a reward model folder handed to the classifier loader fails with a
clear message, not a missing-key traceback).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clinisynth_server.errors import FailedPrecondition, NotFound

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_checkpoint(
    directory: str | Path, kind: str, config: dict[str, Any], module: nn.Module
) -> Path:
    """Write the folder; each file is written to a temporary name and renamed (atomic per file)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, str(p)))
    text = json.dumps({"kind": kind, "format_version": FORMAT_VERSION, "config": config}, indent=2)
    _atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))
    return folder


def read_checkpoint(
    directory: str | Path, kind: str, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return ``(config, state_dict)``; ``NotFound`` / ``FailedPrecondition`` on a bad folder."""
    folder = Path(directory)
    cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights_path.is_file():
        raise NotFound(f"no {kind} checkpoint in {folder} (need {CONFIG_NAME} + {WEIGHTS_NAME})")
    meta = json.loads(cfg_path.read_text())
    if meta.get("kind") != kind:
        raise FailedPrecondition(f"{folder} holds a {meta.get('kind')!r}, not a {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FailedPrecondition(
            f"{folder}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}"
        )
    return meta["config"], load_file(str(weights_path), device=str(map_location))


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
