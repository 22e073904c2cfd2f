"""Typed results returned by the SDK (plain dataclasses built from the protos)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict
from PIL import Image as PILImage

from clinisynth import _images
from clinisynth.v1 import common_pb2

MODEL_KINDS = {
    common_pb2.MODEL_KIND_TEXT_TO_IMAGE: "text_to_image",
    common_pb2.MODEL_KIND_CLASS_CONDITIONAL: "class_conditional",
    common_pb2.MODEL_KIND_UNCONDITIONAL: "unconditional",
    common_pb2.MODEL_KIND_REWARD: "reward",
    common_pb2.MODEL_KIND_CLASSIFIER: "classifier",
}
KIND_VALUES = {v: k for k, v in MODEL_KINDS.items()}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    kind: str
    classes: list[str]
    width: int
    height: int
    channels: int
    digest: str
    samplers: list[str]
    default_sampler: str
    default_steps: int
    max_images: int
    latest: bool
    labels: dict[str, str]
    description: str = ""

    @classmethod
    def from_proto(cls, m: common_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=m.name,
            version=m.version,
            kind=MODEL_KINDS.get(m.kind, "unspecified"),
            classes=list(m.classes),
            width=m.width,
            height=m.height,
            channels=m.channels,
            digest=m.digest,
            samplers=list(m.samplers),
            default_sampler=m.default_sampler,
            default_steps=m.default_steps,
            max_images=m.max_images,
            latest=m.latest,
            labels=dict(m.labels),
            description=m.description,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def provenance_dict(p: common_pb2.Provenance) -> dict[str, Any]:
    return MessageToDict(p, preserving_proto_field_name=True)


@dataclass
class GeneratedImage:
    """One generated image: encoded bytes (PNG / DICOM) or a raw array, plus its provenance."""

    index: int
    data: bytes
    array: np.ndarray | None
    format: str
    provenance: dict[str, Any]
    reward: float | None = None
    ref: dict[str, Any] | None = None
    width: int = 0
    height: int = 0
    # The memorization gate: "off", "no index", "passed", "flagged" or "regenerated", and the
    # nearest training-image distance (None when not computed) against ``memorization_threshold``.
    memorization: str = ""
    memorization_distance: float | None = None
    memorization_threshold: float | None = None

    @property
    def seed(self) -> int:
        return int(self.provenance.get("seed", 0))

    def to_pil(self) -> PILImage.Image:
        return _images.to_pil(self.data, self.array)

    def to_numpy(self) -> np.ndarray:
        """Pixels as float32 in [0, 1] ([H, W] or [H, W, C])."""
        return _images.to_numpy(self.data, self.array)

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        if self.array is not None:
            np.save(path.with_suffix(".npy"), self.array)
            return path.with_suffix(".npy")
        path.write_bytes(self.data)
        return path

    @property
    def suffix(self) -> str:
        return {"dicom": ".dcm", "raw": ".npy"}.get(self.format, ".png")


@dataclass(frozen=True)
class PacsItem:
    """One DICOM instance in the PACS outbox: "pending", "delivered" or "failed"."""

    destination: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    request_id: str
    status: str
    attempts: int = 0
    last_error: str = ""
    origin: str = ""
    enqueued_at: float = 0.0  # seconds since the epoch
    delivered_at: float | None = None

    @classmethod
    def from_proto(cls, m: common_pb2.PacsOutboxItem) -> PacsItem:
        return cls(
            destination=m.destination,
            sop_instance_uid=m.sop_instance_uid,
            study_instance_uid=m.study_instance_uid,
            series_instance_uid=m.series_instance_uid,
            request_id=m.request_id,
            status=m.status,
            attempts=m.attempts,
            last_error=m.last_error,
            origin=m.origin,
            enqueued_at=m.enqueued_at.ToNanoseconds() / 1e9,
            delivered_at=(
                m.delivered_at.ToNanoseconds() / 1e9 if m.HasField("delivered_at") else None
            ),
        )


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    request_id: str
    candidates: int = 0
    provenance_ref: dict[str, Any] | None = None
    # With ``to_pacs``: the outbox items of the series ("pending" when answered).
    pacs: list[PacsItem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[GeneratedImage]:
        return iter(self.images)

    def save(self, out_dir: str | pathlib.Path, stem: str = "image") -> list[pathlib.Path]:
        """Write one file per image plus provenance.json; return the image paths."""
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [img.save(out / f"{stem}_{img.index:03d}{img.suffix}") for img in self.images]
        records = [
            {"file": p.name, "reward": img.reward, **img.provenance}
            for p, img in zip(paths, self.images, strict=True)
        ]
        (out / "provenance.json").write_text(json.dumps(records, indent=2))
        return paths


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    step: int
    total_steps: int
    fraction: float
    message: str = ""
    preview_png: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AuditModel:
    """A model an audited call named (``field``: the request field) or was served by."""

    name: str
    version: str
    digest: str
    field: str


@dataclass(frozen=True)
class AuditEntry:
    """One call in the audit trail (``client.audit()``): who, what, on which model, outcome,
    sizes. It holds no request content (no pixels, prompts or patient identifiers)."""

    id: str
    time: float  # Unix seconds, when the call started
    service: str
    principal: str
    tenant: str
    via: str
    method: str
    code: str
    request_id: str
    models: list[AuditModel]
    request_bytes: int
    response_bytes: int
    request_messages: int
    response_messages: int
    duration_ms: float
    peer: str

    @property
    def rpc(self) -> str:
        """The method's short name (``"Generate"``)."""
        return self.method.rsplit("/", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
