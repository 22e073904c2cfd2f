"""RewardService servicer: proto ↔ domain only; the work is in :mod:`.service`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from clinisynth.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from clinisynth_server import protoconv
from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.pacs.fetch import PacsRef
from clinisynth_server.reward import service as svc
from clinisynth_server.reward.feedback import FeedbackRecord
from clinisynth_server.reward.images import ImageInput
from clinisynth_server.reward.scoring import Condition
from clinisynth_server.runtime.auth import principal_of
from clinisynth_server.runtime.roles import bind_rater
from clinisynth_server.runtime.streaming import cancel_token, stream_events
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.tenancy import Viewer, viewer_of


def condition_from(msg: common_pb2.Condition) -> Condition | None:
    kind = msg.WhichOneof("value")
    if kind == "class_name":
        return Condition(class_name=msg.class_name)
    if kind == "prompt":
        return Condition(prompt=msg.prompt)
    return None


def condition_msg(cond: Condition) -> common_pb2.Condition:
    if cond.class_name:
        return common_pb2.Condition(class_name=cond.class_name)
    return common_pb2.Condition(prompt=cond.prompt)


def image_from(msg: common_pb2.Image, viewer: Viewer | None = None) -> ImageInput:
    """The request image; a store reference is read as ``viewer`` (its tenant's objects)."""
    kind = msg.WhichOneof("data")
    if kind == "encoded":
        return ImageInput("encoded", data=msg.encoded)
    if kind == "dicom":
        return ImageInput("dicom", data=msg.dicom)
    if kind == "raw":
        return ImageInput("raw", data=msg.raw.data, shape=tuple(msg.raw.shape), dtype=msg.raw.dtype)
    if kind == "ref":
        return ImageInput("ref", key=msg.ref.key, viewer=viewer)
    if kind == "pacs":
        p = msg.pacs
        return svc.PacsImage("pacs", ref=PacsRef(p.pacs, p.study_uid, p.series_uid, p.sop_uid))
    return ImageInput("none")


def model_ref(record: ModelRecord) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=record.name, version=str(record.version))


def generator_text(ref: common_pb2.ModelRef) -> str:
    return f"{ref.name}@{ref.version}" if ref.name and ref.version else ref.name


def _ref(key: str, sha: str, size: int, store: ArtifactStore) -> common_pb2.ArtifactRef:
    return common_pb2.ArtifactRef(
        key=key,
        uri=store.uri(key),
        sha256=sha,
        size_bytes=size,
        presigned_url=store.presign_get(key) or "",
    )


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, reward: svc.Reward, catalog: Catalog, store: ArtifactStore) -> None:
        self.reward = reward
        self.catalog = catalog
        self.store = store

    # -- messages -----------------------------------------------------------------------------
    def _score_msg(self, s: svc.ImageScore) -> reward_pb2.ImageScore:
        return reward_pb2.ImageScore(
            index=s.index,
            reward=s.p_aligned,
            p_aligned=s.p_aligned,
            model=model_ref(s.model),
            name=s.name,
            domain=protoconv.domain_check(s.domain),
        )

    def _feedback_msg(self, r: FeedbackRecord) -> reward_pb2.Feedback:
        name, _, version = r.generator.partition("@")
        return reward_pb2.Feedback(
            id=r.id,
            client_request_id=r.client_request_id,
            rater_id=r.rater_id,
            item_id=r.item_id,
            condition=condition_msg(r.condition),
            plausible=r.plausible,
            criteria=[
                reward_pb2.CriterionAnswer(criterion=k, satisfied=v) for k, v in r.criteria.items()
            ],
            comment=r.comment,
            time_spent_ms=r.time_spent_ms,
            generator=common_pb2.ModelRef(name=name, version=version),
            created=protoconv.timestamp(r.created),
            image_ref=_ref(r.image_key, r.image_sha256, r.image_size, self.store),
        )

    def _item_msg(self, q: svc.QueuedItem) -> reward_pb2.ReviewItem:
        it = q.item
        name, _, version = it.generator.partition("@")
        msg = reward_pb2.ReviewItem(
            id=it.id,
            condition=condition_msg(it.condition),
            image_ref=_ref(it.image_key, it.image_sha256, it.image_size, self.store),
            raters_per_item=it.raters_per_item,
            judgements=q.judgements,
            generator=common_pb2.ModelRef(name=name, version=version),
        )
        if q.p_aligned is not None:
            msg.p_aligned = q.p_aligned
        return msg

    # -- scoring ------------------------------------------------------------------------------
    def Score(self, request, context):
        viewer = viewer_of(principal_of(context))
        opts = svc.ScoreOptions(
            images=[image_from(m, viewer) for m in request.images],
            model=request.model.name,
            version=request.model.version,
            condition=condition_from(request.condition),
            conditions=[condition_from(c) or Condition() for c in request.conditions],
            generator=generator_text(request.generator),
            resize=request.resize,
            viewer=viewer,
            domain_guard=request.domain_guard,
        )
        result = self.reward.score(opts, cancel=cancel_token(context))
        return reward_pb2.ScoreResponse(
            scores=[self._score_msg(s) for s in result.scores], model=model_ref(result.model)
        )

    def ScoreStream(self, request_iterator, context) -> Iterator[reward_pb2.ScoreStreamEvent]:
        token = cancel_token(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("item") != "config":
            raise InvalidArgument.for_field("config", "the first message must carry the config")
        c = first.config
        viewer = viewer_of(principal_of(context))
        config = svc.StreamConfig(
            model=c.model.name,
            version=c.model.version,
            condition=condition_from(c.condition),
            store_prefix=c.store_prefix,
            generator=generator_text(c.generator),
            resize=c.resize,
            batch_size=c.batch_size,
            viewer=viewer,
            domain_guard=c.domain_guard,
        )
        total = 0
        if config.store_prefix:
            listed = self.reward.stream_images_under(config.store_prefix, config.condition, viewer)
            total = len(listed)
            images: Iterator[svc.StreamImage] = iter(listed)
        else:
            images = self._stream_images(request_iterator, viewer)

        def work(sink: Callable[[Any], None]) -> svc.StreamSummary:
            return self.reward.score_stream(config, images, total=total, emit=sink, cancel=token)

        for kind, item in stream_events(work, token):
            if kind == "result":
                done = reward_pb2.ScoreSummary(scored=item.scored, mean_reward=item.mean_reward)
                if item.model is not None:
                    done.model.CopyFrom(model_ref(item.model))
                yield reward_pb2.ScoreStreamEvent(done=done)
            elif isinstance(item, svc.ImageScore):
                yield reward_pb2.ScoreStreamEvent(score=self._score_msg(item))
            elif isinstance(item, svc.StreamProgress):
                yield reward_pb2.ScoreStreamEvent(
                    progress=common_pb2.Progress(
                        stage="score",
                        step=item.scored,
                        total_steps=item.total,
                        fraction=item.scored / item.total if item.total else 0.0,
                    )
                )

    @staticmethod
    def _stream_images(
        requests: Iterable[reward_pb2.ScoreStreamRequest], viewer: Viewer | None = None
    ) -> Iterator[svc.StreamImage]:
        for i, req in enumerate(requests):
            if req.WhichOneof("item") != "image":
                raise InvalidArgument.for_field(f"images[{i}]", "only the first message is config")
            m = req.image
            yield svc.StreamImage(m.name, image_from(m.image, viewer), condition_from(m.condition))

    # -- feedback -----------------------------------------------------------------------------
    def SubmitFeedback(self, request, context):
        f = request.feedback
        viewer = viewer_of(principal_of(context))
        draft = svc.FeedbackDraft(
            client_request_id=f.client_request_id,
            rater_id=bind_rater(principal_of(context), f.rater_id, "feedback.rater_id"),
            plausible=f.plausible,
            item_id=f.item_id,
            image=image_from(f.image, viewer) if f.HasField("image") else None,
            condition=condition_from(f.condition),
            criteria=[(a.criterion, a.satisfied) for a in f.criteria],
            comment=f.comment,
            time_spent_ms=f.time_spent_ms,
            generator=generator_text(f.generator),
            tenant=viewer.tenant,
            admin=viewer.admin,
        )
        record, duplicate = self.reward.submit(draft)
        return reward_pb2.SubmitFeedbackResponse(
            feedback=self._feedback_msg(record), duplicate=duplicate
        )

    def ListFeedback(self, request, context):
        rows, token, total = self.reward.list_feedback(
            condition=condition_from(request.condition),
            rater_id=request.rater_id,
            page_size=request.page_size,
            page_token=request.page_token,
            viewer=viewer_of(principal_of(context)),
        )
        return reward_pb2.ListFeedbackResponse(
            feedback=[self._feedback_msg(r) for r in rows], next_page_token=token, total=total
        )

    def ExportFeedback(self, request, context):
        viewer = viewer_of(principal_of(context))
        res = self.reward.export(
            prefix=request.prefix,
            condition=condition_from(request.condition),
            aggregate=request.aggregate,
            tenant=viewer.tenant,
            admin=viewer.admin,
        )
        return reward_pb2.ExportFeedbackResponse(
            prefix=res.prefix,
            judgements=res.judgements,
            images=res.images,
            labels=_ref(res.labels_key, res.labels_sha256, res.labels_size, self.store),
        )

    def DownloadExport(self, request, context) -> Iterator[reward_pb2.ExportFileChunk]:
        viewer = viewer_of(principal_of(context))
        chunks = self.reward.export_chunks(
            request.prefix, cancel=cancel_token(context), viewer=viewer
        )
        for c in chunks:
            yield reward_pb2.ExportFileChunk(
                path=c.path, offset=c.offset, data=c.data, last=c.last, sha256=c.sha256
            )

    # -- review ---------------------------------------------------------------------------------
    def EnqueueReview(self, request, context):
        viewer = viewer_of(principal_of(context))
        items = self.reward.enqueue(
            [
                svc.EnqueueImage(m.name, image_from(m.image, viewer), condition_from(m.condition))
                for m in request.images
            ],
            condition=condition_from(request.condition),
            raters_per_item=request.raters_per_item,
            generator=generator_text(request.generator),
            tenant=viewer.tenant,
            admin=viewer.admin,
        )
        return reward_pb2.EnqueueReviewResponse(items=[self._item_msg(q) for q in items])

    def NextReviewItems(self, request, context):
        items, pending = self.reward.next_items(
            bind_rater(principal_of(context), request.rater_id, "rater_id"),
            condition=condition_from(request.condition),
            limit=request.limit,
            viewer=viewer_of(principal_of(context)),
        )
        return reward_pb2.NextReviewItemsResponse(
            items=[self._item_msg(q) for q in items], pending=pending
        )

    def GetChecklist(self, request, context):
        cond = condition_from(request.condition)
        criteria = self.reward.checklist(cond)
        assert cond is not None
        return reward_pb2.Checklist(
            condition=condition_msg(cond),
            criteria=[
                reward_pb2.Criterion(name=c.name, description=c.description) for c in criteria
            ],
        )

    def GetAgreement(self, request, context):
        report = self.reward.agreement(
            condition_from(request.condition), viewer_of(principal_of(context))
        )
        return reward_pb2.GetAgreementResponse(
            conditions=[
                reward_pb2.ConditionAgreement(
                    condition=condition_msg(ca.condition),
                    shared_items=ca.agreement.shared_items,
                    raters=ca.agreement.raters,
                    kappa=ca.agreement.kappa,
                    statistic=ca.agreement.statistic,
                    percent_agreement=ca.agreement.percent_agreement,
                )
                for ca in report.conditions
            ],
            raters=[
                reward_pb2.RaterStats(
                    rater_id=r.rater_id,
                    judgements=r.judgements,
                    plausible_rate=r.plausible_rate,
                    agreement_with_majority=r.agreement_with_majority,
                    median_time_spent_ms=r.median_time_spent_ms,
                )
                for r in report.raters
            ],
        )

    def ListModels(self, request, context):
        return protoconv.answer_list_models(
            self.catalog, request, kind="reward", viewer=viewer_of(principal_of(context))
        )
