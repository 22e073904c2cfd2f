"""Base models of fine-tuning jobs: a catalog model name or a store prefix, as a local folder.

A reference is ``name`` / ``name@version`` (a model the stack serves: its weights are read from
the Triton model repository folder, config ``model_repository`` / ``CLINISYNTH_MODEL_REPOSITORY``,
and its tokenizer from the store) or a store prefix holding a diffusers folder (a Stable
Diffusion pipeline, a ``UNet2DModel`` folder) or a methods checkpoint (reward model, classifier).
Either way the worker gets a plain folder that ``from_pretrained`` / ``load`` read unchanged.

A prefix is caller-chosen, so it is confined before any store call (:func:`confine_prefix`): a
caller's own namespaces (``datasets/``, anything outside the service namespaces, and the model
folders uploaded for import under ``imports/``) or the promotable ``model/`` folder of a
finished checkpoint (``finetune/jobs/<id>/checkpoints/<step>/model/``, from ListCheckpoints). Never
the rest of a job (its resume state), ``finetune/secrets/``, catalog records, feedback or a
model repository: otherwise a job would copy them into its work folder and train on them.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import ClinisynthError, InvalidArgument, NotFound
from clinisynth_server.finetune.records import ROOT as JOBS_ROOT
from clinisynth_server.store.base import (
    IMPORTS_NAMESPACE,
    ArtifactStore,
    dir_prefix,
    outside_service_namespaces,
)

#: A checkpoint's promotable folder: the one part of a job's files a caller may build on.
_CHECKPOINT_MODEL = re.compile(
    rf"^{re.escape(JOBS_ROOT)}[A-Za-z0-9][A-Za-z0-9_.-]*/checkpoints/[0-9]+/model/$"
)
_ALLOWED = (
    "a catalog model name (name or name@version), a prefix of your own outside the service "
    "namespaces (datasets/..., imports/...), or a checkpoint's model folder "
    "(finetune/jobs/<id>/checkpoints/<step>/model/)"
)


@dataclass(frozen=True)
class BaseModel:
    """What a reference points to, known before any download."""

    ref: str
    kind: str  # text_to_image | class_conditional | unconditional | reward | classifier
    classes: list[str] = field(default_factory=list)
    record: ModelRecord | None = None
    prefix: str = ""  # store prefix, when not a catalog model
    meta: dict[str, Any] = field(default_factory=dict)


def _is_prefix_ref(ref: str) -> bool:
    return "/" in ref


def confine_prefix(ref: str, store: ArtifactStore, *, field_name: str) -> str:
    """The prefix ``ref`` names, if a caller may build a model on it; else INVALID_ARGUMENT.

    Checked before the prefix is listed, so a refused prefix is never read and whether it
    exists is not revealed. A checkpoint counts once it is complete (``checkpoint.json``).
    """
    prefix = dir_prefix(ref.rstrip("/"), field_name)
    if _CHECKPOINT_MODEL.match(prefix):
        if not store.exists(prefix.removesuffix("model/") + "checkpoint.json"):
            raise InvalidArgument.for_field(
                field_name, f"{ref!r} is not the model folder of a finished checkpoint"
            )
        return prefix
    if prefix.startswith(IMPORTS_NAMESPACE) and prefix != IMPORTS_NAMESPACE:
        return prefix  # model folders callers uploaded for import (the finetune upload RPC)
    try:
        return outside_service_namespaces(prefix, field_name)
    except InvalidArgument as exc:
        raise InvalidArgument.for_field(
            field_name, f"{ref!r} is not a model a job may start from: use {_ALLOWED}"
        ) from exc


def resolve(ref: str, catalog: Catalog, store: ArtifactStore, *, field_name: str) -> BaseModel:
    """Look the reference up; ``InvalidArgument`` on ``field_name`` when it names nothing."""
    ref = ref.strip()
    if not ref:
        raise InvalidArgument.for_field(field_name, "required: a catalog model name or a prefix")
    if not _is_prefix_ref(ref):
        name, _, version = ref.partition("@")
        try:
            record = catalog.get(name, version, field_name=field_name)
        except InvalidArgument as exc:
            raise InvalidArgument.for_field(field_name, exc.violations[0].description) from exc
        return BaseModel(ref, record.kind, list(record.classes), record=record)
    prefix = confine_prefix(ref, store, field_name=field_name)
    try:
        names = {info.key[len(prefix) :] for info in store.list(prefix)}
    except ClinisynthError as exc:
        raise InvalidArgument.for_field(field_name, f"cannot list {prefix!r}: {exc}") from exc
    if not names:
        raise InvalidArgument.for_field(
            field_name, f"{ref!r} is neither a catalog model nor a store prefix with files"
        )
    meta: dict[str, Any] = {}
    if "clinisynth.json" in names:
        meta = dict(store.get_json(prefix + "clinisynth.json"))
    kind = meta.get("kind", "")
    if not kind:
        if "model_index.json" in names and "text_encoder/config.json" in names:
            kind = "text_to_image"
        elif "unet/config.json" in names or "config.json" in names:
            cfg_key = "unet/config.json" if "unet/config.json" in names else "config.json"
            cfg = dict(store.get_json(prefix + cfg_key))
            if cfg.get("_class_name") == "UNet2DModel":
                has = cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type")
                kind = "class_conditional" if has else "unconditional"
            elif cfg.get("kind") in ("reward_model", "classifier"):
                kind = "reward" if cfg["kind"] == "reward_model" else "classifier"
                meta.setdefault("classes", cfg.get("config", {}).get("classes", []))
    if not kind:
        raise InvalidArgument.for_field(
            field_name, f"{ref!r} holds no diffusers pipeline, UNet2DModel or methods checkpoint"
        )
    return BaseModel(ref, kind, list(meta.get("classes", [])), prefix=prefix, meta=meta)


def materialize(
    base: BaseModel, dest: pathlib.Path, *, store: ArtifactStore, model_repository: str
) -> pathlib.Path:
    """A local folder with the model's files (diffusers layout for generators)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if base.prefix:
        store.download_dir(base.prefix, dest)
        return dest
    record = base.record
    assert record is not None
    repo = pathlib.Path(model_repository or "")
    if not model_repository or not repo.is_dir():
        raise NotFound(
            f"model repository {model_repository!r} is not readable here: set "
            "CLINISYNTH_MODEL_REPOSITORY (or pass a store prefix as the base model)"
        )

    def weights(role: str) -> pathlib.Path:
        triton = record.components[role]
        version = record.component_versions.get(role, record.version)
        folder = repo / triton / str(version) / "weights"
        if not folder.is_dir():
            raise NotFound(f"{folder} is missing (model {record.ref}, component {role})")
        return folder

    scheduler = {"_class_name": "DDPMScheduler", **record.scheduler}
    if record.kind == "text_to_image":
        shutil.copytree(weights("denoiser"), dest / "unet")
        shutil.copytree(weights("text_encoder"), dest / "text_encoder")
        shutil.copytree(weights("vae_decode"), dest / "vae")
        tok = record.extra.get("tokenizer_prefix", "")
        store.download_dir(tok, dest / "tokenizer")
        scheduler["_class_name"] = record.scheduler.get("_class_name", "DDIMScheduler")
        from clinisynth_server.finetune.layouts import sd_model_index

        (dest / "model_index.json").write_text(json.dumps(sd_model_index(scheduler["_class_name"])))
    elif record.kind in ("class_conditional", "unconditional"):
        shutil.copytree(weights("denoiser"), dest / "unet")
        (dest / "model_index.json").write_text(
            json.dumps(
                {
                    "_class_name": "DDPMPipeline",
                    "unet": ["diffusers", "UNet2DModel"],
                    "scheduler": ["diffusers", "DDPMScheduler"],
                }
            )
        )
    else:
        role = next(iter(record.components))
        shutil.rmtree(dest)
        shutil.copytree(weights(role), dest)
        return dest
    (dest / "scheduler").mkdir(exist_ok=True)
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (dest / "clinisynth.json").write_text(
        json.dumps(
            {
                "classes": record.classes,
                "description": record.description,
                "labels": record.labels,
            }
        )
    )
    return dest


def fetch(
    ref: str, ctx: Any, dest: pathlib.Path, *, field_name: str
) -> tuple[BaseModel, pathlib.Path]:
    """Resolve ``ref`` (catalog name or store prefix) and materialize it under ``dest``."""
    base = resolve(ref, ctx.catalog, ctx.store, field_name=field_name)
    return base, materialize(base, dest, store=ctx.store, model_repository=ctx.model_repository)
