"""Finetune RPCs: declarations, typed results, request building and local data set checks.

The calls themselves are ``client.finetune.<call>`` (see ``_rpc`` for the layout):

with clinisynth.Client() as client:
    job = client.finetune.create("diffusion_pretrain", "datasets/cells",
                                 params={"max_steps": 2000, "ema": True})
    job = client.finetune.wait(job.id, progress=True)
    model = client.finetune.promote(job.id).model
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pathlib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from clinisynth._rpc import Rpc
from clinisynth._types import ModelInfo, ProgressEvent
from clinisynth.v1 import finetune_pb2, finetune_pb2_grpc

STUB = finetune_pb2_grpc.FinetuneServiceStub
SERVICE = "finetune"
CHUNK = 1024 * 1024
STATES = {
    finetune_pb2.JOB_STATE_QUEUED: "queued",
    finetune_pb2.JOB_STATE_RUNNING: "running",
    finetune_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    finetune_pb2.JOB_STATE_FAILED: "failed",
    finetune_pb2.JOB_STATE_CANCELLED: "cancelled",
}
STATE_VALUES = {v: k for k, v in STATES.items()}
TERMINAL = ("succeeded", "failed", "cancelled")
LAYOUTS = ("image_folder", "image_text_manifest", "feedback_export")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")

# Creating a job is idempotent on its request_id; promotion makes a new model version each time
# and an upload's request is a one-shot iterator, so neither is repeated.
CREATE_JOB = Rpc(SERVICE, STUB, "CreateJob", idempotent=True)
GET_JOB = Rpc(SERVICE, STUB, "GetJob", idempotent=True)
LIST_JOBS = Rpc(SERVICE, STUB, "ListJobs", idempotent=True)
CANCEL_JOB = Rpc(SERVICE, STUB, "CancelJob", idempotent=True)
WATCH_JOB = Rpc(SERVICE, STUB, "WatchJob", streaming="server")
LIST_CHECKPOINTS = Rpc(SERVICE, STUB, "ListCheckpoints", idempotent=True)
PROMOTE_CHECKPOINT = Rpc(SERVICE, STUB, "PromoteCheckpoint", idempotent=False)
LIST_JOB_KINDS = Rpc(SERVICE, STUB, "ListJobKinds", idempotent=True)
UPLOAD_DATASET_FILE = Rpc(SERVICE, STUB, "UploadDatasetFile", streaming="client")
VALIDATE_DATASET = Rpc(SERVICE, STUB, "ValidateDataset", idempotent=True)
LIST_DATASET_FILES = Rpc(SERVICE, STUB, "ListDatasetFiles", idempotent=True)
#: Local layouts ``upload_dataset`` reads; ``dicom_archive`` is stored as an image-text manifest.
UPLOAD_LAYOUTS = (*LAYOUTS, "dicom_archive")


def _time(msg: Any, name: str) -> dt.datetime | None:
    if not msg.HasField(name):
        return None
    return getattr(msg, name).ToDatetime(tzinfo=dt.UTC)


@dataclass(frozen=True)
class FinetuneJob:
    id: str
    kind: str
    state: str
    dataset: str
    params: dict[str, str]
    model_name: str
    step: int
    max_steps: int
    metrics: dict[str, float]
    failure_reason: str = ""
    request_id: str = ""
    restarts: int = 0
    queue_position: int = 0
    created: dt.datetime | None = None
    started: dt.datetime | None = None
    finished: dt.datetime | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_proto(cls, m: finetune_pb2.Job) -> FinetuneJob:
        return cls(
            id=m.id,
            kind=m.kind,
            state=STATES.get(m.state, "unspecified"),
            dataset=m.dataset,
            params=dict(m.params),
            model_name=m.model_name,
            step=m.step,
            max_steps=m.max_steps,
            metrics=dict(m.metrics),
            failure_reason=m.failure_reason,
            request_id=m.request_id,
            restarts=m.restarts,
            queue_position=m.queue_position,
            created=_time(m, "created"),
            started=_time(m, "started"),
            finished=_time(m, "finished"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Checkpoint:
    id: str
    step: int
    metrics: dict[str, float]
    key: str
    uri: str
    best: bool = False
    created: dt.datetime | None = None

    @classmethod
    def from_proto(cls, m: finetune_pb2.Checkpoint) -> Checkpoint:
        return cls(
            id=m.id,
            step=m.step,
            metrics=dict(m.metrics),
            key=m.ref.key,
            uri=m.ref.uri,
            best=m.best,
            created=_time(m, "created"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobEvent:
    sequence: int
    type: str  # state | progress | metrics | checkpoint | log | error
    job_id: str
    state: str
    step: int
    metrics: dict[str, float]
    message: str
    checkpoint: Checkpoint | None = None
    time: dt.datetime | None = None

    @classmethod
    def from_proto(cls, m: finetune_pb2.JobEvent) -> JobEvent:
        return cls(
            sequence=m.sequence,
            type=m.type,
            job_id=m.job_id,
            state=STATES.get(m.state, ""),
            step=m.step,
            metrics=dict(m.metrics),
            message=m.message,
            checkpoint=Checkpoint.from_proto(m.checkpoint) if m.HasField("checkpoint") else None,
            time=_time(m, "time"),
        )


@dataclass(frozen=True)
class JobParam:
    name: str
    type: str
    default: str
    description: str
    choices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class JobKind:
    name: str
    description: str
    dataset_layout: str
    params: list[JobParam]

    @classmethod
    def from_proto(cls, m: finetune_pb2.JobKind) -> JobKind:
        return cls(
            m.name,
            m.description,
            m.dataset_layout,
            [JobParam(p.name, p.type, p.default, p.description, list(p.choices)) for p in m.params],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DatasetReport:
    prefix: str
    layout: str
    images: int
    classes: list[str]
    per_class: dict[str, int]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    @classmethod
    def from_proto(cls, m: finetune_pb2.DatasetReport) -> DatasetReport:
        return cls(
            m.prefix, m.layout, m.images, list(m.classes), dict(m.per_class), list(m.problems)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PromoteResult:
    model: ModelInfo
    previous_version: str


# ---------------------------------------------------------------------------------------------
# request building and local checks shared by the sync and async calls
# ---------------------------------------------------------------------------------------------


def _param_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def create_request(
    kind: str,
    dataset: str,
    params: Mapping[str, Any] | None,
    model_name: str | None,
    request_id: str | None,
) -> finetune_pb2.CreateJobRequest:
    return finetune_pb2.CreateJobRequest(
        kind=kind,
        dataset=dataset,
        params={k: _param_str(v) for k, v in (params or {}).items()},
        model_name=model_name or "",
        request_id=request_id or uuid.uuid4().hex,
    )


def list_request(state: str | None, kind: str | None, token: str) -> finetune_pb2.ListJobsRequest:
    if state is not None and state not in STATE_VALUES:
        raise ValueError(f"state must be one of {sorted(STATE_VALUES)}, not {state!r}")
    return finetune_pb2.ListJobsRequest(
        state=STATE_VALUES.get(state or "", finetune_pb2.JOB_STATE_UNSPECIFIED),
        kind=kind or "",
        page_size=1000,
        page_token=token,
    )


def guess_layout(root: pathlib.Path) -> str:
    if (root / "manifest.jsonl").is_file():
        return "image_text_manifest"
    if (root / "labels.jsonl").is_file():
        return "feedback_export"
    return "image_folder"


def check_local_dataset(
    root: str | os.PathLike[str], layout: str | None = None
) -> tuple[str, list[pathlib.Path], list[str]]:
    """Check a local folder against a layout (without uploading): (layout, files, problems)."""
    from PIL import Image, UnidentifiedImageError

    base = pathlib.Path(root)
    problems: list[str] = []
    if not base.is_dir():
        return layout or "image_folder", [], [f"{base} is not a folder"]
    layout = layout or guess_layout(base)
    if layout not in LAYOUTS:
        return layout, [], [f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}"]
    files = sorted(
        p
        for p in base.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts)
    )
    rel = {p.relative_to(base).as_posix() for p in files}
    images: list[str] = []
    if layout == "image_folder":
        for name in sorted(rel):
            if name.lower().endswith(IMAGE_SUFFIXES):
                if "/" in name:
                    images.append(name)
                else:
                    problems.append(f"{name}: image outside a class folder (<class>/<file>)")
    else:
        index = "manifest.jsonl" if layout == "image_text_manifest" else "labels.jsonl"
        if index not in rel:
            problems.append(f"{index} is missing")
        else:
            for n, line in enumerate((base / index).read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    problems.append(f"{index} line {n}: not JSON ({exc.msg})")
                    continue
                # Same rule as the server's reader: "file" is what older sets wrote.
                image = obj.get("image", obj.get("file")) if isinstance(obj, dict) else None
                if not isinstance(image, str) or image not in rel:
                    problems.append(f"{index} line {n}: image {image!r} is missing")
                else:
                    images.append(image)
    if not images and not problems:
        problems.append(f"no images in {base}")
    for name in images:
        if name.lower().endswith((".dcm", ".dicom")):
            continue  # checked by the server's DICOM decoder after the upload
        try:
            with Image.open(base / name) as im:
                im.verify()
        except (UnidentifiedImageError, OSError) as exc:
            problems.append(f"{name}: unreadable image ({exc})")
    return layout, files, problems


@dataclass
class ShardPlan:
    """A local data set as the store will hold it: layout files, shards, what was left out."""

    layout: str  # the layout stored (the archive layout becomes image_text_manifest)
    plain: list[tuple[str, bytes]]
    shards: list[Any]
    problems: list[str]
    left_out: list[str] = field(default_factory=list)


def shard_plan(
    root: str | os.PathLike[str],
    layout: str | None,
    *,
    shard_bytes: int,
    reports_csv: str | os.PathLike[str] | None = None,
    report_key: str = "study_id",
    report_text: str = "report",
    section: str = "impression",
    class_column: str | None = None,
) -> ShardPlan:
    """Check a local folder and cut it into shards (nothing is uploaded)."""
    from clinisynth import _shards

    base = pathlib.Path(root)
    if layout == "dicom_archive":
        if reports_csv is None:
            return ShardPlan(layout, [], [], ["the dicom_archive layout needs a reports CSV"])
        if not base.is_dir():
            return ShardPlan(layout, [], [], [f"{base} is not a folder"])
        archive = _shards.read_archive(
            base,
            pathlib.Path(reports_csv),
            key_column=report_key,
            text_column=report_text,
            section=section,
            class_column=class_column,
        )
        return ShardPlan(
            "image_text_manifest",
            [("manifest.jsonl", archive.manifest)],
            _shards.plan(archive.members, shard_bytes=shard_bytes),
            archive.problems,
            archive.left_out,
        )
    layout, files, problems = check_local_dataset(base, layout)
    index = {"image_text_manifest": "manifest.jsonl", "feedback_export": "labels.jsonl"}
    plain, members = [], []
    for path in files:
        rel = path.relative_to(base).as_posix()
        if rel == index.get(layout):
            plain.append((rel, path.read_bytes()))
        elif rel.lower().endswith(IMAGE_SUFFIXES):
            members.append(_shards.Member(rel, path))
    return ShardPlan(layout, plain, _shards.plan(members, shard_bytes=shard_bytes), problems)


def upload_chunks(path: pathlib.Path, key: str) -> Iterator[finetune_pb2.UploadChunk]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        data = fh.read(CHUNK)
        first = True
        while True:
            nxt = fh.read(CHUNK)
            digest.update(data)
            chunk = finetune_pb2.UploadChunk(key=key if first else "", data=data)
            if not nxt:
                chunk.sha256 = digest.hexdigest()
                yield chunk
                return
            yield chunk
            first, data = False, nxt


def job_progress(event: JobEvent, max_steps: int) -> ProgressEvent:
    """A job event as a progress bar sees it (loss as the message, state changes by name)."""
    if event.type == "progress":
        loss = event.metrics.get("loss")
        message = f"loss={loss:.4f}" if loss is not None else ""
    else:
        message = f"{event.state if event.type == 'state' else event.type}: {event.message}"
    fraction = event.step / max_steps if max_steps else 0.0
    return ProgressEvent(event.type, event.step, max_steps, fraction, message.rstrip(": "))


def ref_dict(ref: Any) -> dict[str, Any]:
    return {"key": ref.key, "uri": ref.uri, "sha256": ref.sha256, "size_bytes": ref.size_bytes}
