"""CounterfactualService servicer: proto ↔ domain only; the work is in :mod:`.service`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from clinisynth.v1 import common_pb2, counterfactual_pb2, counterfactual_pb2_grpc
from clinisynth_server import protoconv
from clinisynth_server.catalog import Catalog
from clinisynth_server.counterfactual import service as svc
from clinisynth_server.counterfactual.options import CounterfactualOptions
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.imaging import decode as imdecode
from clinisynth_server.imaging.deid import safe_log_repr
from clinisynth_server.pacs.fetch import PacsRef
from clinisynth_server.runtime.auth import principal_of
from clinisynth_server.runtime.streaming import cancel_token, stream_events
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.tenancy import Viewer, viewer_of

MODES = {
    counterfactual_pb2.GUIDANCE_MODE_UNSPECIFIED: "cone",
    counterfactual_pb2.GUIDANCE_MODE_CONE: "cone",
    counterfactual_pb2.GUIDANCE_MODE_ROBUST_ONLY: "robust_only",
    counterfactual_pb2.GUIDANCE_MODE_PLAIN_ONLY: "plain_only",
}
DISTANCES = {
    counterfactual_pb2.DISTANCE_KIND_UNSPECIFIED: "l2",
    counterfactual_pb2.DISTANCE_KIND_L2: "l2",
    counterfactual_pb2.DISTANCE_KIND_L1: "l1",
}
KINDS = ("unconditional", "classifier")


def options_from(
    req: counterfactual_pb2.CounterfactualRequest, prefix: str = ""
) -> CounterfactualOptions:
    """Domain options; enum values outside the contract are INVALID_ARGUMENT on their field."""
    if req.mode not in MODES:
        raise InvalidArgument.for_field(f"{prefix}mode", f"unknown guidance mode {req.mode}")
    if req.distance not in DISTANCES:
        raise InvalidArgument.for_field(f"{prefix}distance", f"unknown distance {req.distance}")
    if req.format not in protoconv.FORMAT_NAMES:
        raise InvalidArgument.for_field(f"{prefix}format", f"unknown image format {req.format}")
    return CounterfactualOptions(
        target_class=req.target_class,
        diffusion_model=req.diffusion_model.name,
        diffusion_version=req.diffusion_model.version,
        robust_classifier=req.robust_classifier.name,
        robust_version=req.robust_classifier.version,
        plain_classifier=req.plain_classifier.name,
        plain_version=req.plain_classifier.version,
        start_depth=req.start_depth if req.HasField("start_depth") else None,
        steps=req.steps,
        lambda_c=req.lambda_c if req.HasField("lambda_c") else None,
        cone_angle_deg=req.cone_angle_deg if req.HasField("cone_angle_deg") else None,
        distance=DISTANCES[req.distance],
        lambda_d=req.lambda_d if req.HasField("lambda_d") else None,
        seed=req.seed if req.HasField("seed") else None,
        mode=MODES[req.mode],
        resize=req.resize,
        format=protoconv.FORMAT_NAMES[req.format],
        store_outputs=req.store_outputs,
        request_id=req.request_id,
        to_pacs=req.to_pacs,
        domain_guard=req.domain_guard,
    )


def _raw(array: np.ndarray, fmt: int = common_pb2.IMAGE_FORMAT_RAW) -> common_pb2.Image:
    return protoconv.encoded_image(array, b"", "raw")


class CounterfactualServicer(counterfactual_pb2_grpc.CounterfactualServiceServicer):
    def __init__(
        self, counterfactuals: svc.Counterfactuals, catalog: Catalog, store: ArtifactStore
    ) -> None:
        self.cf = counterfactuals
        self.catalog = catalog
        self.store = store

    # -- mapping ------------------------------------------------------------------------------
    def _input(
        self,
        req: counterfactual_pb2.CounterfactualRequest,
        timeout_s: float | None = None,
        viewer: Viewer | None = None,
    ) -> tuple[np.ndarray, str, Mapping[str, str]]:
        kind = req.image.WhichOneof("data")
        image = req.image
        description = f"<{kind or 'none'}>"
        facts: Mapping[str, str] = {}
        if kind == "pacs":
            p = req.image.pacs
            fetched = self.cf.fetch_input(
                PacsRef(p.pacs, p.study_uid, p.series_uid, p.sop_uid),
                field="image.pacs",
                timeout_s=timeout_s,
            )
            description = safe_log_repr(fetched.data)
            facts = fetched.provenance()
            # decoded like an uploaded DICOM, its problems named on the field the caller set
            return imdecode.decode_image(fetched.data, field="image.pacs"), description, facts
        elif kind in ("encoded", "dicom"):
            clean = svc.admit_input(getattr(req.image, kind), field=f"image.{kind}")
            description = safe_log_repr(clean)
            image = common_pb2.Image()
            image.CopyFrom(req.image)
            setattr(image, kind, clean)
        pixels = protoconv.decode_input_image(
            image, field="image", store=self.store, viewer=viewer or Viewer()
        )
        return pixels, description, facts

    def _response(
        self, out: svc.CounterfactualOutcome
    ) -> counterfactual_pb2.CounterfactualResponse:
        if "counterfactual" in out.stored:
            info = out.stored["counterfactual"]
            h, w = out.image.shape[:2]
            image = common_pb2.Image(
                ref=protoconv.artifact_ref(info, self.store),
                width=w,
                height=h,
                channels=1 if out.image.ndim == 2 else out.image.shape[2],
                format=protoconv.FORMAT_VALUES[out.format],
            )
        else:
            image = protoconv.encoded_image(out.image, out.data, out.format)
        h, w = out.image.shape[:2]
        return counterfactual_pb2.CounterfactualResponse(
            counterfactual=image,
            difference=_raw(out.difference),
            overlay=common_pb2.Image(
                encoded=out.overlay_png,
                width=w,
                height=h,
                channels=3,
                format=common_pb2.IMAGE_FORMAT_PNG,
            ),
            p_target_before_robust=out.p_before_robust,
            p_target_after_robust=out.p_after_robust,
            p_target_before_plain=out.p_before_plain,
            p_target_after_plain=out.p_after_plain,
            trajectory=[_point(p) for p in out.trajectory],
            distance=out.distance,
            target_class=out.target_class,
            provenance=protoconv.provenance(out.provenance),
            already_target=out.already_target,
            flipped=out.flipped,
            pacs=[protoconv.pacs_item(i) for i in out.pacs],
            domain=protoconv.domain_check(out.domain),
        )

    # -- RPCs ---------------------------------------------------------------------------------
    def CreateCounterfactual(self, request, context):
        opts = options_from(request)
        token = cancel_token(context)
        viewer = viewer_of(principal_of(context))
        pixels, description, facts = self._input(request, token.remaining(), viewer)
        out = self.cf.counterfactual(
            pixels,
            opts,
            cancel=token,
            source_repr=description,
            source_facts=facts,
            tenant=viewer.tenant,
            admin=viewer.admin,
        )
        return self._response(out)

    def CounterfactualStream(
        self, request, context
    ) -> Iterator[counterfactual_pb2.CounterfactualEvent]:
        opts = options_from(request)
        token = cancel_token(context)
        viewer = viewer_of(principal_of(context))
        pixels, description, facts = self._input(request, token.remaining(), viewer)
        for kind, item in stream_events(
            lambda sink: self.cf.counterfactual(
                pixels,
                opts,
                cancel=token,
                sink=sink,
                source_repr=description,
                source_facts=facts,
                tenant=viewer.tenant,
                admin=viewer.admin,
            ),
            token,
        ):
            if kind == "result":
                yield counterfactual_pb2.CounterfactualEvent(done=self._response(item))
            elif isinstance(item, svc.TrajectoryPoint):
                yield counterfactual_pb2.CounterfactualEvent(point=_point(item))
            elif isinstance(item, svc.Progress):
                yield counterfactual_pb2.CounterfactualEvent(progress=_progress(item))

    def CounterfactualBatch(
        self, request, context
    ) -> Iterator[counterfactual_pb2.CounterfactualBatchEvent]:
        opts = options_from(request.options, prefix="options.")
        if request.limit < 0:
            raise InvalidArgument.for_field("limit", f"must be >= 0, got {request.limit}")
        if opts.to_pacs:
            raise InvalidArgument.for_field(
                "options.to_pacs", "batches write to the store; send single requests to a PACS"
            )
        token = cancel_token(context)
        viewer = viewer_of(principal_of(context))
        for kind, item in stream_events(
            lambda sink: self.cf.batch(
                request.input_prefix,
                opts,
                output_prefix=request.output_prefix,
                limit=request.limit,
                cancel=token,
                sink=sink,
                tenant=viewer.tenant,
                admin=viewer.admin,
            ),
            token,
        ):
            if kind == "result":
                done = counterfactual_pb2.CounterfactualBatchSummary(
                    images=item.images,
                    failed=item.failed,
                    flip_rate=item.flip_rate,
                    mean_distance=item.mean_distance,
                    already_target=item.already_target,
                )
                if item.summary is not None:
                    done.summary.CopyFrom(protoconv.artifact_ref(item.summary, self.store))
                yield counterfactual_pb2.CounterfactualBatchEvent(done=done)
            elif isinstance(item, svc.BatchItem):
                msg = counterfactual_pb2.CounterfactualBatchItem(
                    input_key=item.input_key,
                    p_target_before_robust=item.p_before_robust,
                    p_target_after_robust=item.p_after_robust,
                    distance=item.distance,
                    flipped=item.flipped,
                    error=item.error,
                    already_target=item.already_target,
                )
                if item.result is not None:
                    msg.result.CopyFrom(protoconv.artifact_ref(item.result, self.store))
                yield counterfactual_pb2.CounterfactualBatchEvent(item=msg)
            elif isinstance(item, svc.Progress):
                yield counterfactual_pb2.CounterfactualBatchEvent(progress=_progress(item))

    def ListModels(self, request, context):
        kind = protoconv.PROTO_TO_KIND.get(request.kind, "")
        if request.kind and kind not in KINDS:
            raise InvalidArgument.for_field(
                "kind", "this service uses unconditional denoisers and classifiers only"
            )
        return protoconv.answer_list_models(
            self.catalog, request, kind=kind, kinds=KINDS, viewer=viewer_of(principal_of(context))
        )


def _point(p: svc.TrajectoryPoint) -> counterfactual_pb2.TrajectoryPoint:
    return counterfactual_pb2.TrajectoryPoint(
        step=p.step,
        p_target_robust=p.p_robust,
        p_target_plain=p.p_plain,
        gradient_angle_deg=p.angle_deg,
    )


def _progress(p: svc.Progress) -> common_pb2.Progress:
    return common_pb2.Progress(
        stage=p.stage, step=p.step, total_steps=p.total, fraction=p.step / max(p.total, 1)
    )
