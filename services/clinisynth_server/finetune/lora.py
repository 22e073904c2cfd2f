"""LoRA adapters: check one against a base model's weights, and merge it into them.

An adapter is what diffusers' ``save_lora_weights`` writes (``pytorch_lora_weights.safetensors``:
peft-style ``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` keys, older
``lora.down`` / ``lora.up`` keys too, and the peft ``LoraConfig`` of each component in the
``lora_adapter_metadata`` header). Serving one means merging it: ``W' = W + scale · B @ A`` for
every targeted module (``scale = lora_alpha / r``, ``/ sqrt(r)`` under rsLoRA, 1 when no alpha is
stored — the convention diffusers loads with), written as plain safetensors so Triton serves a
merged model like any other version. Every module that does not fit the base (absent, another
shape or rank) is a field violation naming it, found before anything is written.
No grpc, no pickle: only safetensors are read.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clinisynth_server.errors import FieldViolation, ValidationErrors

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
#: adapter key prefix → the folder of the base model component it changes.
COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder"}
METADATA_KEY = "lora_adapter_metadata"
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
}
_FIELD = "source.lora"


@dataclass(frozen=True)
class Update:
    """One module's low-rank update, located in the base component's weight files."""

    component: str
    module: str
    file: pathlib.Path
    key: str
    a_key: str
    b_key: str
    #: ``lora_alpha / r``; None: the adapter stores the alpha as a tensor (``alpha_key``).
    scale: float | None
    alpha_key: str = ""


def is_adapter_folder(folder: pathlib.Path) -> bool:
    return (folder / ADAPTER_FILE).is_file()


def _metadata(raw: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    """The per-component LoraConfig dicts diffusers packs as ``"<component>.<key>"``."""
    try:
        packed = json.loads((raw or {}).get(METADATA_KEY) or "{}")
    except ValueError:
        packed = {}
    out: dict[str, dict[str, Any]] = {}
    if isinstance(packed, dict):
        for key, value in packed.items():
            component, _, name = str(key).partition(".")
            out.setdefault(component, {})[name] = value
    return out


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    """peft's ``alpha_pattern`` lookup: a pattern matches a module name or its dotted tail."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error:
            continue
    return None


def _weight_index(component_dir: pathlib.Path) -> dict[str, tuple[pathlib.Path, list[int]]]:
    """Every tensor of a base component: key → (file, shape), read from safetensors headers."""
    from safetensors import safe_open

    index: dict[str, tuple[pathlib.Path, list[int]]] = {}
    for path in sorted(component_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            names: list[str] = list(fh.keys())  # safe_open is not iterable
            for key in names:
                index[key] = (path, list(fh.get_slice(key).get_shape()))
    return index


def plan(adapter: pathlib.Path, base: pathlib.Path) -> tuple[list[Update], list[FieldViolation]]:
    """Match every adapter module to a base weight; the updates, or what does not fit."""
    from safetensors import safe_open

    errors = ValidationErrors()
    path = adapter / ADAPTER_FILE
    try:
        with safe_open(str(path), framework="pt") as fh:
            names: list[str] = list(fh.keys())  # safe_open is not iterable
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in names}
            meta = _metadata(fh.metadata())
    except Exception as exc:  # any parse failure of an untrusted file is the caller's
        errors.add(f"{_FIELD}.weights", f"{ADAPTER_FILE} is not a safetensors file: {exc}")
        return [], errors.violations
    pairs: dict[tuple[str, str], dict[str, str]] = {}
    alphas: dict[tuple[str, str], str] = {}
    for key in sorted(shapes):
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:
            errors.add(
                f"{_FIELD}.{component}",
                f"{key}: not a unet / text_encoder key (kohya-style adapters: convert to the "
                "diffusers format first)",
            )
            continue
        if rest.endswith(".alpha"):
            alphas[(component, rest[: -len(".alpha")])] = key
            continue
        for suffix, side in _SUFFIXES.items():
            if rest.endswith(suffix):
                pairs.setdefault((component, rest[: -len(suffix)]), {})[side] = key
                break
        else:
            errors.add(
                f"{_FIELD}.{component}.{rest.rsplit('.', 1)[0]}",
                f"{key}: only lora_A / lora_B weights can be merged (no DoRA, no LoRA bias)",
            )
    if not pairs and not errors.violations:
        errors.add(f"{_FIELD}.weights", f"{ADAPTER_FILE} holds no LoRA weights")
    for component, config in meta.items():
        if component in COMPONENTS and config.get("use_dora"):
            errors.add(f"{_FIELD}.{component}", "DoRA adapters cannot be merged here")
    indexes: dict[str, dict[str, tuple[pathlib.Path, list[int]]]] = {}
    updates: list[Update] = []
    for (component, module), sides in sorted(pairs.items()):
        field_name = f"{_FIELD}.{component}.{module}"
        sub = base / COMPONENTS[component]
        if not sub.is_dir():
            errors.add(f"{_FIELD}.{component}", f"the base model has no {component}")
            continue
        if component not in indexes:
            indexes[component] = _weight_index(sub)
        index = indexes[component]
        if set(sides) != {"A", "B"}:
            errors.add(field_name, "needs both lora_A and lora_B weights")
            continue
        candidates = (module, f"text_model.{module}", module.removeprefix("text_model."))
        key = next((f"{n}.weight" for n in candidates if f"{n}.weight" in index), "")
        if not key:
            errors.add(field_name, f"the base {component} has no module {module!r}")
            continue
        file, shape = index[key]
        a, b = shapes[sides["A"]], shapes[sides["B"]]
        rank = a[0] if a else 0
        fits = (
            len(shape) in (2, 4)
            and len(a) == len(shape)
            and len(b) == len(shape)
            and rank > 0
            and b[0] == shape[0]
            and b[1] == rank
            and a[1] == shape[1]
            and (len(shape) == 2 or (a[2:] == shape[2:] and b[2:] == [1, 1]))
        )
        if not fits:
            errors.add(
                field_name,
                f"does not fit the base: weight {shape}, lora_A {a}, lora_B {b} (lora_A must be "
                f"[r, {shape[1] if len(shape) > 1 else '?'}], lora_B [{shape[0]}, r])",
            )
            continue
        config = meta.get(component, {})
        alpha: Any = _pattern_value(config.get("alpha_pattern") or {}, module)
        if alpha is None:
            alpha = config.get("lora_alpha")
        alpha_key = alphas.get((component, module), "") if alpha is None else ""
        scale: float | None = None
        if not alpha_key:
            rank_root = math.sqrt(rank) if config.get("use_rslora") else rank
            scale = 1.0 if alpha is None else float(alpha) / rank_root
        updates.append(
            Update(component, module, file, key, sides["A"], sides["B"], scale, alpha_key)
        )
    return updates, errors.violations


def merge(
    adapter: pathlib.Path, base: pathlib.Path, out: pathlib.Path, updates: list[Update]
) -> None:
    """Write ``base`` with every update applied into ``out`` (a new folder; base unchanged)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    lora = load_file(str(adapter / ADAPTER_FILE))
    by_file: dict[pathlib.Path, list[Update]] = {}
    for update in updates:
        by_file.setdefault(update.file, []).append(update)
    for file, group in by_file.items():
        target = out / file.relative_to(base)
        tensors = load_file(str(file))
        for u in group:
            a, b = lora[u.a_key].double(), lora[u.b_key].double()
            scale = u.scale
            if scale is None:
                scale = float(lora[u.alpha_key].item()) / a.shape[0]
            weight = tensors[u.key]
            delta = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape) * scale
            tensors[u.key] = (weight.double() + delta).to(weight.dtype).contiguous()
        save_file(tensors, str(target), metadata={"format": "pt"})
