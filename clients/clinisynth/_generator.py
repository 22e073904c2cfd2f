"""Generator RPCs: declarations, request building and result parsing (see ``_rpc``)."""

from __future__ import annotations

from clinisynth import _images
from clinisynth._rpc import ProgressCallback, Rpc, model_ref
from clinisynth._types import (
    KIND_VALUES,
    GeneratedImage,
    GenerationResult,
    ModelInfo,
    PacsItem,
    ProgressEvent,
    provenance_dict,
)
from clinisynth.v1 import common_pb2, generator_pb2, generator_pb2_grpc

STUB = generator_pb2_grpc.GeneratorServiceStub
SERVICE = "generator"


def _seeded(req: generator_pb2.GenerateRequest) -> bool:
    return req.HasField("seed")  # same seed, same images: repeating it is safe


#: The memorization gate's policies (the server's default, "" here, is "regenerate").
MEMORIZATION_POLICIES = ("off", "flag", "regenerate", "refuse")

LIST_MODELS = Rpc(SERVICE, STUB, "ListModels", idempotent=True)
GENERATE = Rpc(SERVICE, STUB, "Generate", idempotent=_seeded)
GENERATE_STREAM = Rpc(SERVICE, STUB, "GenerateStream", streaming="server")
LIST_PACS_OUTBOX = Rpc(SERVICE, STUB, "ListPacsOutbox", idempotent=True)


def list_models_request(
    kind: str | None, name: str | None, all_versions: bool, page_token: str = ""
) -> common_pb2.ListModelsRequest:
    if kind is not None and kind not in KIND_VALUES:
        raise ValueError(f"kind must be one of {sorted(KIND_VALUES)}, not {kind!r}")
    return common_pb2.ListModelsRequest(
        kind=KIND_VALUES.get(kind or "", common_pb2.MODEL_KIND_UNSPECIFIED),
        name=name or "",
        all_versions=all_versions,
        page_size=1000,
        page_token=page_token,
    )


def generate_request(
    model: str,
    *,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    class_name: str | None = None,
    n: int = 1,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int | None = None,
    eta: float = 0.0,
    format: str = "png",
    store: bool = False,
    output_prefix: str | None = None,
    min_reward: float | None = None,
    best_of_n: int | None = None,
    reward_model: str | None = None,
    preview_every: int = 0,
    modality: str | None = None,
    request_id: str | None = None,
    to_pacs: str | None = None,
    memorization: str | None = None,
) -> generator_pb2.GenerateRequest:
    if format not in _images.FORMATS:
        raise ValueError(f"format must be one of {sorted(_images.FORMATS)}, not {format!r}")
    if memorization and memorization not in MEMORIZATION_POLICIES:
        raise ValueError(
            f"memorization must be one of {MEMORIZATION_POLICIES}, not {memorization!r}"
        )
    req = generator_pb2.GenerateRequest(
        model=model_ref(model),
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        class_name=class_name or "",
        num_images=n,
        width=width or 0,
        height=height or 0,
        steps=steps or 0,
        sampler=sampler or "",
        eta=eta,
        format=_images.FORMATS[format],
        store_outputs=store,
        output_prefix=output_prefix or "",
        preview_every=preview_every,
        request_id=request_id or "",
        to_pacs=to_pacs or "",
        memorization=memorization or "",
    )
    if guidance_scale is not None:
        req.guidance_scale = guidance_scale
    if seed is not None:
        req.seed = seed
    if modality:
        req.dicom.modality = modality
    if min_reward is not None or best_of_n is not None or reward_model is not None:
        req.reward_filter.min_reward = min_reward or 0.0
        req.reward_filter.best_of_n = best_of_n or 0
        if reward_model:
            req.reward_filter.reward_model.CopyFrom(model_ref(reward_model))
    return req


_FORMAT_NAMES = {v: k for k, v in _images.FORMATS.items()}


def generated_image(msg: generator_pb2.GeneratedImage, data: bytes | None = None) -> GeneratedImage:
    encoded, array = _images.decode_image(msg.image)
    ref = None
    if msg.image.WhichOneof("data") == "ref":
        r = msg.image.ref
        ref = {
            "key": r.key,
            "uri": r.uri,
            "sha256": r.sha256,
            "size_bytes": r.size_bytes,
            "presigned_url": r.presigned_url,
        }
    mem = msg.memorization
    return GeneratedImage(
        index=msg.index,
        data=data if data is not None else encoded,
        array=array,
        format=_FORMAT_NAMES.get(msg.image.format, "png"),
        provenance=provenance_dict(msg.provenance),
        reward=msg.reward if msg.HasField("reward") else None,
        ref=ref,
        width=msg.image.width,
        height=msg.image.height,
        memorization=mem.decision,
        memorization_distance=mem.distance if mem.HasField("distance") else None,
        memorization_threshold=mem.threshold if mem.HasField("distance") else None,
    )


def generation_result(resp: generator_pb2.GenerateResponse) -> GenerationResult:
    ref = None
    if resp.HasField("provenance_ref"):
        ref = {"key": resp.provenance_ref.key, "uri": resp.provenance_ref.uri}
    return GenerationResult(
        images=[generated_image(m) for m in resp.images],
        request_id=resp.request_id,
        candidates=resp.candidates,
        provenance_ref=ref,
        pacs=[PacsItem.from_proto(m) for m in resp.pacs],
    )


class StreamAssembler:
    """Folds GenerateEvents into a result, reassembling chunked images, reporting progress."""

    def __init__(self, on_progress: ProgressCallback | None) -> None:
        self.on_progress = on_progress
        self.chunks: dict[int, bytearray] = {}
        self.images: dict[int, GeneratedImage] = {}
        self.result: GenerationResult | None = None

    def feed(self, event: generator_pb2.GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "progress" and self.on_progress:
            p = event.progress
            self.on_progress(ProgressEvent(p.stage, p.step, p.total_steps, p.fraction, p.message))
        elif kind == "preview" and self.on_progress:
            pv = event.preview
            self.on_progress(ProgressEvent("preview", pv.step, 0, 0.0, "", preview_png=pv.png))
        elif kind == "chunk":
            self.chunks.setdefault(event.chunk.image_index, bytearray()).extend(event.chunk.data)
        elif kind == "image":
            data = self.chunks.pop(event.image.index, None)
            self.images[event.image.index] = generated_image(
                event.image, bytes(data) if data is not None else None
            )
        elif kind == "done":
            done = event.done
            self.result = GenerationResult(
                images=[self.images[i] for i in sorted(self.images)],
                request_id=done.request_id,
                candidates=done.candidates,
                pacs=[PacsItem.from_proto(m) for m in done.pacs],
            )

    def finish(self) -> GenerationResult:
        if self.result is None:
            raise RuntimeError("the generate stream ended without a result")
        return self.result


def pacs_outbox_request(
    status: str | None, destination: str | None, limit: int
) -> common_pb2.ListPacsOutboxRequest:
    return common_pb2.ListPacsOutboxRequest(
        status=status or "", destination=destination or "", limit=limit
    )


def pacs_items(resp: common_pb2.ListPacsOutboxResponse) -> list[PacsItem]:
    return [PacsItem.from_proto(m) for m in resp.items]


def model_infos(responses: list[common_pb2.ListModelsResponse]) -> list[ModelInfo]:
    return [ModelInfo.from_proto(m) for resp in responses for m in resp.models]
