"""Registering a model: a checkpoint folder becomes Triton models plus one catalog record.

Accepted folders, loaded unchanged:
- a diffusers ``StableDiffusionPipeline`` folder (``model_index.json`` + ``unet/``,
  ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``) → ``text_to_image``;
- a pixel diffusion folder: ``unet/`` (``UNet2DModel``) + ``scheduler/`` (e.g. what
  ``DDPMPipeline.save_pretrained`` writes), or a bare ``UNet2DModel`` folder → ``class_conditional``
  when the UNet has a class embedding, else ``unconditional``.
- a scorer folder (``reward`` / ``classifier`` kinds): weights plus a ``clinisynth.json`` with
  ``kind``, ``triton_role`` (the Triton backend role serving it), ``component``, ``classes``,
  ``width`` / ``height`` / ``channels`` and optional ``triton_parameters``.
An optional ``clinisynth.json`` beside them gives ``classes``, ``labels``, ``description`` and
sampling defaults. Triton component ``<name>.<role>`` gets the same version number as the catalog.
With ``layout="packed"`` (``triton/packing.py``) the components are written into one Triton model
``<name>.packed`` instead, and the record names each as ``<name>.packed/<role>``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.methods.schedulers import (
    DDPM_SCHEDULE,
    SAMPLERS,
    check_sampler,
    sampler_of_config,
)
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.triton import packing, repository
from clinisynth_server.triton.client import TritonClient

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
DEFAULT_SCHEDULER = DDPM_SCHEDULE  # for folders that ship no scheduler config


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def folder_digest(paths: Iterable[pathlib.Path]) -> str:
    """sha256 over every file's relative path and bytes, in a stable order."""
    h = hashlib.sha256()
    for root in paths:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(str(file.relative_to(root.parent)).encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


SHIPPED_LABEL = "shipped_digest"


def shipped_updates(shipped_dir: pathlib.Path, catalog: Catalog) -> list[tuple[pathlib.Path, str]]:
    """Shipped model folders to register now, each with its digest (for ``SHIPPED_LABEL``).

    A folder is registered when the catalog does not know its name, or when the latest version
    of that name was itself registered from a shipped folder whose content has since changed (a
    newer release ships retrained demo models). A latest version without the label — the user's
    own registration or promotion — is never superseded.
    """
    if not shipped_dir.is_dir():
        return []
    latest = {r.name: r for r in catalog.all()}  # sorted by (name, version): last wins
    updates = []
    for folder in sorted(p for p in shipped_dir.iterdir() if p.is_dir()):
        if not (folder / "clinisynth.json").is_file():
            continue
        digest = folder_digest([folder])
        record = latest.get(folder.name)
        if record is None or record.labels.get(SHIPPED_LABEL, digest) != digest:
            updates.append((folder, digest))
    return updates


def detect_kind(folder: pathlib.Path) -> str:
    index = _read_json(folder / "model_index.json")
    if (
        index.get("_class_name", "").startswith("StableDiffusion")
        or (folder / "text_encoder").is_dir()
    ):
        return "text_to_image"
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    config = _read_json(unet_dir / "config.json")
    if config.get("_class_name") not in ("UNet2DModel", "UNet2DConditionModel"):
        raise InvalidArgument.for_field(
            "folder",
            f"{folder} is neither a StableDiffusionPipeline folder nor a UNet2DModel folder",
        )
    has_class = config.get("num_class_embeds") is not None or config.get("class_embed_type")
    return "class_conditional" if has_class else "unconditional"


@dataclass
class _Packing:
    """Components gathered for one packed model, written together by :meth:`write`."""

    components: list[repository.PackedComponent] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)

    def add(
        self, role: str, weights: pathlib.Path, kind: str, params: Mapping[str, str] | None
    ) -> None:
        self.components.append(repository.PackedComponent(role, weights, dict(params or {})))
        self.kinds.add(kind)

    def write(
        self,
        repo_dir: pathlib.Path,
        name: str,
        version: int,
        *,
        max_batch_size: int,
        instance_count: int,
        shared: Mapping[str, str] | None,
    ) -> str:
        if len(self.kinds) > 1:
            raise InvalidArgument.for_field(
                "layout",
                "a packed model's components share one process, so one device: got "
                f"{', '.join(sorted(self.kinds))} (use the split layout for mixed devices)",
            )
        triton_name = packing.packed_model(name)
        repository.write_packed_model(
            repo_dir,
            triton_name,
            self.components,
            version=version,
            max_batch_size=max_batch_size,
            instance_kind=repository.check_instance_kind(next(iter(self.kinds))),
            instance_count=instance_count,
            parameters=shared,
        )
        return triton_name


def _component(
    repo_dir: pathlib.Path,
    name: str,
    role: str,
    weights: pathlib.Path,
    version: int,
    max_batch_size: int,
    instance_kind: str,
    parameters: Mapping[str, str] | None = None,
    *,
    instance_count: int = 1,
    rewrite_config: bool = False,
    packed: _Packing | None = None,
) -> str:
    """Write one component (split) or gather it (packed); returns its address."""
    if packed is not None:
        repository.role_module(role)  # an unknown role fails here, as in the split layout
        packed.add(role, weights, instance_kind, parameters)
        return packing.address(packing.packed_model(name), role)
    triton_name = f"{name}.{role}"
    if repository.list_versions(repo_dir, triton_name) and not rewrite_config:
        repository.add_version(repo_dir, triton_name, weights, version=version)
    else:
        # An import states its options (dtype, device, instances, batch): the model's config is
        # rewritten with them (one config serves every version of a Triton model).
        repository.write_model(
            repo_dir,
            triton_name,
            role,
            weights,
            version=version,
            max_batch_size=max_batch_size,
            instance_kind=repository.check_instance_kind(instance_kind),
            instance_count=instance_count,
            parameters=parameters,
        )
    return triton_name


def _similarity_component(
    folder: pathlib.Path,
    name: str,
    repo_dir: pathlib.Path,
    version: int,
    max_batch_size: int,
    components: dict[str, str],
    extra: dict[str, Any],
    options: Mapping[str, Any],
) -> None:
    """A model folder's ``similarity/`` index becomes its ``similarity`` component (CPU).

    The memorization gate and the domain guard read ``extra["similarity"]`` (digest, thresholds,
    the domain scale); a folder without an index registers without one, and its images and
    inputs say ``no index``.
    """
    from clinisynth_server.similarity.index import INDEX_DIR, IndexFileError, component_info

    try:
        info = component_info(folder / INDEX_DIR)
    except IndexFileError as exc:
        raise InvalidArgument.for_field("folder", f"{INDEX_DIR}/: {exc}") from exc
    if info is None:
        return
    packed = options.get("packed")
    components["similarity"] = _component(
        repo_dir,
        name,
        "similarity",
        folder / INDEX_DIR,
        version,
        max_batch_size,
        next(iter(packed.kinds)) if packed is not None and packed.kinds else "cpu",
        **options,
    )
    extra["similarity"] = info


def _default_sampler(folder: pathlib.Path, meta: Mapping[str, Any]) -> str:
    """``clinisynth.json``'s ``default_sampler``, else the folder's own scheduler, else DDIM.

    The folder's scheduler class is what ``StableDiffusionPipeline`` / ``DDPMPipeline``
    ``.from_pretrained(folder)`` would sample with, so a request naming no sampler gets the
    pixels diffusers gives for that folder (PNDM for Stable Diffusion 1.x folders).
    """
    if meta.get("default_sampler"):
        try:
            return check_sampler(str(meta["default_sampler"]))
        except InvalidArgument as exc:
            raise InvalidArgument.for_field(
                "default_sampler", f"clinisynth.json: {exc.violations[0].description}"
            ) from exc
    own = _read_json(folder / "scheduler" / "scheduler_config.json")
    return sampler_of_config(own) or "ddim"


def register_folder(
    folder: str | pathlib.Path,
    name: str,
    *,
    catalog: Catalog,
    store: ArtifactStore,
    model_repository: str | pathlib.Path,
    triton: TritonClient | None = None,
    classes: list[str] | None = None,
    description: str = "",
    labels: Mapping[str, str] | None = None,
    max_batch_size: int = 16,
    instance_kind: str = "cpu",
    instance_count: int = 1,
    triton_parameters: Mapping[str, str] | None = None,
    role_parameters: Mapping[str, Mapping[str, str]] | None = None,
    role_instance_kinds: Mapping[str, str] | None = None,
    extra_info: Mapping[str, Any] | None = None,
    min_version: int = 0,
    progress: Callable[[str, str], None] | None = None,
    layout: str = packing.DEFAULT_LAYOUT,
) -> ModelRecord:
    """Import ``folder`` as the next version of model ``name``; load it in Triton if given.

    ``triton_parameters`` (e.g. ``torch_dtype``) and ``instance_count`` come from an import's
    options: given, each component's Triton config is rewritten with them.
    ``role_parameters`` / ``role_instance_kinds`` (by role: ``denoiser``, ``text_encoder``,
    ``vae_decode``) override them for one component (its own ``torch_dtype``, ``gpu``).
    ``extra_info`` lands in the record's ``extra`` (dtype, device, size, source of an import);
    ``min_version`` is the lowest number to take (numbers of removed leftovers are not
    reused). The catalog record is written last, so an interrupted registration leaves no
    catalog version. ``progress(stage, what)`` is told as each component is written ("write")
    and before each load ("load"). ``layout``: "split" (one Triton model per component) or
    "packed" (one per served model holding every component; all on one device).
    """
    report = progress or (lambda stage, what: None)
    rewrite = triton_parameters is not None
    packed = _Packing() if packing.check_layout(layout) == "packed" else None
    options: dict[str, Any] = {
        "instance_count": instance_count,
        "rewrite_config": rewrite,
        "packed": packed,
    }
    role_params = role_parameters or {}
    role_kinds = role_instance_kinds or {}

    def kind_of(role: str) -> str:
        return role_kinds.get(role, instance_kind)

    def params_of(role: str, base: Mapping[str, str] | None) -> Mapping[str, str] | None:
        if role not in role_params:
            return base
        return {**dict(base or {}), **dict(role_params[role])}

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise InvalidArgument.for_field("folder", f"{folder} is not a folder")
    repo_dir = pathlib.Path(model_repository)
    meta = _read_json(folder / "clinisynth.json")
    kind = meta.get("kind") or detect_kind(folder)
    default_sampler = _default_sampler(folder, meta)  # checked before Triton sees it
    # Free in the catalog and in the repository: an interrupted registration can leave
    # component versions behind without a catalog record.
    taken = (
        [
            v
            for model in repository.list_models(repo_dir)
            if model.startswith(f"{name}.")
            for v in repository.list_versions(repo_dir, model)
        ]
        if repo_dir.is_dir()
        else []
    )
    version = max(catalog.next_version(name), max(taken, default=0) + 1, min_version)
    extra: dict[str, Any] = {**dict(meta.get("extra", {})), **dict(extra_info or {})}
    components: dict[str, str] = {}

    if kind == "text_to_image":
        unet_cfg = _read_json(folder / "unet" / "config.json")
        vae_cfg = _read_json(folder / "vae" / "config.json")
        te_cfg = _read_json(folder / "text_encoder" / "config.json")
        tok_cfg = _read_json(folder / "tokenizer" / "tokenizer_config.json")
        vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [1])) - 1)
        for role, sub in (
            ("denoiser", "unet"),
            ("text_encoder", "text_encoder"),
            ("vae_decode", "vae"),
        ):
            components[role] = _component(
                repo_dir,
                name,
                role,
                folder / sub,
                version,
                max_batch_size,
                kind_of(role),
                params_of(role, triton_parameters),
                **options,
            )
            report("write", components[role])
        tok_prefix = f"catalog/{name}/{version:06d}/tokenizer/"
        store.upload_dir(folder / "tokenizer", tok_prefix)
        max_length = int(tok_cfg.get("model_max_length") or 0)
        if not max_length or max_length > 100_000:
            max_length = int(te_cfg.get("max_position_embeddings", 77))
        extra.update(
            {
                "latent_channels": int(unet_cfg.get("in_channels", 4)),
                "vae_scale_factor": vae_scale,
                "tokenizer_prefix": tok_prefix,
                "max_length": max_length,
                "size_multiple": 8 * vae_scale,
            }
        )
        size = int(unet_cfg.get("sample_size", 64)) * vae_scale
        channels = int(vae_cfg.get("out_channels", 3))
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json") or DEFAULT_SCHEDULER
        digest = folder_digest([folder / "unet", folder / "text_encoder", folder / "vae"])
        default_guidance = float(meta.get("default_guidance_scale", 7.5))
    elif kind in ("reward", "classifier"):
        # A scorer folder: weights + clinisynth.json naming the Triton role that serves it
        # ("triton_role"), its component name ("component", default the kind), classes and size.
        role = str(meta.get("triton_role") or "")
        if not role:
            raise InvalidArgument.for_field("folder", f"{folder}/clinisynth.json needs triton_role")
        component = meta.get("component", kind)
        components[component] = _component(
            repo_dir,
            name,
            role,
            folder,
            version,
            max_batch_size,
            instance_kind,
            {**dict(meta.get("triton_parameters") or {}), **dict(triton_parameters or {})},
            **options,
        )
        report("write", components[component])
        size = int(meta.get("width", meta.get("size", 0)))
        channels = int(meta.get("channels", 1))
        scheduler = {}
        digest = folder_digest([folder])
        default_guidance = 1.0
    else:
        unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
        unet_cfg = _read_json(unet_dir / "config.json")
        components["denoiser"] = _component(
            repo_dir,
            name,
            "denoiser",
            unet_dir,
            version,
            max_batch_size,
            kind_of("denoiser"),
            params_of("denoiser", triton_parameters),
            **options,
        )
        report("write", components["denoiser"])
        num_classes = unet_cfg.get("num_class_embeds")
        if kind == "class_conditional":
            classes = classes or meta.get("classes") or [str(i) for i in range(num_classes or 0)]
            if num_classes is not None and len(classes) > int(num_classes):
                raise InvalidArgument.for_field(
                    "classes", f"{len(classes)} names for a UNet with {num_classes} classes"
                )
        down = len(unet_cfg.get("block_out_channels", [1]))
        extra.update({"latent_channels": 0, "size_multiple": 2 ** (down - 1)})
        size = int(unet_cfg.get("sample_size", 32))
        channels = int(unet_cfg.get("out_channels", unet_cfg.get("in_channels", 3)))
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json") or DEFAULT_SCHEDULER
        digest = folder_digest([unet_dir])
        default_guidance = 1.0
    # A generator's index: the memorization gate; a reward model's: the out-of-domain guard.
    if kind != "classifier":
        _similarity_component(
            folder, name, repo_dir, version, max_batch_size, components, extra, options
        )
        if "similarity" in components and packed is None:
            report("write", components["similarity"])
    scheduler = {k: v for k, v in scheduler.items() if not k.startswith("_diffusers")}
    if packed is not None:
        report(
            "write",
            packed.write(
                repo_dir,
                name,
                version,
                max_batch_size=max_batch_size,
                instance_count=instance_count,
                shared=triton_parameters,
            ),
        )
    extra["layout"] = "packed" if packed is not None else "split"
    record = ModelRecord(
        name=name,
        version=version,
        kind=kind,
        components=components,
        component_versions=dict.fromkeys(components, version),
        classes=list(classes or meta.get("classes") or []) if kind != "text_to_image" else [],
        width=size,
        height=int(meta.get("height", size)),
        channels=channels,
        digest=digest,
        samplers=list(SAMPLERS),
        default_sampler=default_sampler,
        default_steps=int(meta.get("default_steps", 25)),
        default_guidance_scale=default_guidance,
        max_images=int(meta.get("max_images", 16)),
        description=description or meta.get("description", ""),
        labels={**meta.get("labels", {}), **dict(labels or {})},
        scheduler=scheduler,
        extra=extra,
    )
    if triton is not None:
        for triton_name in dict.fromkeys(packing.served_model(a) for a in components.values()):
            report("load", triton_name)
            triton.load_model(triton_name)
    return catalog.put(record)
