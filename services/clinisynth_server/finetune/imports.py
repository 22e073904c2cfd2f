"""Bring your own model: upload a checkpoint folder, validate it, serve it, alias and retire it.

Why here: the finetune service already owns catalog writes, promotion and the Triton model
repository. An import is all-or-nothing because the catalog record is written last
(``registry.register_folder``): an import killed midway leaves at most Triton component versions
without a record (never served, skipped by the next registration), so the next import of the same
folder simply succeeds. Every problem of a folder is found before anything reaches Triton and is
reported as a field violation (``source.tokenizer``, ``source.unet.cross_attention_dim``, ...).
No grpc here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import (
    ClinisynthError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ValidationErrors,
)
from clinisynth_server.finetune import lora
from clinisynth_server.store.base import (
    IMPORTS_NAMESPACE,
    ArtifactStore,
    ObjectInfo,
    confine_key,
    outside_service_namespaces,
    validate_key,
)
from clinisynth_server.tenancy import Viewer
from clinisynth_server.triton import packing

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
UPLOAD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "gpu")
REPLAY_MODES = ("exact", "batched")
MAX_INSTANCES = 16
MAX_BATCH = 256
#: Pipelines whose folders are recognised (``model_index.json`` ``_class_name``).
PIPELINES = ("StableDiffusionPipeline", "DDPMPipeline", "DDIMPipeline")
#: Component names a caller uses (the diffusers folder's sub-folders) → the Triton role serving it.
COMPONENTS = {"unet": "denoiser", "text_encoder": "text_encoder", "vae": "vae_decode"}
#: Latent side of the import-time float16 VAE check (a 16×16 latent: a 128-pixel SD image).
FP16_CHECK_LATENT = 16
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class ImportSettings:
    """Operator settings: ``allow_pickle_weights`` admits ``.bin`` weights (then loaded with
    ``torch.load(weights_only=True)``, as diffusers and transformers load them)."""

    model_repository: str = ""
    allow_pickle_weights: bool = False


@dataclass(frozen=True)
class ImportOptions:
    source: str
    name: str
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    dtype: str = ""
    device: str = ""
    instances: int = 0
    max_batch_size: int = 0
    #: A LoRA adapter import: the served version (``NAME``, ``NAME@V`` or ``NAME@ALIAS``) the
    #: adapter is merged into; the merged weights become the new version of ``name``.
    base_name: str = ""
    base_version: str = ""
    #: Per component ("unet", "text_encoder", "vae"): its dtype / device over ``dtype`` /
    #: ``device``.
    component_dtypes: Mapping[str, str] = field(default_factory=dict)
    component_devices: Mapping[str, str] = field(default_factory=dict)
    #: "exact" (each image's rows a forward of their own: bit-identical replay) or "batched".
    replay: str = ""
    #: "split" (one Triton model per component) or "packed" (one process per instance holding
    #: every component); see ``triton/packing.py``.
    layout: str = ""


@dataclass(frozen=True)
class ComponentSetting:
    """What one component of an import is served with, and why (for the progress message)."""

    dtype: str
    device: str
    note: str = ""


@dataclass(frozen=True)
class ImportProgress:
    """One stage of an import: fetch, merge (LoRA), validate, write / load each component,
    record. ``total`` is known once the folder is fetched (its components decide it)."""

    stage: str
    step: int
    total: int
    message: str


@dataclass(frozen=True)
class ModelView:
    """A record plus what changes beside it: retired, aliases, readiness in Triton."""

    record: ModelRecord
    retired: bool
    latest: bool
    aliases: list[str]
    ready: dict[str, bool]


# -- validation ---------------------------------------------------------------------------------
def _json(path: pathlib.Path, errors: ValidationErrors, field_name: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        errors.add(field_name, f"{path.name} is not JSON: {exc}")
        return None
    if not isinstance(data, dict):
        errors.add(field_name, f"{path.name} is not a JSON object")
        return None
    return data


def _check_weights(
    folder: pathlib.Path, field_name: str, errors: ValidationErrors, allow_pickle: bool
) -> None:
    """Weights present, safetensors readable; pickle refused unless allowed, then weights_only."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    safe = [p for p in files if p.suffix in SAFE_SUFFIXES]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not safe and not pickled:
        errors.add(field_name, f"{folder.name}/ holds no weight files (*.safetensors)")
        return
    for path in safe:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # any parse failure of an untrusted file is the caller's
            errors.add(f"{field_name}.weights", f"{path.name} is not a safetensors file: {exc}")
    if pickled and not safe:
        if not allow_pickle:
            errors.add(
                f"{field_name}.weights",
                f"{', '.join(p.name for p in pickled)}: pickle weights are refused; convert to "
                "safetensors (or the operator sets CLINISYNTH_FINETUNE_ALLOW_PICKLE_WEIGHTS)",
            )
            return
        import torch

        for path in pickled:
            try:
                torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # weights_only refuses code; anything else is corrupt
                errors.add(f"{field_name}.weights", f"{path.name} is not plain tensors: {exc}")


def _check_component(
    folder: pathlib.Path,
    sub: str,
    config_name: str,
    errors: ValidationErrors,
    allow_pickle: bool,
    *,
    weights: bool = True,
) -> dict[str, Any] | None:
    field_name = f"source.{sub}"
    if not (folder / sub).is_dir():
        errors.add(field_name, f"missing: the folder has no {sub}/")
        return None
    config = _json(folder / sub / config_name, errors, field_name)
    if config is None:
        errors.add(field_name, f"missing {sub}/{config_name}")
        return None
    if weights:
        _check_weights(folder / sub, field_name, errors, allow_pickle)
    return config


def validate_folder(folder: pathlib.Path, *, allow_pickle: bool = False) -> list[FieldViolation]:
    """Every problem of a model folder, as field violations, before anything reaches Triton."""
    errors = ValidationErrors()
    index = _json(folder / "model_index.json", errors, "source.model_index")
    meta = _json(folder / "clinisynth.json", errors, "source.clinisynth") or {}
    if index is not None:
        cls = index.get("_class_name")
        if cls not in PIPELINES:
            errors.add(
                "source.model_index._class_name",
                f"unknown pipeline class {cls!r}; recognised: {', '.join(PIPELINES)}",
            )
        elif cls == "StableDiffusionPipeline":
            _validate_sd(folder, errors, allow_pickle)
        else:
            unet = _check_component(folder, "unet", "config.json", errors, allow_pickle)
            _check_component(
                folder, "scheduler", "scheduler_config.json", errors, allow_pickle, weights=False
            )
            if unet is not None and unet.get("_class_name") != "UNet2DModel":
                errors.add(
                    "source.unet", f"{cls} needs a UNet2DModel, not {unet.get('_class_name')}"
                )
    elif meta.get("kind") in ("reward", "classifier"):
        if not meta.get("triton_role"):
            errors.add("source.clinisynth.triton_role", "a scorer folder names its Triton role")
        _check_weights(folder, "source", errors, allow_pickle)
    else:
        unet_dir = "unet" if (folder / "unet").is_dir() else ""
        config = _json(folder / unet_dir / "config.json", errors, "source")
        if config is None or config.get("_class_name") != "UNet2DModel":
            errors.add(
                "source",
                "not a recognised model folder: a StableDiffusionPipeline / DDPMPipeline / "
                "DDIMPipeline folder (model_index.json), a UNet2DModel folder, or a clinisynth "
                "classifier / reward folder (clinisynth.json with kind)",
            )
        else:
            _check_weights(
                folder / unet_dir, "source.unet" if unet_dir else "source", errors, allow_pickle
            )
    return errors.violations


def _validate_sd(folder: pathlib.Path, errors: ValidationErrors, allow_pickle: bool) -> None:
    unet = _check_component(folder, "unet", "config.json", errors, allow_pickle)
    text = _check_component(folder, "text_encoder", "config.json", errors, allow_pickle)
    vae = _check_component(folder, "vae", "config.json", errors, allow_pickle)
    _check_component(
        folder, "scheduler", "scheduler_config.json", errors, allow_pickle, weights=False
    )
    tok = folder / "tokenizer"
    if not tok.is_dir():
        errors.add("source.tokenizer", "missing: the folder has no tokenizer/")
    elif not (tok / "tokenizer.json").is_file() and not (
        (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    ):
        errors.add("source.tokenizer", "needs vocab.json + merges.txt (or tokenizer.json)")
    if unet is not None and text is not None:
        cross, hidden = unet.get("cross_attention_dim"), text.get("hidden_size")
        if cross != hidden:
            errors.add(
                "source.unet.cross_attention_dim",
                f"{cross} does not match the text encoder's hidden_size {hidden}",
            )
    if unet is not None and vae is not None:
        latent, in_ch = vae.get("latent_channels"), unet.get("in_channels")
        if latent != in_ch:
            errors.add(
                "source.vae.latent_channels",
                f"{latent} does not match the U-Net's in_channels {in_ch}",
            )


def check_options(options: ImportOptions) -> tuple[str, ValidationErrors]:
    """Validate the import options; returns the cleaned source prefix and the problems."""
    errors = ValidationErrors()
    source = options.source.strip().strip("/")
    if not source:
        errors.add("source", "required: a store prefix (imports/<upload id> or a data prefix)")
    else:
        try:
            if source.startswith(IMPORTS_NAMESPACE):
                upload_id(confine_key(source, IMPORTS_NAMESPACE, "source"), "source")
            else:
                outside_service_namespaces(source, "source")
        except InvalidArgument as exc:
            errors.violations.extend(exc.violations)
            source = ""
    if not NAME_RE.match(options.name):
        errors.add(
            "name",
            "required: letters, digits, '_', '-', '.' (at most 100), starting with a letter or "
            f"digit; got {options.name!r}",
        )
    if options.dtype and options.dtype not in DTYPES:
        errors.add("dtype", f"one of {', '.join(DTYPES)}; got {options.dtype!r}")
    if options.device and options.device not in DEVICES:
        errors.add("device", f"one of {', '.join(DEVICES)}; got {options.device!r}")
    if options.replay and options.replay not in REPLAY_MODES:
        errors.add("replay", f"one of {', '.join(REPLAY_MODES)}; got {options.replay!r}")
    if options.layout and options.layout not in packing.LAYOUTS:
        errors.add("layout", f"one of {', '.join(packing.LAYOUTS)}; got {options.layout!r}")
    for map_name, values, allowed in (
        ("component_dtypes", options.component_dtypes, DTYPES),
        ("component_devices", options.component_devices, DEVICES),
    ):
        for key, value in values.items():
            if key not in COMPONENTS:
                errors.add(
                    f"{map_name}[{key}]",
                    f"unknown component; one of {', '.join(COMPONENTS)} (the folder's names)",
                )
            elif value not in allowed:
                errors.add(f"{map_name}[{key}]", f"one of {', '.join(allowed)}; got {value!r}")
    if not 0 <= options.instances <= MAX_INSTANCES:
        errors.add("instances", f"between 1 and {MAX_INSTANCES}; got {options.instances}")
    if not 0 <= options.max_batch_size <= MAX_BATCH:
        errors.add("max_batch_size", f"between 1 and {MAX_BATCH}; got {options.max_batch_size}")
    for key, value in options.labels.items():
        if not LABEL_KEY_RE.match(key) or len(value) > 256:
            errors.add(
                f"labels[{key}]", "a key of letters, digits, '_', '-', '.' (≤ 63), a value ≤ 256"
            )
    if len(options.description) > 4096:
        errors.add("description", "at most 4096 characters")
    return source, errors


def component_settings(
    options: ImportOptions, present: Iterable[str]
) -> dict[str, ComponentSetting]:
    """Each present component's dtype and device (``present``: folder names, e.g. "unet").

    A component not named in ``component_dtypes`` / ``component_devices`` takes ``dtype`` /
    ``device``; the VAE stays float32 under ``dtype`` float16 unless asked otherwise (the
    SD-1.x VAE overflows in float16). Naming a component the folder lacks is a field violation.
    """
    present = list(present)
    errors = ValidationErrors()
    for map_name, values in (
        ("component_dtypes", options.component_dtypes),
        ("component_devices", options.component_devices),
    ):
        for key in values:
            if key in COMPONENTS and key not in present:
                have = ", ".join(present) or "none of them"
                errors.add(f"{map_name}[{key}]", f"this folder has no {key}/ (it has {have})")
    errors.raise_if_any()
    dtype = options.dtype or "float32"
    device = options.device or "cpu"
    out: dict[str, ComponentSetting] = {}
    for key in present:
        own = options.component_dtypes.get(key, "")
        note = ""
        if not own and key == "vae" and dtype == "float16":
            own = "float32"
            note = (
                "kept float32 under dtype float16 (the SD-1.x VAE overflows in float16; "
                "component_dtypes[vae]=float16 to override)"
            )
        out[key] = ComponentSetting(
            own or dtype, options.component_devices.get(key, "") or device, note
        )
    return out


def folder_components(folder: pathlib.Path) -> list[str]:
    """The per-component settable parts of a validated folder (none for a scorer folder)."""
    if (folder / "text_encoder").is_dir():
        return list(COMPONENTS)
    meta_path = folder / "clinisynth.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return [] if meta.get("kind") in ("reward", "classifier") else ["unet"]


def check_vae_float16(vae_dir: pathlib.Path, device: str) -> bool:
    """Decode one small random latent with the VAE in float16; refuse a non-finite image.

    Runs on the component's device (a GPU when it is one and this process sees CUDA, else the
    CPU). When float16 decoding cannot run here (an operator without a float16 kernel on this
    CPU), the check is skipped with a log line: the VAE is then served unchecked. Returns
    whether the check ran.
    """
    import torch
    from diffusers import AutoencoderKL

    target = "cuda" if device == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "gpu" and target == "cpu":
        log.info("float16 VAE check runs on the CPU: this process sees no GPU")
    try:
        vae: Any = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=torch.float16)
    except OSError:  # no weight files: nothing fixed to check (a config-only test folder)
        log.info("float16 VAE check skipped: %s holds no weights", vae_dir)
        return False
    vae.to(target).eval()
    channels = int(vae.config.latent_channels)
    scaling = float(vae.config.scaling_factor or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, channels, FP16_CHECK_LATENT, FP16_CHECK_LATENT, generator=gen)
    z = (latent / scaling + shift).to(target, torch.float16)
    try:
        with torch.inference_mode():
            image = vae.decode(z, return_dict=False)[0]
    except (RuntimeError, NotImplementedError) as exc:  # a missing Half kernel on this device
        log.warning("float16 VAE check skipped: float16 decoding cannot run on %s: %s", target, exc)
        return False
    finally:
        del vae
    bad = int((~torch.isfinite(image.float())).sum())
    if bad:
        raise InvalidArgument.for_field(
            "component_dtypes[vae]",
            f"decodes to inf/NaN in float16 ({bad} of {image.numel()} values of a random "
            f"{FP16_CHECK_LATENT}×{FP16_CHECK_LATENT} latent on {target}); keep the VAE "
            "float32 (the default under dtype float16) or use bfloat16",
        )
    log.info("float16 VAE check: a random latent decodes finite on %s", target)
    return True


def upload_id(key: str, field_name: str = "key") -> str:
    """The ``<upload id>`` of an ``imports/<upload id>/...`` key (InvalidArgument otherwise)."""
    head = key[len(IMPORTS_NAMESPACE) :].split("/", 1)[0]
    if not UPLOAD_ID_RE.match(head):
        raise InvalidArgument.for_field(
            field_name, f"{key!r}: must lie under imports/<upload id>/ (letters, digits, _-.)"
        )
    return head


def _size_bytes(folder: pathlib.Path) -> int:
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in SAFE_SUFFIXES + PICKLE_SUFFIXES
    )


def _stage_message(stage: str, triton_model: str, by_role: Mapping[str, ComponentSetting]) -> str:
    """The message of a write / load stage: "writing (float32 on cpu) NAME.ROLE". The last
    word stays the Triton model, so a progress line ends on the component's name."""
    if stage != "write":
        return f"loading {triton_model}"
    setting = by_role.get(triton_model.rsplit(".", 1)[-1].rsplit(packing.ADDRESS_SEPARATOR)[-1])
    if setting is None:
        return f"writing {triton_model}"
    how = f"{setting.dtype} on {setting.device}" + (
        f"; the VAE is {setting.note}" if setting.note else ""
    )
    return f"writing ({how}) {triton_model}"


# -- the service part ----------------------------------------------------------------------------
class ModelImports:
    """Import, show, retire and alias model versions (the finetune service's model calls)."""

    def __init__(
        self, store: ArtifactStore, catalog: Catalog, triton: Any, settings: ImportSettings
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.triton = triton
        self.settings = settings
        self._lock = threading.Lock()  # one registration at a time: versions are numbered

    # uploads
    def upload_chunks(
        self, chunks: Iterable[tuple[str, bytes, str]]
    ) -> Iterator[tuple[str, bytes, str]]:
        """The chunks of one upload, refused unless the key lies in ``imports/<id>/``."""
        for key, data, sha in chunks:
            if key:
                upload_id(confine_key(key, IMPORTS_NAMESPACE, "key"))
                if key.count("/") < 2:
                    raise InvalidArgument.for_field("key", f"{key!r}: imports/<id>/<file>")
            yield key, data, sha

    def uploaded(self, upload: str) -> list[ObjectInfo]:
        """Files stored under ``imports/<upload>/``, each with its sha256."""
        if not UPLOAD_ID_RE.match(upload):
            raise InvalidArgument.for_field("upload_id", f"not an upload id: {upload!r}")
        prefix = f"{IMPORTS_NAMESPACE}{upload}/"
        out = []
        for info in self.store.list(prefix):
            out.append(info if info.sha256 else self.store.stat(info.key))
        return out

    # import
    def import_model(
        self, options: ImportOptions, progress: Callable[[ImportProgress], None] | None = None
    ) -> ModelView:
        """Fetch, (merge,) validate, write and load the components, then write the record.

        ``progress`` hears each stage as it starts; raising from it (a cancelled call) stops
        the import there, which leaves no catalog version (the record is written last).
        """
        source, errors = check_options(options)
        errors.raise_if_any()
        repo = self.settings.model_repository
        if not repo or not pathlib.Path(repo).is_dir():
            raise FailedPrecondition(
                f"model repository {repo!r} is not a folder: set CLINISYNTH_MODEL_REPOSITORY "
                "(or the finetune service's model_repository) to Triton's repository",
                reason="NO_MODEL_REPOSITORY",
            )
        from clinisynth_server import registry

        steps = {"done": 0, "total": 0}

        def report(stage: str, message: str) -> None:
            steps["done"] += 1
            if progress is not None:
                total = max(steps["total"], steps["done"])
                progress(ImportProgress(stage, steps["done"], total, message))

        prefix = source + "/"
        with tempfile.TemporaryDirectory(prefix="import-") as tmp:
            folder = pathlib.Path(tmp) / "model"
            files = self.store.download_dir(prefix, folder)
            if not files:
                raise InvalidArgument.for_field("source", f"no files under {prefix!r}")
            adapter = bool(options.base_name or options.base_version)
            parts = 3 if adapter or (folder / "text_encoder").is_dir() else 1
            # fetch, (merge,) validate, write + load per component, record
            steps["total"] = 3 + int(adapter) + 2 * parts
            report("fetch", f"{len(files)} files from {source}")
            extra: dict[str, Any] = {}
            if adapter:
                base = self.catalog.get(options.base_name, options.base_version, field_name="base")
                report("merge", f"merging the LoRA adapter into {base.ref}")
                folder = self._merge_adapter(folder, base, pathlib.Path(tmp))
                extra["base"] = base.ref
                parts = 3 if (folder / "text_encoder").is_dir() else 1
                steps["total"] = 4 + 2 * parts
            elif lora.is_adapter_folder(folder):
                raise InvalidArgument.for_field(
                    "base",
                    f"{lora.ADAPTER_FILE}: a LoRA adapter is imported onto a base model; "
                    "name it (base=NAME@VERSION, --base)",
                )
            report("validate", "checking every component before anything reaches Triton")
            ValidationErrors(
                validate_folder(folder, allow_pickle=self.settings.allow_pickle_weights)
            ).raise_if_any()
            dtype = options.dtype or "float32"
            device = options.device or "cpu"
            settings = component_settings(options, folder_components(folder))
            vae = settings.get("vae")
            if vae is not None and vae.dtype == "float16":
                check_vae_float16(folder / "vae", vae.device)
            by_role = {COMPONENTS[key]: s for key, s in settings.items()}
            instances = options.instances or 1
            max_batch = options.max_batch_size or 16
            replay = options.replay or "exact"
            with self._lock:
                self.catalog.invalidate()
                floor = self._remove_leftovers(options.name)
                try:
                    record = registry.register_folder(
                        folder,
                        options.name,
                        catalog=self.catalog,
                        store=self.store,
                        model_repository=repo,
                        triton=self.triton,
                        description=options.description,
                        labels=dict(options.labels),
                        max_batch_size=max_batch,
                        instance_kind=device,
                        instance_count=instances,
                        triton_parameters={
                            "torch_dtype": dtype,
                            "batch_invariant": "false" if replay == "batched" else "true",
                        },
                        role_parameters={
                            role: {"torch_dtype": s.dtype} for role, s in by_role.items()
                        },
                        role_instance_kinds={role: s.device for role, s in by_role.items()},
                        extra_info={
                            "dtype": dtype,
                            "device": device,
                            "replay": replay,
                            "instances": instances,
                            "max_batch_size": max_batch,
                            "size_bytes": _size_bytes(folder),
                            "source": source,
                            "component_dtypes": {r: s.dtype for r, s in by_role.items()},
                            "component_devices": {r: s.device for r, s in by_role.items()},
                            **extra,
                        },
                        min_version=floor,
                        progress=lambda stage, what: report(
                            stage, _stage_message(stage, what, by_role)
                        ),
                        layout=options.layout or packing.DEFAULT_LAYOUT,
                    )
                except NotFound as exc:
                    raise FailedPrecondition(
                        f"cannot serve this folder: {exc.message}", reason="TRITON_ROLE_MISSING"
                    ) from exc
                steps["total"] = steps["done"] + 1
                report("record", f"{record.ref} is in the catalog")
        log.info("imported %s from %s", record.ref, source)
        return self.view(record)

    def _merge_adapter(
        self, adapter: pathlib.Path, base: ModelRecord, tmp: pathlib.Path
    ) -> pathlib.Path:
        """The base version's folder with the adapter merged in (validated first, by module)."""
        if not lora.is_adapter_folder(adapter):
            raise InvalidArgument.for_field(
                "source", f"an import with a base needs {lora.ADAPTER_FILE} (a LoRA adapter)"
            )
        base_dir = self._base_folder(base, tmp / "base")
        updates, violations = lora.plan(adapter, base_dir)
        ValidationErrors(violations).raise_if_any()
        merged = tmp / "merged"
        lora.merge(adapter, base_dir, merged, updates)
        log.info("merged %d LoRA modules into %s", len(updates), base.ref)
        return merged

    def _base_folder(self, record: ModelRecord, out: pathlib.Path) -> pathlib.Path:
        """Rebuild a served version's checkpoint folder from the repository and the store.

        The Triton model repository holds each component's weights as imported; the tokenizer
        and the scheduler config are in the catalog. The folder registers like the original.
        """
        repo = pathlib.Path(self.settings.model_repository)
        if "denoiser" not in record.components:
            raise InvalidArgument.for_field(
                "base", f"{record.ref} is a {record.kind} model: a LoRA adapter needs a denoiser"
            )
        for role, sub in (
            ("denoiser", "unet"),
            ("text_encoder", "text_encoder"),
            ("vae_decode", "vae"),
        ):
            if role not in record.components:
                continue
            version = record.component_versions.get(role, record.version)
            weights = repo / record.components[role] / str(version) / "weights"
            if not weights.is_dir():
                raise FailedPrecondition(
                    f"{record.ref}: {weights.parent.name} of {record.components[role]} is not in "
                    "this service's model repository",
                    reason="BASE_WEIGHTS_MISSING",
                )
            shutil.copytree(weights, out / sub)
        text_to_image = record.kind == "text_to_image"
        if text_to_image:
            self.store.download_dir(str(record.extra["tokenizer_prefix"]), out / "tokenizer")
        scheduler = out / "scheduler"
        scheduler.mkdir(parents=True)
        (scheduler / "scheduler_config.json").write_text(json.dumps(record.scheduler))
        scheduler_class = str(record.scheduler.get("_class_name", "DDPMScheduler"))
        if text_to_image:
            from clinisynth_server.finetune.layouts import sd_model_index

            index: dict[str, Any] = sd_model_index(scheduler_class)
        else:
            index = {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", scheduler_class],
            }
        (out / "model_index.json").write_text(json.dumps(index))
        meta = {
            "classes": record.classes,
            "default_sampler": record.default_sampler,
            "default_steps": record.default_steps,
            "default_guidance_scale": record.default_guidance_scale,
            "max_images": record.max_images,
            "height": record.height,
        }
        (out / "clinisynth.json").write_text(json.dumps(meta))
        return out

    def _remove_leftovers(self, name: str) -> int:
        """Remove component versions of ``name`` no record cites (an import killed midway).

        Left in the repository, Triton would try to load them (half-written, perhaps) beside
        the next import's. Returns the lowest version number the next import may take: the
        numbers of removed leftovers are not reused (Triton may still hold them loaded).
        """
        from clinisynth_server.triton import repository

        repo = pathlib.Path(self.settings.model_repository)
        cited = {
            (r.components[role], r.component_versions.get(role, r.version))
            for r in self.catalog.everything()
            for role in r.components
        }
        cited_models = {(packing.served_model(a), v) for a, v in cited}
        floor = 0
        for model in repository.list_models(repo):
            role = model[len(name) + 1 :] if model.startswith(f"{name}.") else ""
            if not role or "." in role:  # "<name>.<role>" only, not another name's components
                continue
            leftovers = [
                v for v in repository.list_versions(repo, model) if (model, v) not in cited_models
            ]
            # A packed model's component weights (``<model>/<role>/<v>``) no record cites.
            parts = [
                (packing.address(model, part), v)
                for part, versions in repository.packed_component_versions(repo, model).items()
                for v in versions
                if (packing.address(model, part), v) not in cited
            ]
            if leftovers:
                self._wait_not_loading(model)
            for version in leftovers:
                log.warning("removing %s version %d: left by an interrupted import", model, version)
                shutil.rmtree(repo / model / str(version))
                floor = max(floor, version + 1)
            for part, version in parts:
                shutil.rmtree(repo / part / str(version), ignore_errors=True)
                floor = max(floor, version + 1)
        return floor

    def _wait_not_loading(self, model: str, timeout_s: float = 600.0) -> None:
        """Wait while Triton still loads ``model`` (a killed import's load goes on in Triton):
        removing files under a load in progress, or asking for a second load, can hang it."""
        if self.triton is None:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                states = {e.state for e in self.triton.repository_index() if e.name == model}
            except ClinisynthError:
                return
            if "LOADING" not in states:
                return
            time.sleep(0.5)

    # show / retire / alias
    def view(self, record: ModelRecord, viewer: Viewer | None = None) -> ModelView:
        """What GetModel shows; "latest" and aliases as ``viewer`` sees the catalog."""
        catalog = self.catalog.seen_by(viewer)
        ready: dict[str, bool] = {}
        retired = self.catalog.is_retired(record.name, record.version)
        for role, triton_name in record.components.items():
            version = record.component_versions.get(role, record.version)
            try:
                ready[role] = not retired and bool(
                    self.triton is not None and self.triton.model_ready(triton_name, str(version))
                )
            except ClinisynthError:
                ready[role] = False
        aliases = sorted(a for a, v in catalog.aliases(record.name).items() if v == record.version)
        latest = not retired and catalog.is_latest(record)
        return ModelView(record, retired, latest, aliases, ready)

    def get(self, name: str, version: str, viewer: Viewer | None = None) -> ModelView:
        """One version; another tenant's private model answers as an unknown one."""
        record = self.catalog.seen_by(viewer).get(name, version, include_retired=True)
        return self.view(record, viewer)

    def delete(self, name: str, version: str, viewer: Viewer | None = None) -> ModelView:
        """Retire one version: marker first (no longer served), then its Triton versions go."""
        if not version:
            raise InvalidArgument.for_field(
                "model.version", "required: delete retires one version (NAME@VERSION)"
            )
        record = self.catalog.seen_by(viewer).get(name, version, include_retired=True)
        self.catalog.retire(record)
        self._unload(record)
        return self.view(record, viewer)

    def alias(self, name: str, version: str, alias: str, viewer: Viewer | None = None) -> ModelView:
        if not version:
            raise InvalidArgument.for_field(
                "model.version", "required: an alias names one version (NAME@VERSION)"
            )
        record = self.catalog.seen_by(viewer).get(name, version)
        self.catalog.set_alias(record, alias)
        return self.view(record, viewer)

    def _unload(self, record: ModelRecord) -> None:
        """Remove the retired version's component versions from the repository and Triton.

        A component version another served record still cites is kept. Repeating this is
        harmless, so a delete interrupted here is finished by the next delete.
        """
        repo = self.settings.model_repository
        if not repo or not pathlib.Path(repo).is_dir():
            return
        from clinisynth_server.triton import repository

        cited = {
            (r.components[role], r.component_versions.get(role, r.version))
            for r in self.catalog.all()
            for role in r.components
        }
        cited_models = {(packing.served_model(a), v) for a, v in cited}
        touched: dict[str, None] = {}
        for role, address in record.components.items():
            version = record.component_versions.get(role, record.version)
            if (address, version) in cited:
                continue
            validate_key(address, "components")
            # The component's weights: its Triton model's version (split) or its folder in
            # the packed model (whose own version folder goes once no record cites it).
            shutil.rmtree(pathlib.Path(repo) / address / str(version), ignore_errors=True)
            triton_name = packing.served_model(address)
            if triton_name != address and (triton_name, version) not in cited_models:
                shutil.rmtree(pathlib.Path(repo) / triton_name / str(version), ignore_errors=True)
            touched[triton_name] = None
        for triton_name in touched:
            if self.triton is None:
                continue
            if repository.list_versions(repo, triton_name):
                self.triton.load_model(triton_name)  # reload: the removed version goes
            else:
                with contextlib.suppress(NotFound):
                    self.triton.unload_model(triton_name)
                shutil.rmtree(pathlib.Path(repo) / triton_name, ignore_errors=True)
