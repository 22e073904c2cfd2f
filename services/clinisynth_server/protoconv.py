"""Conversions between protobuf messages and domain types, shared by every servicer."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection

import numpy as np
from google.protobuf import timestamp_pb2

from clinisynth.v1 import common_pb2
from clinisynth_server import paging
from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.imaging import decode as imdecode
from clinisynth_server.imaging.encode import encode_raw
from clinisynth_server.imaging.provenance import Provenance
from clinisynth_server.pacs.outbox import STATUSES as OUTBOX_STATUSES
from clinisynth_server.pacs.outbox import Outbox, OutboxItem
from clinisynth_server.similarity.guard import DomainCheck
from clinisynth_server.store.base import ArtifactStore, ObjectInfo, readable_key
from clinisynth_server.tenancy import Viewer, sees_object

KIND_TO_PROTO = {
    "text_to_image": common_pb2.MODEL_KIND_TEXT_TO_IMAGE,
    "class_conditional": common_pb2.MODEL_KIND_CLASS_CONDITIONAL,
    "unconditional": common_pb2.MODEL_KIND_UNCONDITIONAL,
    "reward": common_pb2.MODEL_KIND_REWARD,
    "classifier": common_pb2.MODEL_KIND_CLASSIFIER,
}
PROTO_TO_KIND = {v: k for k, v in KIND_TO_PROTO.items()}
FORMAT_NAMES = {
    common_pb2.IMAGE_FORMAT_UNSPECIFIED: "png",
    common_pb2.IMAGE_FORMAT_PNG: "png",
    common_pb2.IMAGE_FORMAT_PNG16: "png16",
    common_pb2.IMAGE_FORMAT_DICOM: "dicom",
    common_pb2.IMAGE_FORMAT_RAW: "raw",
}
FORMAT_VALUES = {
    "png": common_pb2.IMAGE_FORMAT_PNG,
    "png16": common_pb2.IMAGE_FORMAT_PNG16,
    "dicom": common_pb2.IMAGE_FORMAT_DICOM,
    "raw": common_pb2.IMAGE_FORMAT_RAW,
}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def model_info(record: ModelRecord, *, latest: bool) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        name=record.name,
        version=str(record.version),
        kind=KIND_TO_PROTO[record.kind],
        classes=record.classes,
        width=record.width,
        height=record.height,
        channels=record.channels,
        digest=record.digest,
        samplers=record.samplers
        if record.kind in ("text_to_image", "class_conditional", "unconditional")
        else [],
        default_sampler=record.default_sampler,
        default_steps=record.default_steps,
        default_guidance_scale=record.default_guidance_scale,
        max_images=record.max_images,
        description=record.description,
        created=timestamp(record.created),
        labels=record.labels,
        latest=latest,
    )


def answer_list_models(
    catalog: Catalog,
    request: common_pb2.ListModelsRequest,
    *,
    kind: str,
    kinds: Collection[str] | None = None,
    viewer: Viewer | None = None,
) -> common_pb2.ListModelsResponse:
    """One ListModels request answered from the catalog: the same paging for every service.

    ``viewer``: the caller; another tenant's private models are not listed.
    """
    return list_models_response(
        paging.list_models(
            catalog,
            kind=kind,
            name=request.name,
            all_versions=request.all_versions,
            page_size=request.page_size,
            page_token=request.page_token,
            kinds=kinds,
            viewer=viewer,
        )
    )


def list_models_response(page: paging.Page[paging.ListedModel]) -> common_pb2.ListModelsResponse:
    """The one ListModels reply every service sends (the page comes from :mod:`.paging`)."""
    return common_pb2.ListModelsResponse(
        models=[model_info(m.record, latest=m.latest) for m in page.items],
        next_page_token=page.next_page_token,
    )


def artifact_ref(
    info: ObjectInfo, store: ArtifactStore, *, presign: bool = True
) -> common_pb2.ArtifactRef:
    url = store.presign_get(info.key) if presign else None
    return common_pb2.ArtifactRef(
        key=info.key,
        uri=store.uri(info.key),
        sha256=info.sha256,
        size_bytes=info.size,
        presigned_url=url or "",
    )


def provenance(p: Provenance) -> common_pb2.Provenance:
    created = dt.datetime.fromisoformat(p.created.replace("Z", "+00:00")).timestamp()
    return common_pb2.Provenance(
        model=common_pb2.ModelRef(name=p.model_name, version=p.model_version),
        model_digest=p.model_digest,
        seed=p.seed,
        sampler=p.sampler,
        steps=p.steps,
        guidance_scale=p.guidance_scale,
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        class_name=p.class_name,
        width=p.size[1],
        height=p.size[0],
        software_version=f"{p.software_name} {p.software_version}",
        created=timestamp(created),
        request_id=p.request_id,
        extra=dict(p.extra),
        replay=p.replay,
    )


def encoded_image(pixels: np.ndarray, data: bytes, fmt: str) -> common_pb2.Image:
    """An output image: raw arrays as RawArray, everything else as encoded bytes."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    image = common_pb2.Image(
        width=width, height=height, channels=channels, format=FORMAT_VALUES[fmt]
    )
    if fmt == "raw":
        raw = encode_raw(pixels)
        image.raw.CopyFrom(
            common_pb2.RawArray(data=raw.data, shape=list(raw.shape), dtype=raw.dtype)
        )
    elif fmt == "dicom":
        image.dicom = data
    else:
        image.encoded = data
    return image


def decode_input_image(
    image: common_pb2.Image,
    *,
    field: str,
    store: ArtifactStore | None = None,
    channels: imdecode.Channels = None,
    max_pixels: int = imdecode.DEFAULT_MAX_PIXELS,
    viewer: Viewer | None = None,
) -> np.ndarray:
    """A request image as float32 [H, W] / [H, W, C] in [0, 1]; INVALID_ARGUMENT on ``field``.

    A store reference to another tenant's object than ``viewer``'s reads as a missing one.
    """
    kind = image.WhichOneof("data")
    if kind is None:
        raise InvalidArgument.for_field(field, "no image data (set encoded, dicom, raw or ref)")
    if kind == "pacs":  # fetched only where a service resolves references before decoding
        raise InvalidArgument.for_field(
            f"{field}.pacs",
            "PACS references are taken by reward Score / ScoreStream and counterfactual "
            "requests only; send the image itself (encoded, dicom or raw) here",
        )
    if kind == "raw":
        raw = image.raw
        return imdecode.decode_raw(
            raw.data,
            tuple(raw.shape),
            raw.dtype or "float32",
            field=f"{field}.raw",
            max_pixels=max_pixels,
            channels=channels,
        )
    if kind == "ref":
        if store is None:
            raise InvalidArgument.for_field(f"{field}.ref", "store references are not accepted")
        key = readable_key(image.ref.key, f"{field}.ref.key")  # before any store call
        visible = store.exists(key) if viewer is None else sees_object(store, key, viewer)
        if not visible:
            raise InvalidArgument.for_field(f"{field}.ref.key", f"no stored object {key!r}")
        data = store.get_bytes(key)
        return imdecode.decode_image(
            data, field=f"{field}.ref", max_pixels=max_pixels, channels=channels
        )
    data = image.encoded if kind == "encoded" else image.dicom
    return imdecode.decode_image(
        data, field=f"{field}.{kind}", max_pixels=max_pixels, channels=channels
    )


def pacs_item(item: OutboxItem) -> common_pb2.PacsOutboxItem:
    msg = common_pb2.PacsOutboxItem(
        destination=item.destination,
        sop_instance_uid=item.sop_instance_uid,
        study_instance_uid=item.study_instance_uid,
        series_instance_uid=item.series_instance_uid,
        request_id=item.request_id,
        status=item.status,
        attempts=item.attempts,
        last_error=item.last_error,
        origin=item.origin,
    )
    msg.enqueued_at.CopyFrom(timestamp(item.enqueued_at))
    if item.delivered_at:
        msg.delivered_at.CopyFrom(timestamp(item.delivered_at))
    if item.status == "pending":
        msg.next_attempt_at.CopyFrom(timestamp(item.next_attempt_at))
    return msg


def domain_check(check: DomainCheck | None) -> common_pb2.DomainCheck | None:
    """The out-of-domain guard's verdict on one input (None: the request had no guard)."""
    if check is None:
        return None
    msg = common_pb2.DomainCheck(
        decision=check.decision,
        threshold=check.threshold,
        policy=check.policy,
        index_digest=check.index_digest,
        extractor=check.extractor,
    )
    if check.score is not None:
        msg.score = check.score
    return msg


def answer_list_pacs_outbox(
    outbox: Outbox | None, request: common_pb2.ListPacsOutboxRequest
) -> common_pb2.ListPacsOutboxResponse:
    """ListPacsOutbox of every servicer that sends to PACS: validate, list, translate."""
    if request.status and request.status not in OUTBOX_STATUSES:
        raise InvalidArgument.for_field("status", f"one of {OUTBOX_STATUSES} or empty")
    if not 0 <= request.limit <= 1000:
        raise InvalidArgument.for_field("limit", f"must be 0..1000, got {request.limit}")
    if outbox is None:
        return common_pb2.ListPacsOutboxResponse()
    items = outbox.list(status=request.status, destination=request.destination)
    return common_pb2.ListPacsOutboxResponse(
        items=[pacs_item(i) for i in items[-(request.limit or 100) :]],
        destinations=sorted(outbox.destinations),
    )
