"""GeneratorService servicer: proto ↔ domain only; the work is in :mod:`.service`."""

from __future__ import annotations

from collections.abc import Iterator

from clinisynth.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from clinisynth_server import protoconv
from clinisynth_server.catalog import Catalog
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.generator import service as svc
from clinisynth_server.generator.options import GenerateOptions, RewardFilter
from clinisynth_server.pacs.outbox import Outbox
from clinisynth_server.runtime.auth import principal_of
from clinisynth_server.runtime.streaming import cancel_token, stream_events
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.tenancy import viewer_of


def options_from(req: generator_pb2.GenerateRequest) -> GenerateOptions:
    if req.format not in protoconv.FORMAT_NAMES:
        raise InvalidArgument.for_field("format", f"unknown image format {req.format}")
    rf = req.reward_filter
    return GenerateOptions(
        model=req.model.name,
        version=req.model.version,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        class_name=req.class_name,
        num_images=req.num_images,
        width=req.width,
        height=req.height,
        steps=req.steps,
        guidance_scale=req.guidance_scale if req.HasField("guidance_scale") else None,
        sampler=req.sampler,
        seed=req.seed if req.HasField("seed") else None,
        eta=req.eta,
        format=protoconv.FORMAT_NAMES[req.format],
        modality=req.dicom.modality,
        patient_id=req.dicom.patient_id,
        series_description=req.dicom.series_description,
        store_outputs=req.store_outputs,
        output_prefix=req.output_prefix,
        preview_every=req.preview_every,
        reward=RewardFilter(
            reward_model=rf.reward_model.name,
            reward_version=rf.reward_model.version,
            min_reward=rf.min_reward,
            best_of_n=rf.best_of_n,
            max_candidates=rf.max_candidates,
        ),
        request_id=req.request_id,
        to_pacs=req.to_pacs,
        memorization=req.memorization,
    )


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(
        self,
        generator: svc.Generator,
        catalog: Catalog,
        store: ArtifactStore,
        outbox: Outbox | None = None,
    ) -> None:
        self.outbox = outbox
        self.generator = generator
        self.catalog = catalog
        self.store = store

    def _image(self, image: svc.GeneratedImage, *, inline: bool) -> generator_pb2.GeneratedImage:
        msg = generator_pb2.GeneratedImage(
            index=image.index, provenance=protoconv.provenance(image.provenance)
        )
        if image.reward is not None:
            msg.reward = image.reward
        verdict = image.memorization
        if verdict is not None:
            msg.memorization.decision = verdict.decision
            msg.memorization.tries = verdict.tries
            msg.memorization.index_digest = verdict.index_digest
            msg.memorization.extractor = verdict.extractor
            if verdict.check is not None:
                msg.memorization.distance = verdict.check.distance
                msg.memorization.threshold = verdict.check.threshold
        if image.stored is not None:
            h, w = image.pixels.shape[:2]
            msg.image.CopyFrom(
                common_pb2.Image(
                    ref=protoconv.artifact_ref(image.stored, self.store),
                    width=w,
                    height=h,
                    channels=1 if image.pixels.ndim == 2 else image.pixels.shape[2],
                    format=protoconv.FORMAT_VALUES[image.format],
                )
            )
        elif inline:
            msg.image.CopyFrom(protoconv.encoded_image(image.pixels, image.data, image.format))
        return msg

    def Generate(self, request, context):
        opts = options_from(request)
        token = cancel_token(context)
        viewer = viewer_of(principal_of(context))
        result = self.generator.generate(
            opts, cancel=token, tenant=viewer.tenant, admin=viewer.admin
        )
        self.generator.store_if_too_large(opts, result, viewer.tenant)
        resp = generator_pb2.GenerateResponse(
            images=[self._image(i, inline=True) for i in result.images],
            request_id=result.request_id,
            candidates=result.candidates,
            pacs=[protoconv.pacs_item(i) for i in result.pacs],
        )
        if result.provenance_ref is not None:
            resp.provenance_ref.CopyFrom(protoconv.artifact_ref(result.provenance_ref, self.store))
        return resp

    def GenerateStream(self, request, context) -> Iterator[generator_pb2.GenerateEvent]:
        opts = options_from(request)
        token = cancel_token(context)
        viewer = viewer_of(principal_of(context))
        for kind, item in stream_events(
            lambda sink: self.generator.generate(
                opts, cancel=token, sink=sink, tenant=viewer.tenant, admin=viewer.admin
            ),
            token,
        ):
            if kind == "result":
                done = generator_pb2.GenerateResponse(
                    request_id=item.request_id,
                    candidates=item.candidates,
                    pacs=[protoconv.pacs_item(i) for i in item.pacs],
                )
                if item.provenance_ref is not None:
                    done.provenance_ref.CopyFrom(
                        protoconv.artifact_ref(item.provenance_ref, self.store)
                    )
                yield generator_pb2.GenerateEvent(done=done)
            elif isinstance(item, svc.Progress):
                yield generator_pb2.GenerateEvent(
                    progress=common_pb2.Progress(
                        stage=item.stage,
                        step=item.step,
                        total_steps=item.total,
                        fraction=item.step / max(item.total, 1),
                    )
                )
            elif isinstance(item, svc.Preview):
                yield generator_pb2.GenerateEvent(
                    preview=generator_pb2.Preview(step=item.step, index=item.index, png=item.png)
                )
            elif isinstance(item, svc.GeneratedImage):
                yield from self._stream_image(item)

    def _stream_image(self, image: svc.GeneratedImage) -> Iterator[generator_pb2.GenerateEvent]:
        chunks = svc.stream_chunks(image)
        if chunks:
            for offset, data, last in chunks:
                yield generator_pb2.GenerateEvent(
                    chunk=common_pb2.ImageChunk(
                        image_index=image.index,
                        offset=offset,
                        data=data,
                        last=last,
                        format=protoconv.FORMAT_VALUES[image.format],
                    )
                )
            yield generator_pb2.GenerateEvent(image=self._image(image, inline=False))
        else:
            yield generator_pb2.GenerateEvent(image=self._image(image, inline=True))

    def ListModels(self, request, context):
        kind = protoconv.PROTO_TO_KIND.get(request.kind, "")
        if request.kind and not kind:
            raise InvalidArgument.for_field("kind", f"unknown model kind {request.kind}")
        return protoconv.answer_list_models(
            self.catalog, request, kind=kind, viewer=viewer_of(principal_of(context))
        )

    def ListPacsOutbox(self, request, context):
        return protoconv.answer_list_pacs_outbox(self.outbox, request)
