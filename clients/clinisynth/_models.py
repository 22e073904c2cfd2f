"""Model management RPCs (finetune service): import, show, retire, alias; resumable uploads.

with clinisynth.Client() as client:
    details = client.import_model("./my-sd-folder", name="chest-sd", dtype="float32")
    client.alias_model(f"chest-sd@{details.version}", "stable")
    client.generate("chest-sd@stable", prompt="a chest x-ray")

A local folder is uploaded file by file under ``imports/<upload id>/``; the id is derived from
the folder's content (relative paths and sha256 of every file), so an interrupted upload of the
same folder resumes: files the server already holds with the same sha256 are skipped.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from clinisynth._rpc import ProgressCallback, Rpc, model_ref
from clinisynth._types import ModelInfo, ProgressEvent
from clinisynth.v1 import finetune_pb2, finetune_pb2_grpc

STUB = finetune_pb2_grpc.FinetuneServiceStub
SERVICE = "finetune"
IMPORTS = "imports/"

# An import makes a new version each time and an upload is a one-shot iterator: never repeated.
# Retiring and aliasing are repeatable (the same state results).
UPLOAD_MODEL_FILE = Rpc(SERVICE, STUB, "UploadModelFile", streaming="client")
LIST_MODEL_UPLOAD = Rpc(SERVICE, STUB, "ListModelUpload", idempotent=True)
IMPORT_MODEL = Rpc(SERVICE, STUB, "ImportModel", idempotent=False)
IMPORT_MODEL_STREAM = Rpc(SERVICE, STUB, "ImportModelStream", streaming="server")
GET_MODEL = Rpc(SERVICE, STUB, "GetModel", idempotent=True)
DELETE_MODEL = Rpc(SERVICE, STUB, "DeleteModel", idempotent=True)
SET_MODEL_ALIAS = Rpc(SERVICE, STUB, "SetModelAlias", idempotent=True)
#: Importing loads every component in Triton (a fresh torch process each): minutes, not seconds.
IMPORT_TIMEOUT = 1800.0


@dataclass(frozen=True)
class ModelComponent:
    role: str
    triton_model: str
    triton_version: int
    ready: bool
    #: This component's compute dtype and instance kind (the VAE may differ from the rest).
    dtype: str = ""
    device: str = ""


@dataclass(frozen=True)
class ModelDetails:
    """One model version in full (``clinisynth models show``)."""

    model: ModelInfo
    components: list[ModelComponent]
    dtype: str
    device: str
    instances: int
    max_batch_size: int
    size_bytes: int
    retired: bool
    aliases: list[str] = field(default_factory=list)
    source: str = ""
    scheduler: str = ""
    #: The version a LoRA adapter was merged into ("" for a full import).
    base: str = ""
    #: How Triton serves it: "split" (a model per component) or "packed" (one for them all).
    layout: str = "split"

    @property
    def ref(self) -> str:
        return f"{self.model.name}@{self.model.version}"

    @property
    def version(self) -> str:
        return self.model.version

    @classmethod
    def from_proto(cls, m: finetune_pb2.ModelDetails) -> ModelDetails:
        return cls(
            model=ModelInfo.from_proto(m.model),
            components=[
                ModelComponent(c.role, c.triton_model, c.triton_version, c.ready, c.dtype, c.device)
                for c in m.components
            ],
            dtype=m.dtype,
            device=m.device,
            instances=m.instances,
            max_batch_size=m.max_batch_size,
            size_bytes=m.size_bytes,
            retired=m.retired,
            aliases=list(m.aliases),
            source=m.source,
            scheduler=m.scheduler,
            base=m.base,
            layout=m.layout or "split",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_of(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_manifest(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """relative path → (file, sha256) of every file (hidden names skipped)."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    out: dict[str, tuple[pathlib.Path, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            out[rel] = (path, sha256_of(path))
    if not out:
        raise ValueError(f"{root} holds no files")
    return out


def upload_id(manifest: Mapping[str, tuple[pathlib.Path, str]]) -> str:
    """Content-derived: the same folder gets the same id, so its upload can resume."""
    h = hashlib.sha256()
    for rel, (_, digest) in sorted(manifest.items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return "u" + h.hexdigest()[:32]


def import_request(
    source: str,
    name: str,
    description: str | None,
    labels: Mapping[str, str] | None,
    dtype: str | None,
    device: str | None,
    instances: int | None,
    max_batch_size: int | None,
    base: str | None = None,
    component_dtypes: Mapping[str, str] | None = None,
    component_devices: Mapping[str, str] | None = None,
    replay: str | None = None,
    layout: str | None = None,
) -> finetune_pb2.ImportModelRequest:
    return finetune_pb2.ImportModelRequest(
        base=model_ref(base) if base else None,
        source=source,
        name=name,
        description=description or "",
        labels=dict(labels or {}),
        dtype=dtype or "",
        device=device or "",
        instances=instances or 0,
        max_batch_size=max_batch_size or 0,
        component_dtypes=dict(component_dtypes or {}),
        component_devices=dict(component_devices or {}),
        replay=replay or "",
        layout=layout or "",
    )


def import_event(
    msg: finetune_pb2.ImportModelEvent, update: ProgressCallback | None
) -> ModelDetails | None:
    """One ImportModelStream event: shown as progress, or (the last) the imported version."""
    if msg.HasField("details"):
        return ModelDetails.from_proto(msg.details)
    if update is not None:
        total = max(msg.total_steps, msg.step, 1)
        update(ProgressEvent(msg.stage, msg.step, total, msg.step / total, msg.message))
    return None


def ref_request(model: str) -> finetune_pb2.GetModelRequest:
    return finetune_pb2.GetModelRequest(model=model_ref(model))


def delete_request(model: str) -> finetune_pb2.DeleteModelRequest:
    return finetune_pb2.DeleteModelRequest(model=model_ref(model))


def alias_request(model: str, alias: str) -> finetune_pb2.SetModelAliasRequest:
    return finetune_pb2.SetModelAliasRequest(model=model_ref(model), alias=alias)
