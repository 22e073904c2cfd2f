"""SDK calls of the finetune service (mixed into Client / AsyncClient as ``client.finetune``).

with clinisynth.Client() as client:
    job = client.finetune.create("diffusion_pretrain", "datasets/cells",
                                 params={"max_steps": 2000, "ema": True})
    job = client.finetune.wait(job.id, progress=True)
    model = client.finetune.promote(job.id).model
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from clinisynth._transport import AsyncTransport, Transport
from clinisynth._types import ModelInfo
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


def _bar(progress: Any, total: int, unit: str, desc: str) -> tuple[Any, Any]:
    if callable(progress):
        return progress, None
    if not progress:
        return None, None
    from tqdm import tqdm

    return None, tqdm(total=total, unit=unit, desc=desc)


class Finetune:
    """``client.finetune``: durable training jobs, checkpoints, promotion, data sets."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def _call(
        self, method: str, request: Any, *, idempotent: bool = True, timeout: float | None = None
    ) -> Any:
        return self._t.unary(SERVICE, STUB, method, request, idempotent=idempotent, timeout=timeout)

    def create(
        self,
        kind: str,
        dataset: str,
        *,
        params: Mapping[str, Any] | None = None,
        model_name: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> FinetuneJob:
        """Validate and queue a job (retries are safe: idempotent on ``request_id``)."""
        req = create_request(kind, dataset, params, model_name, request_id)
        return FinetuneJob.from_proto(self._call("CreateJob", req, timeout=timeout))

    def get(self, job_id: str, *, timeout: float | None = None) -> FinetuneJob:
        return FinetuneJob.from_proto(
            self._call("GetJob", finetune_pb2.GetJobRequest(id=job_id), timeout=timeout)
        )

    def list(
        self, *, state: str | None = None, kind: str | None = None, timeout: float | None = None
    ) -> list[FinetuneJob]:
        """Every job (newest first), optionally of one state / kind."""
        out, token = [], ""
        while True:
            resp = self._call("ListJobs", list_request(state, kind, token), timeout=timeout)
            out += [FinetuneJob.from_proto(j) for j in resp.jobs]
            token = resp.next_page_token
            if not token:
                return out

    def cancel(
        self, job_id: str, *, strict: bool = False, timeout: float | None = None
    ) -> FinetuneJob:
        req = finetune_pb2.CancelJobRequest(id=job_id, strict=strict)
        return FinetuneJob.from_proto(self._call("CancelJob", req, timeout=timeout))

    def watch(
        self, job_id: str, *, since: int = 0, timeout: float | None = None
    ) -> Iterator[JobEvent]:
        """Events from ``since`` until the job ends (closing the iterator cancels the call)."""
        req = finetune_pb2.WatchJobRequest(id=job_id, since_sequence=since)
        for msg in self._t.stream(SERVICE, STUB, "WatchJob", req, timeout=timeout):
            yield JobEvent.from_proto(msg)

    def wait(
        self,
        job_id: str,
        *,
        progress: bool | Callable[[JobEvent], None] = False,
        timeout: float | None = None,
    ) -> FinetuneJob:
        """Follow the job's events until it ends; returns the final job."""
        callback, bar = _bar(progress, 0, "step", job_id)
        try:
            for event in self.watch(job_id, timeout=timeout):
                if callback is not None:
                    callback(event)
                if bar is not None:
                    _update_bar(bar, event, self)
        finally:
            if bar is not None:
                bar.close()
        return self.get(job_id)

    def checkpoints(self, job_id: str, *, timeout: float | None = None) -> list[Checkpoint]:
        resp = self._call(
            "ListCheckpoints", finetune_pb2.ListCheckpointsRequest(job_id=job_id), timeout=timeout
        )
        return [Checkpoint.from_proto(c) for c in resp.checkpoints]

    def promote(
        self,
        job_id: str,
        checkpoint: str | None = None,
        *,
        model_name: str | None = None,
        timeout: float | None = None,
    ) -> PromoteResult:
        """Checkpoint (default: the best, else the last) → a new Triton model version."""
        req = finetune_pb2.PromoteCheckpointRequest(
            job_id=job_id, checkpoint_id=checkpoint or "", model_name=model_name or ""
        )
        resp = self._call("PromoteCheckpoint", req, idempotent=False, timeout=timeout)
        return PromoteResult(ModelInfo.from_proto(resp.model), resp.previous_version)

    def kinds(self, *, timeout: float | None = None) -> list[JobKind]:
        resp = self._call("ListJobKinds", finetune_pb2.ListJobKindsRequest(), timeout=timeout)
        return [JobKind.from_proto(k) for k in resp.kinds]

    def upload_file(
        self, path: str | os.PathLike[str], key: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """One file into the store at ``key`` (sha256 checked by the server)."""
        ref = self._t.unary(
            SERVICE,
            STUB,
            "UploadDatasetFile",
            upload_chunks(pathlib.Path(path), key),
            idempotent=False,
            timeout=timeout,
        )
        return {"key": ref.key, "uri": ref.uri, "sha256": ref.sha256, "size_bytes": ref.size_bytes}

    def upload_dataset(
        self,
        local_dir: str | os.PathLike[str],
        prefix: str,
        *,
        layout: str | None = None,
        progress: bool = False,
        timeout: float | None = None,
    ) -> DatasetReport:
        """Check a local folder against its layout, upload it under ``prefix``, validate there.

        Raises ``ValueError`` listing every local problem before anything is uploaded.
        """
        layout, files, problems = check_local_dataset(local_dir, layout)
        if problems:
            raise ValueError(
                f"{local_dir} is not a valid {layout} data set:\n  " + "\n  ".join(problems)
            )
        base = pathlib.Path(local_dir)
        prefix = prefix.strip("/")
        _, bar = _bar(progress, len(files), "file", f"uploading to {prefix}")
        try:
            for path in files:
                self.upload_file(
                    path, f"{prefix}/{path.relative_to(base).as_posix()}", timeout=timeout
                )
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return self.validate_dataset(prefix, layout=layout, timeout=timeout)

    def validate_dataset(
        self, prefix: str, *, layout: str | None = None, timeout: float | None = None
    ) -> DatasetReport:
        req = finetune_pb2.ValidateDatasetRequest(prefix=prefix, layout=layout or "")
        return DatasetReport.from_proto(self._call("ValidateDataset", req, timeout=timeout))


def _update_bar(bar: Any, event: JobEvent, calls: Any) -> None:
    if event.type == "progress":
        if not bar.total:
            with contextlib.suppress(Exception):
                bar.total = calls.get(event.job_id).max_steps
        if event.step > bar.n:
            bar.update(event.step - bar.n)
        if "loss" in event.metrics:
            bar.set_postfix(loss=f"{event.metrics['loss']:.4f}")
    elif event.type in ("state", "checkpoint", "error", "log"):
        what = event.state if event.type == "state" else event.type
        bar.write(f"[{event.sequence}] {what}: {event.message or event.step}")


class AsyncFinetune:
    """asyncio twin of :class:`Finetune` (``async_client.finetune``)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def _call(
        self, method: str, request: Any, *, idempotent: bool = True, timeout: float | None = None
    ) -> Any:
        return await self._t.unary(
            SERVICE, STUB, method, request, idempotent=idempotent, timeout=timeout
        )

    async def create(
        self,
        kind: str,
        dataset: str,
        *,
        params: Mapping[str, Any] | None = None,
        model_name: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> FinetuneJob:
        req = create_request(kind, dataset, params, model_name, request_id)
        return FinetuneJob.from_proto(await self._call("CreateJob", req, timeout=timeout))

    async def get(self, job_id: str, *, timeout: float | None = None) -> FinetuneJob:
        return FinetuneJob.from_proto(
            await self._call("GetJob", finetune_pb2.GetJobRequest(id=job_id), timeout=timeout)
        )

    async def list(
        self, *, state: str | None = None, kind: str | None = None, timeout: float | None = None
    ) -> list[FinetuneJob]:
        out, token = [], ""
        while True:
            resp = await self._call("ListJobs", list_request(state, kind, token), timeout=timeout)
            out += [FinetuneJob.from_proto(j) for j in resp.jobs]
            token = resp.next_page_token
            if not token:
                return out

    async def cancel(
        self, job_id: str, *, strict: bool = False, timeout: float | None = None
    ) -> FinetuneJob:
        req = finetune_pb2.CancelJobRequest(id=job_id, strict=strict)
        return FinetuneJob.from_proto(await self._call("CancelJob", req, timeout=timeout))

    async def watch(
        self, job_id: str, *, since: int = 0, timeout: float | None = None
    ) -> AsyncIterator[JobEvent]:
        req = finetune_pb2.WatchJobRequest(id=job_id, since_sequence=since)
        async for msg in self._t.stream(SERVICE, STUB, "WatchJob", req, timeout=timeout):
            yield JobEvent.from_proto(msg)

    async def wait(
        self,
        job_id: str,
        *,
        progress: Callable[[JobEvent], None] | None = None,
        timeout: float | None = None,
    ) -> FinetuneJob:
        async for event in self.watch(job_id, timeout=timeout):
            if progress is not None:
                progress(event)
        return await self.get(job_id)

    async def checkpoints(self, job_id: str, *, timeout: float | None = None) -> list[Checkpoint]:
        resp = await self._call(
            "ListCheckpoints", finetune_pb2.ListCheckpointsRequest(job_id=job_id), timeout=timeout
        )
        return [Checkpoint.from_proto(c) for c in resp.checkpoints]

    async def promote(
        self,
        job_id: str,
        checkpoint: str | None = None,
        *,
        model_name: str | None = None,
        timeout: float | None = None,
    ) -> PromoteResult:
        req = finetune_pb2.PromoteCheckpointRequest(
            job_id=job_id, checkpoint_id=checkpoint or "", model_name=model_name or ""
        )
        resp = await self._call("PromoteCheckpoint", req, idempotent=False, timeout=timeout)
        return PromoteResult(ModelInfo.from_proto(resp.model), resp.previous_version)

    async def kinds(self, *, timeout: float | None = None) -> list[JobKind]:
        resp = await self._call("ListJobKinds", finetune_pb2.ListJobKindsRequest(), timeout=timeout)
        return [JobKind.from_proto(k) for k in resp.kinds]

    async def upload_file(
        self, path: str | os.PathLike[str], key: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        ref = await self._t.unary(
            SERVICE,
            STUB,
            "UploadDatasetFile",
            upload_chunks(pathlib.Path(path), key),
            idempotent=False,
            timeout=timeout,
        )
        return {"key": ref.key, "uri": ref.uri, "sha256": ref.sha256, "size_bytes": ref.size_bytes}

    async def upload_dataset(
        self,
        local_dir: str | os.PathLike[str],
        prefix: str,
        *,
        layout: str | None = None,
        timeout: float | None = None,
    ) -> DatasetReport:
        layout, files, problems = check_local_dataset(local_dir, layout)
        if problems:
            raise ValueError(
                f"{local_dir} is not a valid {layout} data set:\n  " + "\n  ".join(problems)
            )
        base = pathlib.Path(local_dir)
        prefix = prefix.strip("/")
        for path in files:
            await self.upload_file(
                path, f"{prefix}/{path.relative_to(base).as_posix()}", timeout=timeout
            )
        return await self.validate_dataset(prefix, layout=layout, timeout=timeout)

    async def validate_dataset(
        self, prefix: str, *, layout: str | None = None, timeout: float | None = None
    ) -> DatasetReport:
        req = finetune_pb2.ValidateDatasetRequest(prefix=prefix, layout=layout or "")
        return DatasetReport.from_proto(await self._call("ValidateDataset", req, timeout=timeout))


class FinetuneCalls:
    """Finetune calls of :class:`clinisynth.Client`: ``client.finetune.<call>``."""

    _t: Transport

    @property
    def finetune(self) -> Finetune:
        return Finetune(self._t)


class AsyncFinetuneCalls:
    """Finetune calls of :class:`clinisynth.AsyncClient`: ``client.finetune.<call>``."""

    _t: AsyncTransport

    @property
    def finetune(self) -> AsyncFinetune:
        return AsyncFinetune(self._t)
