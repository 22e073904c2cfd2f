"""FinetuneService servicer: proto ↔ domain only; the work is in :mod:`.service`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf import timestamp_pb2

from clinisynth.v1 import common_pb2, finetune_pb2, finetune_pb2_grpc
from clinisynth_server import protoconv
from clinisynth_server.finetune import imports
from clinisynth_server.finetune import service as svc
from clinisynth_server.finetune.records import CheckpointInfo, Event
from clinisynth_server.runtime.auth import principal_of
from clinisynth_server.runtime.streaming import cancel_token, stream_events
from clinisynth_server.store.base import IMPORTS_NAMESPACE, ArtifactStore
from clinisynth_server.tenancy import viewer_of

STATE_TO_PROTO = {
    "queued": finetune_pb2.JOB_STATE_QUEUED,
    "running": finetune_pb2.JOB_STATE_RUNNING,
    "succeeded": finetune_pb2.JOB_STATE_SUCCEEDED,
    "failed": finetune_pb2.JOB_STATE_FAILED,
    "cancelled": finetune_pb2.JOB_STATE_CANCELLED,
}
PROTO_TO_STATE = {v: k for k, v in STATE_TO_PROTO.items()}


def _ts(seconds: float) -> timestamp_pb2.Timestamp | None:
    return protoconv.timestamp(seconds) if seconds else None


def job_proto(view: svc.JobView) -> finetune_pb2.Job:
    r = view.record
    msg = finetune_pb2.Job(
        id=r.id,
        kind=r.kind,
        state=STATE_TO_PROTO[r.state],
        dataset=r.dataset,
        params=r.params,
        step=view.step,
        max_steps=r.max_steps,
        metrics={k: float(v) for k, v in view.metrics.items()},
        failure_reason=r.failure_reason,
        request_id=r.request_id,
        restarts=r.restarts,
        model_name=r.model_name,
        queue_position=view.queue_position,
    )
    for name, value in (("created", r.created), ("started", r.started), ("finished", r.finished)):
        ts = _ts(value)
        if ts is not None:
            getattr(msg, name).CopyFrom(ts)
    return msg


def checkpoint_proto(c: CheckpointInfo, store: ArtifactStore) -> finetune_pb2.Checkpoint:
    ref = common_pb2.ArtifactRef(key=c.prefix + "model/", uri=store.uri(c.prefix + "model"))
    msg = finetune_pb2.Checkpoint(id=c.id, step=c.step, metrics=c.metrics, ref=ref, best=c.best)
    msg.created.CopyFrom(protoconv.timestamp(c.created))
    return msg


def event_proto(e: Event, store: ArtifactStore) -> finetune_pb2.JobEvent:
    msg = finetune_pb2.JobEvent(
        sequence=e.sequence,
        job_id=e.job_id,
        type=e.type,
        state=STATE_TO_PROTO.get(e.state, finetune_pb2.JOB_STATE_UNSPECIFIED),
        step=e.step,
        metrics={k: float(v) for k, v in e.metrics.items()},
        message=e.message,
    )
    msg.time.CopyFrom(protoconv.timestamp(e.time))
    if e.checkpoint:
        msg.checkpoint.CopyFrom(
            finetune_pb2.Checkpoint(
                id=e.checkpoint.get("id", ""),
                step=int(e.checkpoint.get("step", 0)),
                metrics={k: float(v) for k, v in e.metrics.items()},
                ref=common_pb2.ArtifactRef(
                    key=e.checkpoint.get("prefix", "") + "model/",
                    uri=store.uri(e.checkpoint.get("prefix", "") + "model"),
                ),
            )
        )
    return msg


def model_details(view: imports.ModelView) -> finetune_pb2.ModelDetails:
    r = view.record
    dtype = str(r.extra.get("dtype", "float32"))
    device = str(r.extra.get("device", "cpu"))
    dtypes = dict(r.extra.get("component_dtypes") or {})
    devices = dict(r.extra.get("component_devices") or {})
    return finetune_pb2.ModelDetails(
        model=protoconv.model_info(r, latest=view.latest),
        components=[
            finetune_pb2.ModelComponent(
                role=role,
                triton_model=name,
                triton_version=r.component_versions.get(role, r.version),
                ready=view.ready.get(role, False),
                dtype=str(dtypes.get(role, dtype)),
                device=str(devices.get(role, device)),
            )
            for role, name in sorted(r.components.items())
        ],
        dtype=dtype,
        device=device,
        instances=int(r.extra.get("instances", 1)),
        max_batch_size=int(r.extra.get("max_batch_size", 0)),
        size_bytes=int(r.extra.get("size_bytes", 0)),
        retired=view.retired,
        aliases=view.aliases,
        source=str(r.extra.get("source", "")),
        scheduler=str(r.scheduler.get("_class_name", "")),
        base=str(r.extra.get("base", "")),
        layout=str(r.extra.get("layout", "split")),
    )


def import_options(request: finetune_pb2.ImportModelRequest) -> imports.ImportOptions:
    return imports.ImportOptions(
        source=request.source,
        name=request.name,
        description=request.description,
        labels=dict(request.labels),
        dtype=request.dtype,
        device=request.device,
        instances=request.instances,
        max_batch_size=request.max_batch_size,
        base_name=request.base.name,
        base_version=request.base.version,
        component_dtypes=dict(request.component_dtypes),
        component_devices=dict(request.component_devices),
        replay=request.replay,
        layout=request.layout,
    )


def _scope(context: object) -> dict[str, Any]:
    """The caller's tenant and admin flag, as the domain methods take them."""
    viewer = viewer_of(principal_of(context))
    return {"tenant": viewer.tenant, "admin": viewer.admin}


class FinetuneServicer(finetune_pb2_grpc.FinetuneServiceServicer):
    def __init__(
        self, service: svc.FinetuneService, models: imports.ModelImports | None = None
    ) -> None:
        self.service = service
        self.models = models or imports.ModelImports(
            service.store,
            service.catalog,
            service.triton,
            imports.ImportSettings(model_repository=service.settings.model_repository),
        )

    def CreateJob(self, request, context):
        record = self.service.create(
            request.kind,
            request.dataset,
            dict(request.params),
            model_name=request.model_name,
            request_id=request.request_id,
            **_scope(context),
        )
        return job_proto(self.service.view(record))

    def GetJob(self, request, context):
        return job_proto(self.service.get(request.id, **_scope(context)))

    def ListJobs(self, request, context):
        state = PROTO_TO_STATE.get(request.state, "")
        if request.state and not state:
            from clinisynth_server.errors import InvalidArgument

            raise InvalidArgument.for_field("state", f"unknown job state {request.state}")
        views, token = self.service.list(
            state=state,
            kind=request.kind,
            page_size=request.page_size,
            page_token=request.page_token,
            **_scope(context),
        )
        return finetune_pb2.ListJobsResponse(
            jobs=[job_proto(v) for v in views], next_page_token=token
        )

    def CancelJob(self, request, context):
        return job_proto(self.service.cancel(request.id, strict=request.strict, **_scope(context)))

    def WatchJob(self, request, context) -> Iterator[finetune_pb2.JobEvent]:
        token = cancel_token(context)
        scope = _scope(context)
        for kind, item in stream_events(
            lambda sink: self.service.watch(
                request.id, request.since_sequence, sink, token.check, **scope
            ),
            token,
        ):
            if kind == "event":
                yield event_proto(item, self.service.store)

    def ListCheckpoints(self, request, context):
        return finetune_pb2.ListCheckpointsResponse(
            checkpoints=[
                checkpoint_proto(c, self.service.store)
                for c in self.service.checkpoints(request.job_id, **_scope(context))
            ]
        )

    def PromoteCheckpoint(self, request, context):
        record, previous = self.service.promote(
            request.job_id, request.checkpoint_id, request.model_name, **_scope(context)
        )
        return finetune_pb2.PromoteCheckpointResponse(
            model=protoconv.model_info(record, latest=True), previous_version=previous
        )

    def ListJobKinds(self, request, context):
        return finetune_pb2.ListJobKindsResponse(
            kinds=[
                finetune_pb2.JobKind(
                    name=k.name,
                    description=k.description,
                    dataset_layout=k.dataset_layout,
                    params=[
                        finetune_pb2.ParamSpec(
                            name=p.name,
                            type=p.type,
                            default=p.default,
                            description=p.description,
                            choices=p.choices,
                        )
                        for p in k.params
                    ],
                )
                for k in self.service.kinds()
            ]
        )

    def UploadDatasetFile(self, request_iterator, context):
        info = self.service.upload(
            svc.iter_upload(request_iterator), tenant=principal_of(context).tenant
        )
        return protoconv.artifact_ref(info, self.service.store)

    def ValidateDataset(self, request, context):
        report = self.service.validate_dataset(request.prefix, request.layout, **_scope(context))
        return finetune_pb2.DatasetReport(
            prefix=report.prefix,
            layout=report.layout,
            images=report.images,
            classes=report.classes,
            per_class=report.per_class,
            problems=report.problems,
        )

    def ListDatasetFiles(self, request, context):
        return finetune_pb2.ListDatasetFilesResponse(
            files=[
                protoconv.artifact_ref(i, self.service.store, presign=False)
                for i in self.service.list_dataset_files(request.prefix, **_scope(context))
            ]
        )

    # -- bring your own model ------------------------------------------------------------------
    def UploadModelFile(self, request_iterator, context):
        chunks = self.models.upload_chunks(svc.iter_upload(request_iterator))
        info = self.service.upload(chunks, namespace=IMPORTS_NAMESPACE)
        return protoconv.artifact_ref(info, self.service.store, presign=False)

    def ListModelUpload(self, request, context):
        return finetune_pb2.ListModelUploadResponse(
            files=[
                protoconv.artifact_ref(i, self.service.store, presign=False)
                for i in self.models.uploaded(request.upload_id)
            ]
        )

    def ImportModel(self, request, context):
        return model_details(self.models.import_model(import_options(request)))

    def ImportModelStream(self, request, context) -> Iterator[finetune_pb2.ImportModelEvent]:
        options = import_options(request)
        token = cancel_token(context)
        for kind, item in stream_events(
            lambda sink: self.models.import_model(options, sink), token
        ):
            if kind == "event":
                yield finetune_pb2.ImportModelEvent(
                    stage=item.stage,
                    step=item.step,
                    total_steps=item.total,
                    message=item.message,
                )
            else:
                yield finetune_pb2.ImportModelEvent(
                    stage="done", step=0, total_steps=0, details=model_details(item)
                )

    def GetModel(self, request, context):
        viewer = viewer_of(principal_of(context))
        return model_details(self.models.get(request.model.name, request.model.version, viewer))

    def DeleteModel(self, request, context):
        viewer = viewer_of(principal_of(context))
        return model_details(self.models.delete(request.model.name, request.model.version, viewer))

    def SetModelAlias(self, request, context):
        viewer = viewer_of(principal_of(context))
        view = self.models.alias(request.model.name, request.model.version, request.alias, viewer)
        return model_details(view)
