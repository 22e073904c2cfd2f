"""Checkpoint files that never run code when read: safetensors for tensors, JSON for the rest.

Two layouts live here:

- the methods' small models: ``config.json`` + ``model.safetensors``. ``config.json`` holds
  ``{"kind": ..., "format_version": 1, "config": {...}}`` so a folder says what it is before any
  tensor is read (a reward model folder handed to the classifier loader fails with a clear
  message, not a missing-key traceback);
- resumable training state (:func:`save_state` / :func:`load_state`): any nest of dicts, lists,
  tuples, scalars, numpy arrays and tensors (optimiser, LR schedule, RNG, sampler, EMA) split
  into ``trainer.safetensors`` + ``trainer.json``. Unlike ``torch.load`` / ``pickle``, reading
  them can only produce those types, so a replaced file can corrupt numbers but never run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# resumable training state
# ---------------------------------------------------------------------------------------------

STATE_FORMAT = "clinisynth.training-state"
STATE_VERSION = 2
STATE_TENSORS = "trainer.safetensors"
STATE_JSON = "trainer.json"
STATE_FILES = (STATE_TENSORS, STATE_JSON)

# Markers for what JSON cannot say directly; a dict holding exactly one of them is that value.
_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
_MODULE_STATE = "__state_dict__"  # a module's state_dict with its per-submodule ``_metadata``
_MARKERS = frozenset((_TENSOR, _ARRAY, _TUPLE, _ITEMS, _MODULE_STATE))
# numpy arrays in state are RNG keys and counters: plain numeric dtypes only, never ``object``.
_ARRAY_DTYPES = frozenset(
    (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
)


class StateFormatError(ValueError):
    """A state folder that is not in the expected format or does not decode."""


def save_state(directory: str | Path, state: Mapping[str, Any]) -> list[Path]:
    """Write ``state`` as ``trainer.safetensors`` + ``trainer.json`` in ``directory``.

    Raises ``TypeError`` naming the path of any value that is not plain data (a module, a
    function …): such a value could only be restored by unpickling, which is never done.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "state", tensors, set())
    _atomic_write(
        folder / STATE_TENSORS,
        lambda p: save_file(tensors, str(p), metadata={"format": STATE_FORMAT}),
    )
    text = json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "state": tree})
    _atomic_write(folder / STATE_JSON, lambda p: Path(p).write_text(text))
    return [folder / name for name in STATE_FILES]


def load_state(directory: str | Path) -> dict[str, Any]:
    """Read what :func:`save_state` wrote (tensors on CPU); ``StateFormatError`` otherwise."""
    folder = Path(directory)
    try:
        meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS), device="cpu")
    except Exception as exc:  # OSError, JSON errors, safetensors' own SafetensorError
        raise StateFormatError(f"unreadable training state in {folder}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise StateFormatError(f"{folder / STATE_JSON} is not a {STATE_FORMAT} file")
    if meta.get("version") != STATE_VERSION:
        raise StateFormatError(
            f"{folder / STATE_JSON}: state version {meta.get('version')!r} is not {STATE_VERSION}"
        )
    state = _decode(meta.get("state"), tensors)
    if not isinstance(state, dict):
        raise StateFormatError(f"{folder / STATE_JSON}: the state is not a mapping")
    return state


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(root: str | Path) -> dict[str, str]:
    """``{relative POSIX path: sha256}`` of every file under ``root`` (the checkpoint manifest)."""
    base = Path(root)
    return {
        p.relative_to(base).as_posix(): sha256_of(p) for p in sorted(base.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# the checkpoint manifest and verification against recorded digests
# ---------------------------------------------------------------------------------------------

MANIFEST_NAME = "checkpoint.json"
MANIFEST_VERSION = 2  # 1: pickled state/trainer.pt, no file digests (refused, never unpickled)


class DigestMismatch(ValueError):
    """A checkpoint file (``path``, relative to the checkpoint) that is not what was recorded."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def manifest_files(raw: bytes, expected_sha256: str | None = None) -> dict[str, str]:
    """The ``{path: sha256}`` list of manifest bytes, checked against ``expected_sha256``.

    The expected digest is the one the finetune service recorded when the worker reported the
    checkpoint; a manifest rewritten since (even one consistent with rewritten files) differs.
    """
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256:
            raise DigestMismatch(
                MANIFEST_NAME,
                f"sha256 {digest[:12]}… is not the {expected_sha256[:12]}… recorded when "
                "it was written",
            )
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise DigestMismatch(MANIFEST_NAME, "not JSON") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format_version") != MANIFEST_VERSION
        or not isinstance(files, dict)
    ):
        raise DigestMismatch(
            MANIFEST_NAME,
            "written in an older format without file digests (pickled state/trainer.pt), "
            "which is never unpickled",
        )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise DigestMismatch(MANIFEST_NAME, "malformed file list")
    return dict(files)


def verify_tree(root: str | Path, expected: Mapping[str, str], *, label: str = "") -> None:
    """Every file under ``root`` is in ``expected`` with that sha256, and none is missing.

    ``label`` prefixes the relative paths in errors (``model/`` for a checkpoint's model
    folder), so the message names the file as the manifest does.
    """
    actual = file_digests(root) if Path(root).is_dir() else {}
    for rel in sorted(set(actual) | set(expected)):
        if rel not in expected:
            raise DigestMismatch(label + rel, "not in the recorded file list")
        if rel not in actual:
            raise DigestMismatch(label + rel, "missing")
        if actual[rel] != expected[rel]:
            raise DigestMismatch(
                label + rel,
                f"sha256 {actual[rel][:12]}… is not the recorded {expected[rel][:12]}…",
            )


def _plain_tensor(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """A CPU, contiguous tensor owning its storage (safetensors refuses shared storage)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_sparse or t.is_quantized:
        raise TypeError("sparse / quantized tensors are not supported in training state")
    storage = t.untyped_storage()
    ptr = storage.data_ptr()
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == storage.nbytes()
    if not whole or (ptr and ptr in seen):
        t = t.contiguous().clone()
        ptr = t.untyped_storage().data_ptr()
    if ptr:
        seen.add(ptr)
    return t


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = _plain_tensor(obj, seen)
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in _ARRAY_DTYPES:
            raise TypeError(f"{path}: numpy dtype {obj.dtype} is not supported in training state")
        return {
            _ARRAY: {
                "dtype": obj.dtype.name,
                "shape": list(obj.shape),
                "data": obj.ravel().tolist(),
            }
        }
    if isinstance(obj, np.generic):
        return _encode(obj.item(), path, tensors, seen)
    if isinstance(obj, (tuple, torch.Size)):
        return {_TUPLE: [_encode(v, f"{path}[{i}]", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}[{i}]", tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping) and isinstance(getattr(obj, "_metadata", None), Mapping):
        # Module state_dicts carry version numbers that load_state_dict uses for upgrades.
        return {
            _MODULE_STATE: {
                "entries": _encode(dict(obj), path, tensors, seen),
                "metadata": _encode(
                    dict(obj._metadata),  # type: ignore[attr-defined]  # torch sets it at runtime
                    f"{path}._metadata",
                    tensors,
                    seen,
                ),
            }
        }
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors, seen) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise TypeError(f"{path}: key {k!r} of type {type(k).__name__} is not supported")
            items.append(
                [
                    _encode(k, f"{path}<key>", tensors, seen),
                    _encode(v, f"{path}[{k!r}]", tensors, seen),
                ]
            )
        return {_ITEMS: items}
    raise TypeError(
        f"{path}: a {type(obj).__module__}.{type(obj).__qualname__} is not plain data "
        "(tensors, numbers, strings, lists, tuples, dicts) and cannot go in training state"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((marker, value),) = obj.items()
        if marker == _TENSOR:
            if not isinstance(value, str) or value not in tensors:
                raise StateFormatError(f"state refers to a missing tensor {value!r}")
            return tensors[value]
        if marker == _ARRAY:
            return _decode_array(value)
        if marker == _TUPLE:
            if not isinstance(value, list):
                raise StateFormatError("a tuple entry is not a list")
            return tuple(_decode(v, tensors) for v in value)
        if marker == _MODULE_STATE:
            if not isinstance(value, dict):
                raise StateFormatError("a state_dict entry is not a mapping")
            entries, metadata = (
                _decode(value.get("entries"), tensors),
                _decode(value.get("metadata"), tensors),
            )
            if not isinstance(entries, dict) or not isinstance(metadata, dict):
                raise StateFormatError("a state_dict entry lacks its entries or metadata")
            module_state: OrderedDict[str, Any] = OrderedDict(entries)
            module_state._metadata = metadata  # type: ignore[attr-defined]  # as torch does
            return module_state
        if marker == _ITEMS:
            if not isinstance(value, list) or not all(
                isinstance(kv, list) and len(kv) == 2 for kv in value
            ):
                raise StateFormatError("a mapping entry is not a list of [key, value] pairs")
            out = {}
            for k, v in value:
                key = _decode(k, tensors)
                if not (key is None or isinstance(key, (bool, int, float, str, tuple))):
                    raise StateFormatError(f"unsupported mapping key {key!r}")
                out[key] = _decode(v, tensors)
            return out
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _decode_array(value: Any) -> np.ndarray:
    if not isinstance(value, dict) or value.get("dtype") not in _ARRAY_DTYPES:
        raise StateFormatError(f"bad numpy array entry in state: dtype {value!r}")
    shape, data = value.get("shape"), value.get("data")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise StateFormatError("bad numpy array shape in state")
    if not isinstance(data, list):
        raise StateFormatError("bad numpy array data in state")
    try:
        return np.asarray(data, dtype=np.dtype(value["dtype"])).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise StateFormatError(f"bad numpy array in state: {exc}") from exc


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
