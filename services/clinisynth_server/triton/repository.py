"""Build a Triton model repository: every model is a *role* plus a weights folder.

Layout written here (one model)::

    <repo>/<name>/config.pbtxt          backend "python", tensors from the role's model_spec
    <repo>/<name>/<version>/model.py    a few generated lines delegating to the role module
    <repo>/<name>/<version>/weights/    the checkpoint (diffusers/transformers folder)

A *packed* model (:func:`write_packed_model`, see ``packing.py``) holds every component of one
served model in one python-backend process: ``<repo>/<name>/<role>/<version>/weights`` per
component beside ``<repo>/<name>/<version>/`` (``model.py`` + a manifest naming them).

Roles map to modules by a small registry: ``clinisynth_server.triton.backends.<role>`` is
found on its own; modules elsewhere join with :func:`register_role`. The config is written
per model (shared by its versions); :func:`add_version` adds a version next to the others,
then ``TritonClient.load_model(name)`` makes Triton serve it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from clinisynth_server.errors import AlreadyExists, InvalidArgument, NotFound
from clinisynth_server.triton import packing
from clinisynth_server.triton.backends._base import ModelSpec, TensorSpec

BUILTIN_PACKAGE = "clinisynth_server.triton.backends"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: role name → module path, for roles that live outside ``BUILTIN_PACKAGE``.
_EXTRA_ROLES: dict[str, str] = {}

InstanceKind = Literal["cpu", "gpu"]


def check_instance_kind(value: str, field: str = "instance_kind") -> InstanceKind:
    """A configured instance kind (a plain string from config) as the literal type."""
    if value == "cpu":
        return "cpu"
    if value == "gpu":
        return "gpu"
    raise InvalidArgument.for_field(field, f"'cpu' or 'gpu', got {value!r}")


def register_role(role: str, module_path: str) -> None:
    """Add a role implemented in ``module_path`` (exports ``model_spec`` and ``Backend``)."""
    _EXTRA_ROLES[role] = module_path


def role_module_path(role: str) -> str:
    """The dotted module implementing ``role`` (registered ones first, then built-ins)."""
    if role in _EXTRA_ROLES:
        return _EXTRA_ROLES[role]
    if not role or role.startswith("_") or not role.isidentifier():
        raise InvalidArgument.for_field("role", f"not a role name: {role!r}")
    return f"{BUILTIN_PACKAGE}.{role}"


def role_module(role: str) -> ModuleType:
    """Import the role's module; :class:`NotFound` when no such role exists."""
    path = role_module_path(role)
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name and path.startswith(exc.name):
            raise NotFound(f"no Triton role {role!r} (looked for module {path})") from exc
        raise
    if not hasattr(module, "model_spec") or not hasattr(module, "Backend"):
        raise NotFound(f"module {path} is not a role: it needs model_spec() and Backend")
    return module


@dataclass(frozen=True)
class Batching:
    """Dynamic batching: how long a request may wait for partners, which sizes to aim for."""

    max_queue_delay_us: int = 3000
    preferred_batch_sizes: tuple[int, ...] | None = None  # None: (max/2, max)


def list_versions(repo_dir: Path | str, name: str) -> list[int]:
    """Numeric version folders of a model, ascending (empty when the model is absent)."""
    model_dir = Path(repo_dir) / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def list_models(repo_dir: Path | str) -> list[str]:
    """Model folders (those with a ``config.pbtxt``) in the repository."""
    root = Path(repo_dir)
    return sorted(p.name for p in root.iterdir() if (p / "config.pbtxt").is_file())


def write_model(
    repo_dir: Path | str,
    name: str,
    role: str,
    weights_dir: Path | str,
    *,
    version: int | None = None,
    max_batch_size: int = 8,
    instance_kind: InstanceKind = "cpu",
    instance_count: int = 1,
    batching: Batching | None = None,
    keep_versions: int = 2,
    parameters: Mapping[str, str] | None = None,
) -> int:
    """Write (or rewrite) model ``name``: its config and one version; returns the version.

    ``version=None`` takes the next free number. ``keep_versions`` is how many of the
    newest versions Triton serves at once (2: a new version goes live while clients pinned
    to the previous one keep working). ``parameters`` land in ``config.pbtxt`` and reach
    the backend (``torch_threads``, ``torch_dtype``, ``random_init_seed`` …).
    """
    _check_name(name)
    params = dict(parameters or {})
    module_path = role_module_path(role)
    spec: ModelSpec = role_module(role).model_spec(Path(weights_dir), params)
    model_dir = Path(repo_dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = _write_version(model_dir, module_path, role, Path(weights_dir), version)
    config = render_config(
        name,
        spec,
        role=role,
        max_batch_size=max_batch_size,
        instance_kind=instance_kind,
        instance_count=instance_count,
        batching=batching or Batching(),
        keep_versions=keep_versions,
        parameters=params,
    )
    _atomic_write(model_dir / "config.pbtxt", config)
    return version


@dataclass(frozen=True)
class PackedComponent:
    """One component of a packed model: the role serving it, its weights and parameters."""

    role: str
    weights_dir: Path
    parameters: Mapping[str, str]


PACKED_MODULE = f"{BUILTIN_PACKAGE}.{packing.PACKED_ROLE}"


def write_packed_model(
    repo_dir: Path | str,
    name: str,
    components: list[PackedComponent],
    *,
    version: int,
    max_batch_size: int = 8,
    instance_kind: InstanceKind = "cpu",
    instance_count: int = 1,
    batching: Batching | None = None,
    keep_versions: int = 2,
    parameters: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Write version ``version`` of packed model ``name``; returns each role's address.

    Each component's weights go to ``<name>/<role>/<version>/weights`` (sub-folders Triton
    ignores) first, then the version folder — a manifest naming them — is renamed into place,
    so Triton never sees a version whose components are half written. The config declares
    every component's tensors as optional ``<role>__<tensor>`` and its parameters as
    ``<role>__<key>``; ``parameters`` apply to every component.
    """
    _check_name(name)
    if not components:
        raise InvalidArgument.for_field("components", f"packed model {name!r} needs one")
    model_dir = Path(repo_dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    params: dict[str, str] = {"packed_roles": ",".join(c.role for c in components)}
    manifest: dict[str, dict[str, str]] = {}
    addresses: dict[str, str] = {}
    for comp in components:
        own = dict(comp.parameters)
        spec: ModelSpec = role_module(comp.role).model_spec(Path(comp.weights_dir), own)
        inputs += [_packed_tensor(comp.role, t, optional=True) for t in spec.inputs]
        outputs += [_packed_tensor(comp.role, t, optional=False) for t in spec.outputs]
        for key, value in {**spec.parameters, **own}.items():
            params[packing.tensor_name(comp.role, key)] = value
        _write_component(model_dir / comp.role, Path(comp.weights_dir), version)
        manifest[comp.role] = {
            "module": role_module_path(comp.role),
            "weights": f"../../{comp.role}/{version}/weights",
        }
        addresses[comp.role] = packing.address(name, comp.role)
    with _scratch_dir(model_dir) as tmp:
        (tmp / "config.json").write_text(
            json.dumps({"_class_name": "ClinisynthPacked", "components": manifest}, indent=2),
            encoding="utf-8",
        )
        _write_version(model_dir, PACKED_MODULE, packing.PACKED_ROLE, tmp, version)
    config = render_config(
        name,
        ModelSpec(inputs=tuple(inputs), outputs=tuple(outputs)),
        role=packing.PACKED_ROLE,
        max_batch_size=max_batch_size,
        instance_kind=instance_kind,
        instance_count=instance_count,
        batching=batching or Batching(),
        keep_versions=keep_versions,
        parameters={**params, **dict(parameters or {})},
    )
    _atomic_write(model_dir / "config.pbtxt", config)
    return addresses


def _packed_tensor(role: str, tensor: TensorSpec, *, optional: bool) -> TensorSpec:
    return TensorSpec(packing.tensor_name(role, tensor.name), tensor.dtype, tensor.dims, optional)


def _write_component(component_dir: Path, weights_dir: Path, version: int) -> None:
    """Copy one packed component's weights to ``<component_dir>/<version>/weights``.

    The version is new to the catalog, so a folder already there was left by an interrupted
    import (its packed version folder never written): it is replaced.
    """
    if not (weights_dir / "config.json").is_file():
        raise InvalidArgument.for_field("weights_dir", f"{weights_dir} has no config.json")
    component_dir.mkdir(parents=True, exist_ok=True)
    staging = component_dir / f".staging-{uuid.uuid4().hex}"
    try:
        shutil.copytree(weights_dir, staging / "weights")
        shutil.rmtree(component_dir / str(version), ignore_errors=True)
        os.rename(staging, component_dir / str(version))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _scratch_dir(parent: Path) -> Iterator[Path]:
    """A scratch folder inside ``parent`` (non-numeric: Triton ignores it), removed after."""
    path = parent / f".staging-{uuid.uuid4().hex}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def packed_component_versions(repo_dir: Path | str, name: str) -> dict[str, list[int]]:
    """A packed model's component weight folders: role → version numbers (empty otherwise)."""
    model_dir = Path(repo_dir) / name
    if not model_dir.is_dir():
        return {}
    return {
        p.name: list_versions(model_dir, p.name)
        for p in sorted(model_dir.iterdir())
        if p.is_dir() and not p.name.isdigit() and not p.name.startswith(".")
    }


def add_version(
    repo_dir: Path | str, name: str, weights_dir: Path | str, *, version: int | None = None
) -> int:
    """Add a version of an existing model (same role and config); returns its number.

    The new checkpoint must fit the model's config (same tensors); ``load_model`` then
    makes Triton pick it up.
    """
    model_dir = Path(repo_dir) / name
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        raise NotFound(f"model {name!r} is not in repository {repo_dir}")
    role = read_role(config_path)
    return _write_version(model_dir, role_module_path(role), role, Path(weights_dir), version)


def read_role(config_path: Path) -> str:
    """The role recorded in a ``config.pbtxt`` written by :func:`write_model`."""
    text = config_path.read_text(encoding="utf-8")
    pattern = r'key:\s*"clinisynth_role"\s*value:\s*\{\s*string_value:\s*"([^"]+)"'
    match = re.search(pattern, text)
    if not match:
        raise NotFound(f"{config_path} was not written by clinisynth (no clinisynth_role)")
    return match.group(1)


def model_py(role: str, module_path: str) -> str:
    """The generated ``model.py``: fix ``sys.path`` then delegate to the role module.

    Triton's python stub runs an *isolated* interpreter that ignores ``PYTHONPATH``, so the
    entries the launcher puts there are added here before ``clinisynth_server`` is imported.
    """
    return f'''"""Triton python-backend entry, clinisynth role {role!r}. Generated; do not edit."""

import os
import site
import sys

for _entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)
        site.addsitedir(_entry)  # honour .pth files (editable installs)

from clinisynth_server.triton.backends._entry import python_model  # noqa: E402

TritonPythonModel = python_model("{module_path}")
'''


def render_config(
    name: str,
    spec: ModelSpec,
    *,
    role: str,
    max_batch_size: int,
    instance_kind: InstanceKind,
    instance_count: int,
    batching: Batching,
    keep_versions: int,
    parameters: Mapping[str, str],
) -> str:
    """``config.pbtxt`` text for a python-backend model (protobuf text format)."""
    if max_batch_size < 1:
        raise InvalidArgument.for_field("max_batch_size", f"must be ≥ 1, got {max_batch_size}")
    if instance_kind not in ("cpu", "gpu"):
        raise InvalidArgument.for_field("instance_kind", f"'cpu' or 'gpu', got {instance_kind!r}")
    preferred = batching.preferred_batch_sizes or tuple(
        sorted({max(1, max_batch_size // 2), max_batch_size})
    )
    if any(size > max_batch_size or size < 1 for size in preferred):
        raise InvalidArgument.for_field(
            "batching.preferred_batch_sizes", f"must lie in [1, {max_batch_size}]: {preferred}"
        )
    all_params = {**spec.parameters, **parameters, "clinisynth_role": role}
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        *_tensor_block("input", spec.inputs),
        *_tensor_block("output", spec.outputs),
        "instance_group [",
        f"  {{ kind: KIND_{instance_kind.upper()} count: {instance_count} }}",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(s) for s in preferred)} ]",
        f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}",
        "}",
        f"version_policy: {{ latest: {{ num_versions: {keep_versions} }} }}",
    ]
    for key, value in sorted(all_params.items()):
        value_text = f'{{ string_value: "{_escape(value)}" }}'
        lines.append(f'parameters: {{ key: "{key}" value: {value_text} }}')
    return "\n".join(lines) + "\n"


def _tensor_block(kind: str, tensors: tuple[TensorSpec, ...]) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        dims = t.dims or (1,)
        body = f'name: "{t.name}" data_type: {t.triton_dtype} dims: [ {", ".join(map(str, dims))} ]'
        if not t.dims:
            body += " reshape: { shape: [ ] }"
        if t.optional and kind == "input":
            body += " optional: true"
        lines.append(f"  {{ {body} }}" + ("," if i < len(tensors) - 1 else ""))
    lines.append("]")
    return lines


def _write_version(
    model_dir: Path, module_path: str, role: str, weights_dir: Path, version: int | None
) -> int:
    """Stage ``<version>/`` under a non-numeric name Triton ignores, then rename into place."""
    if not (weights_dir / "config.json").is_file():
        raise InvalidArgument.for_field("weights_dir", f"{weights_dir} has no config.json")
    existing = list_versions(model_dir.parent, model_dir.name)
    if version is None:
        version = (existing[-1] + 1) if existing else 1
    if version < 1:
        raise InvalidArgument.for_field("version", f"must be ≥ 1, got {version}")
    if version in existing:
        raise AlreadyExists(f"model {model_dir.name!r} already has version {version}")
    staging = model_dir / f".staging-{uuid.uuid4().hex}"
    try:
        shutil.copytree(weights_dir, staging / "weights")
        (staging / "model.py").write_text(model_py(role, module_path), encoding="utf-8")
        os.rename(staging, model_dir / str(version))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise InvalidArgument.for_field("name", f"letters, digits, '_', '-', '.' only: {name!r}")


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"')
