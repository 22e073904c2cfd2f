"""The reward service's facade: scoring here, the other jobs in their own modules.

Knows nothing of gRPC or HTTP: the servicer (gRPC) and the review page's JSON API (``web.py``)
both call :class:`Reward`, so a judgement made on the page and one made through the SDK are the
same record. Every reward-model forward pass runs in Triton (``scoring.Scorer``). The jobs:

- scoring (this module, with :mod:`.scoring`): Score / ScoreStream, and scoring review items;
- the feedback log (:mod:`.log`): judgements in, pages of judgements out;
- the review queue (:mod:`.queue`): items in, the next items for a rater out, in the order of a
  pluggable strategy, kept as an index updated on each write;
- export (:mod:`.export`): labels + de-identified images + manifest, and reading one back;
- agreement (:mod:`.agreement`): kappa and per-rater statistics, kept incrementally.

Stages of a Score request:
  1. validate every field up front (count, conditions, model, each image) — all errors at once;
  2. fetch images given by PACS reference (:mod:`clinisynth_server.pacs.fetch`: WADO-RS or
     C-GET, de-identified on arrival like any DICOM input; only a salted hash of the original
     UIDs is logged), then decode images to the model's channels (and size, when ``resize``);
  3. score in Triton batches; record the quality metrics (by model / generator / condition).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from clinisynth_server.cancel import NEVER, CancelToken
from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import ClinisynthError, InvalidArgument, ValidationErrors
from clinisynth_server.imaging.decode import DEFAULT_MAX_REQUEST_PIXELS, PixelBudget
from clinisynth_server.pacs.fetch import PacsReader, PacsRef
from clinisynth_server.reward import agreement as agr
from clinisynth_server.reward import images as imgs
from clinisynth_server.reward.checklists import Criterion
from clinisynth_server.reward.conditions import MAX_PROMPT_CHARS, Rules
from clinisynth_server.reward.export import (
    EXPORT_MANIFEST,
    ExportChunk,
    ExportResult,
    FeedbackExport,
)
from clinisynth_server.reward.feedback import FeedbackRecord, FeedbackStore, ReviewItem
from clinisynth_server.reward.log import (
    MAX_COMMENT_CHARS,
    MAX_REQUEST_ID_CHARS,
    FeedbackDraft,
    FeedbackLog,
)
from clinisynth_server.reward.queue import (
    MAX_ENQUEUE,
    MAX_LIMIT,
    MAX_RATERS_PER_ITEM,
    EnqueueImage,
    OrderStrategy,
    QueuedItem,
    QueueIndex,
    ReviewQueue,
    ScoreBoard,
    strategy_named,
)
from clinisynth_server.reward.scoring import (
    Condition,
    Scorer,
    check_condition,
    decode_inputs,
    fit_to_model,
    model_size,
    resolve_model,
)
from clinisynth_server.runtime.metrics import RewardMetrics
from clinisynth_server.similarity import guard
from clinisynth_server.similarity.guard import DomainCheck, DomainGuard
from clinisynth_server.store.base import ArtifactStore, dir_prefix, outside_service_namespaces
from clinisynth_server.tenancy import Viewer, sees_object
from clinisynth_server.triton.client import TritonClient

log = logging.getLogger(__name__)

MAX_SCORE_IMAGES = 256
DEFAULT_STREAM_BATCH = 64
MAX_STREAM_BATCH = 256
MAX_ACTIVE_SCORING = 256  # pending items (re)scored per NextReviewItems call
DEFAULT_REFRESH_S = 2.0  # another replica's writes show on the hot paths within about this
__all__ = [  # re-exported: callers name these as ``service.X``
    "EXPORT_MANIFEST",
    "MAX_COMMENT_CHARS",
    "MAX_ENQUEUE",
    "MAX_PROMPT_CHARS",
    "MAX_RATERS_PER_ITEM",
    "MAX_REQUEST_ID_CHARS",
    "EnqueueImage",
    "ExportChunk",
    "ExportResult",
    "FeedbackDraft",
    "QueuedItem",
    "Reward",
]


# ---------------------------------------------------------------------------------------------
# domain types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreOptions:
    images: Sequence[imgs.ImageInput]
    model: str = ""
    version: str = ""
    condition: Condition | None = None
    conditions: Sequence[Condition] = ()
    names: Sequence[str] = ()
    generator: str = ""
    resize: bool = False
    viewer: Viewer | None = None  # the caller: another tenant's private models are unknown
    domain_guard: str = ""  # "refuse" | "warn" ("" = refuse): similarity/guard.py


@dataclass(frozen=True)
class PacsImage(imgs.ImageInput):
    """An image the caller names by its PACS UIDs (``kind`` ``"pacs"``); fetched at scoring."""

    ref: PacsRef | None = None


@dataclass(frozen=True)
class ImageScore:
    index: int
    p_aligned: float
    model: ModelRecord
    name: str = ""
    domain: DomainCheck | None = None  # the out-of-domain guard's verdict


@dataclass(frozen=True)
class ScoreResult:
    model: ModelRecord
    scores: list[ImageScore]


@dataclass(frozen=True)
class StreamConfig:
    model: str = ""
    version: str = ""
    condition: Condition | None = None
    store_prefix: str = ""
    generator: str = ""
    resize: bool = False
    batch_size: int = 0
    viewer: Viewer | None = None  # the caller: another tenant's private models are unknown
    domain_guard: str = ""  # as ScoreOptions.domain_guard


@dataclass(frozen=True)
class StreamImage:
    name: str
    image: imgs.ImageInput
    condition: Condition | None = None


@dataclass(frozen=True)
class StreamProgress:
    scored: int
    total: int  # 0 = unknown (client-streamed images)


@dataclass(frozen=True)
class StreamSummary:
    scored: int
    mean_reward: float
    model: ModelRecord | None


@dataclass(frozen=True)
class ConditionAgreement:
    condition: Condition
    agreement: agr.Agreement


@dataclass(frozen=True)
class AgreementReport:
    conditions: list[ConditionAgreement]
    raters: list[agr.RaterStats]


def _not_by_pacs(image: imgs.ImageInput, field_name: str) -> None:
    """Judged and queued images are kept for raters: PACS references are for scoring only."""
    if isinstance(image, PacsImage):
        raise InvalidArgument.for_field(
            f"{field_name}.pacs",
            "PACS references are accepted by Score and ScoreStream only; send the image itself",
        )


def _parse_generator(text: str) -> tuple[str, str]:
    name, _, version = text.partition("@")
    return name, version


# ---------------------------------------------------------------------------------------------
# the service
# ---------------------------------------------------------------------------------------------


class Reward:
    def __init__(
        self,
        catalog: Catalog,
        triton: TritonClient,
        store: ArtifactStore,
        *,
        metrics: RewardMetrics | None = None,
        raters: Iterable[str] = (),
        classes: Iterable[str] = (),
        max_upload_bytes: int = 4 * 1024 * 1024,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        clock: Callable[[], float] = time.time,
        review_order: str | OrderStrategy = "",
        refresh_interval_s: float = DEFAULT_REFRESH_S,
        pacs: PacsReader | None = None,
    ) -> None:
        """``pacs``: the reader of Score inputs given by PACS reference (none configured when
        absent: every reference is then INVALID_ARGUMENT on its ``pacs`` field)."""
        self.catalog = catalog
        self.pacs = pacs or PacsReader({}, store)
        self.triton = triton
        self.store = store
        self.metrics = metrics
        self.rules = Rules(catalog, raters=raters, classes=classes)
        self.raters = self.rules.raters
        self.max_upload_bytes = max_upload_bytes
        self.max_request_pixels = max_request_pixels
        self.clock = clock
        self.refresh_interval_s = refresh_interval_s
        self.scorer = Scorer(catalog, triton)
        self.guard = DomainGuard(triton)  # inputs against the reward model's training images
        self.feedback = FeedbackStore(store)
        strategy = strategy_named(review_order) if isinstance(review_order, str) else review_order
        self.index = QueueIndex(strategy)
        self.agreements = agr.AgreementIndex()
        # The same per tenant: a tenant's agreement report counts only its own judgements.
        self._tenant_agreements: dict[str, agr.AgreementIndex] = {}
        self._conditions: dict[str, Condition] = {}  # condition key → condition, for reports
        self._lock = threading.Lock()
        self.feedback.subscribe(self._on_record, self.index.add_item)
        self.feedback.refresh()
        # item id → (model ref, p_aligned) by the current default reward model; writes re-order.
        self._active_scores = ScoreBoard(self.index)
        self.log = FeedbackLog(
            store,
            self.feedback,
            self.rules,
            metrics=metrics,
            max_upload_bytes=max_upload_bytes,
            clock=clock,
            on_written=self._update_gauges,
        )
        self.queue = ReviewQueue(
            store,
            self.feedback,
            self.index,
            check_condition=self.rules.check_condition,
            max_upload_bytes=max_upload_bytes,
            max_request_pixels=max_request_pixels,
            clock=clock,
        )
        self.exports = FeedbackExport(store, self.feedback, clock=clock)
        self._last_gauges = 0.0
        self._update_gauges(force=True)

    def _on_record(self, record: FeedbackRecord) -> None:
        self.index.add_record(record)
        with self._lock:
            self._conditions.setdefault(record.condition.key, record.condition)
        with self._lock:
            own = self._tenant_agreements.setdefault(record.tenant, agr.AgreementIndex())
        for index in (self.agreements, own):
            index.add(
                record.id,
                scope=record.condition.key,
                group=record.image_group,
                rater=record.rater_id,
                plausible=record.plausible,
                created=record.created,
                time_spent_ms=record.time_spent_ms,
            )

    # -- conditions -----------------------------------------------------------------------------
    @property
    def extra_classes(self) -> tuple[str, ...]:
        return self.rules.extra_classes

    def known_classes(self) -> set[str]:
        return self.rules.known_classes()

    def check_condition_value(
        self, condition: Condition | None, errors: ValidationErrors, field_name: str
    ) -> None:
        self.rules.check_condition(condition, errors, field_name)

    def checklist(self, condition: Condition | None) -> tuple[Criterion, ...]:
        return self.rules.checklist(condition)

    # -- scoring ------------------------------------------------------------------------------
    def score(self, opts: ScoreOptions, *, cancel: CancelToken = NEVER) -> ScoreResult:
        errors = ValidationErrors()
        n = len(opts.images)
        if not 1 <= n <= MAX_SCORE_IMAGES:
            errors.add("images", f"send 1..{MAX_SCORE_IMAGES} images, got {n} (use ScoreStream)")
        if opts.conditions and len(opts.conditions) != n:
            errors.add("conditions", f"{len(opts.conditions)} conditions for {n} images")
        policy = guard.check_policy(opts.domain_guard, "domain_guard")
        errors.raise_if_any()
        conditions = [(opts.conditions[i] if opts.conditions else opts.condition) for i in range(n)]
        record = self._resolve(opts.model, opts.version, conditions[0], opts.viewer)
        for i, cond in enumerate(conditions):
            where = f"conditions[{i}]" if opts.conditions else "condition"
            try:
                check_condition(record, cond or Condition(), where)
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
            if errors.violations and not opts.conditions:
                break
        images: Sequence[imgs.ImageInput] = opts.images
        if any(isinstance(image, PacsImage) for image in images):
            errors.raise_if_any()  # a request already refused fetches nothing
            images = self._fetch_pacs(images, errors, "images", cancel=cancel)
            errors.raise_if_any()
        pixels = self._decode_all(images, record, errors, "images", resize=opts.resize)
        errors.raise_if_any()
        cancel.check()
        domain = self.guard.check(
            record,
            pixels,
            policy=policy,
            fields=[f"images[{i}]" for i in range(n)],
            timeout_s=cancel.remaining(),
        )
        p = self.scorer.score(
            record,
            pixels,
            [c for c in conditions if c is not None],
            timeout_s=cancel.remaining(),
        )
        self._observe(record, p, conditions, opts.generator)
        names = list(opts.names) + [""] * (n - len(opts.names))
        return ScoreResult(
            record,
            [ImageScore(i, float(p[i]), record, names[i], domain[i]) for i in range(n)],
        )

    def _fetch_pacs(
        self,
        images: Sequence[imgs.ImageInput],
        errors: ValidationErrors,
        field_name: str,
        offset: int = 0,
        *,
        cancel: CancelToken = NEVER,
    ) -> list[imgs.ImageInput]:
        """PACS references replaced by their fetched, de-identified DICOM (bad references
        collected in ``errors``; NOT_FOUND / UNAVAILABLE / DEADLINE_EXCEEDED raised at once);
        each fetch is capped by what is left of the call's deadline."""
        out: list[imgs.ImageInput] = []
        for i, image in enumerate(images):
            if not isinstance(image, PacsImage) or image.ref is None:
                out.append(image)
                continue
            try:
                fetched = self.pacs.fetch(
                    image.ref,
                    field=f"{field_name}[{offset + i}].pacs",
                    max_bytes=self.max_upload_bytes,
                    timeout_s=cancel.remaining(),
                )
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
                out.append(imgs.ImageInput("none"))
                continue
            out.append(imgs.ImageInput("dicom", data=fetched.data))
        return out

    def _resolve(
        self, model: str, version: str, condition: Condition | None, viewer: Viewer | None = None
    ) -> ModelRecord:
        if not model and condition is None:
            raise InvalidArgument.for_field(
                "condition", "required (a class_name or a prompt) to pick the reward model"
            )
        return resolve_model(self.catalog.seen_by(viewer), model, version, condition)

    def _decode_all(
        self,
        images: Sequence[imgs.ImageInput],
        record: ModelRecord,
        errors: ValidationErrors,
        field_name: str,
        offset: int = 0,
        *,
        resize: bool,
    ) -> np.ndarray:
        """Model input for one request (or stream batch) within its pixel budget."""
        return decode_inputs(
            images,
            record,
            store=self.store,
            max_bytes=self.max_upload_bytes,
            resize=resize,
            errors=errors,
            budget=PixelBudget(self.max_request_pixels),
            field=field_name,
            offset=offset,
        )

    def _observe(
        self,
        record: ModelRecord,
        p: np.ndarray,
        conditions: Sequence[Condition | None],
        generator: str,
    ) -> None:
        if self.metrics is None:
            return
        gen_name, gen_version = _parse_generator(generator)
        version = str(record.version)
        self.metrics.images_scored.labels(record.name, version).inc(len(p))
        for value, cond in zip(p, conditions, strict=True):
            label = cond.label if cond is not None else ""
            self.metrics.score.labels(record.name, version, gen_name, gen_version, label).observe(
                float(value)
            )

    def stream_images_under(
        self, prefix: str, condition: Condition | None, viewer: Viewer | None = None
    ) -> list[StreamImage]:
        """Every image under a store prefix; sub-folder = class when no condition is set.

        With a ``viewer``, only the images it may read (its tenant's) are listed."""
        base = dir_prefix(
            outside_service_namespaces(prefix, "config.store_prefix"), "config.store_prefix"
        )
        out = []
        for info in self.store.list(base):
            if not info.key.lower().endswith(imgs.IMAGE_KEY_SUFFIXES):
                continue
            if viewer is not None and not sees_object(self.store, info.key, viewer):
                continue
            cond = condition
            rel = info.key[len(base) :]
            if cond is None and "/" in rel:
                cond = Condition(class_name=rel.split("/", 1)[0])
            ref = imgs.ImageInput("ref", key=info.key, viewer=viewer)
            out.append(StreamImage(info.key, ref, cond))
        if not out:
            raise InvalidArgument.for_field(
                "config.store_prefix", f"no PNG / JPEG / DICOM images under {base!r}"
            )
        return out

    def score_stream(
        self,
        config: StreamConfig,
        images: Iterator[StreamImage],
        *,
        total: int = 0,
        emit: Callable[[ImageScore | StreamProgress], None],
        cancel: CancelToken = NEVER,
    ) -> StreamSummary:
        """Score images as they arrive, ``batch_size`` per Triton round; emit results/progress."""
        if not 0 <= config.batch_size <= MAX_STREAM_BATCH:
            raise InvalidArgument.for_field(
                "config.batch_size", f"must be 0..{MAX_STREAM_BATCH}, got {config.batch_size}"
            )
        size = config.batch_size or DEFAULT_STREAM_BATCH
        policy = guard.check_policy(config.domain_guard, "config.domain_guard")
        record: ModelRecord | None = None
        scored, reward_sum, index = 0, 0.0, 0
        batch: list[StreamImage] = []

        def flush() -> None:
            nonlocal record, scored, reward_sum, index
            cancel.check()
            conds = [b.condition or config.condition for b in batch]
            if record is None:
                record = self._resolve(config.model, config.version, conds[0], config.viewer)
            errors = ValidationErrors()
            checked = [c or Condition() for c in conds]  # scored as checked
            for i, cond in enumerate(checked):
                try:
                    check_condition(record, cond, f"images[{index + i}].condition")
                except InvalidArgument as exc:
                    errors.violations.extend(exc.violations)
            fetched = self._fetch_pacs(
                [b.image for b in batch], errors, "images", index, cancel=cancel
            )
            errors.raise_if_any()
            pixels = self._decode_all(
                fetched, record, errors, "images", index, resize=config.resize
            )
            errors.raise_if_any()
            domain = self.guard.check(
                record,
                pixels,
                policy=policy,
                fields=[f"images[{index + i}]" for i in range(len(batch))],
                timeout_s=cancel.remaining(),
            )
            p = self.scorer.score(record, pixels, checked, timeout_s=cancel.remaining())
            self._observe(record, p, conds, config.generator)
            for i, item in enumerate(batch):
                emit(ImageScore(index + i, float(p[i]), record, item.name, domain[i]))
            scored += len(batch)
            reward_sum += float(p.sum())
            index += len(batch)
            batch.clear()
            emit(StreamProgress(scored, total))

        for item in images:
            batch.append(item)
            if len(batch) >= size:
                flush()
        if batch:
            flush()
        return StreamSummary(scored, reward_sum / scored if scored else math.nan, record)

    # -- feedback log ---------------------------------------------------------------------------
    def submit(self, draft: FeedbackDraft) -> tuple[FeedbackRecord, bool]:
        if draft.image is not None:
            _not_by_pacs(draft.image, "feedback.image")
        return self.log.submit(draft)

    def list_feedback(
        self,
        *,
        condition: Condition | None = None,
        rater_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        viewer: Viewer | None = None,
    ) -> tuple[list[FeedbackRecord], str, int]:
        return self.log.list_feedback(
            condition=condition,
            rater_id=rater_id,
            page_size=page_size,
            page_token=page_token,
            viewer=viewer,
        )

    # -- export ---------------------------------------------------------------------------------
    def export(
        self,
        *,
        prefix: str = "",
        condition: Condition | None = None,
        aggregate: str = "",
        tenant: str = "",
        admin: bool = False,
    ) -> ExportResult:
        """Write ``<prefix>/labels.jsonl`` + ``images/`` + ``export.json`` (``tenant``'s)."""
        return self.exports.export(
            prefix=prefix, condition=condition, aggregate=aggregate, tenant=tenant, admin=admin
        )

    def export_files(self, prefix: str, viewer: Viewer | None = None) -> list[str]:
        return self.exports.export_files(prefix, viewer)

    def export_chunks(
        self, prefix: str, *, cancel: CancelToken = NEVER, viewer: Viewer | None = None
    ) -> Iterator[ExportChunk]:
        """The files of an export as chunks (what DownloadExport streams)."""
        return self.exports.chunks(prefix, cancel=cancel, viewer=viewer)

    # -- review queue ---------------------------------------------------------------------------
    def enqueue(
        self,
        images: Sequence[EnqueueImage],
        *,
        condition: Condition | None,
        raters_per_item: int = 0,
        generator: str = "",
        tenant: str = "",
        admin: bool = False,
    ) -> list[QueuedItem]:
        """Queue images for review as ``tenant``'s items (scored with the models it sees)."""
        catalog = self.catalog.seen_by(Viewer(tenant, admin))
        for i, im in enumerate(images):
            _not_by_pacs(im.image, f"images[{i}].image")
        models: dict[Condition, ModelRecord | None] = {}

        def shrink(cond: Condition, arr: np.ndarray) -> np.ndarray:
            """The default model's input for ``arr`` (empty when none), made at decode time."""
            if cond not in models:
                try:
                    models[cond] = resolve_model(catalog, "", "", cond)
                except ClinisynthError:
                    models[cond] = None  # no reward model yet (or the catalog is down)
            record = models[cond]
            try:
                return (
                    np.empty(0)
                    if record is None
                    else fit_to_model(arr, record, resize=True, field="image")
                )
            except ClinisynthError:
                return np.empty(0)  # scored from the store later, or not at all

        out, inputs = self.queue.enqueue(
            images,
            condition=condition,
            raters_per_item=raters_per_item,
            generator=generator,
            shrink=shrink,
            tenant=tenant,
        )
        prefit = {
            it.id: (record.ref, x)
            for it, x in zip(out, inputs, strict=True)
            if x.size and (record := models.get(it.condition)) is not None
        }
        self._score_items(out, prefit=prefit)
        self._update_gauges(force=True)
        return [self.index.queued(it) for it in out]

    def _score_items(
        self,
        items: Sequence[ReviewItem],
        prefit: dict[str, tuple[str, np.ndarray]] | None = None,
    ) -> None:
        """Score items with the current default reward model of their condition (best effort).

        ``prefit``: item id → (model ref, model input) made when the image was decoded. Others
        are decoded from the store and fitted one at a time, so memory holds one full-size
        image plus the model-size batch, however many items are pending.
        """
        by_cond: dict[tuple[Condition, str], list[ReviewItem]] = {}
        for it in items:  # an item is scored with a model its tenant sees
            by_cond.setdefault((it.condition, it.tenant), []).append(it)
        for (cond, tenant), group in by_cond.items():
            try:
                record = resolve_model(self.catalog.seen_by(Viewer(tenant)), "", "", cond)
            except InvalidArgument:
                continue  # no reward model for this condition yet: FIFO order
            ref = record.ref
            with self._lock:
                todo = [it for it in group if self._active_scores.get(it.id, ("",))[0] != ref]
            todo = todo[:MAX_ACTIVE_SCORING]
            if not todo:
                continue
            try:
                known = prefit or {}
                pixels = np.empty((len(todo), record.channels, *model_size(record)), np.float32)
                for j, it in enumerate(todo):
                    ready = known.get(it.id)
                    if ready is not None and ready[0] == ref:
                        pixels[j] = ready[1]
                        continue
                    arr = imgs.decode(
                        imgs.ImageInput("ref", key=it.image_key),
                        field="item",
                        store=self.store,
                        max_bytes=1 << 62,
                        channels=record.channels,
                    )
                    pixels[j] = fit_to_model(arr, record, resize=True, field="item")
                    del arr
                p = self.scorer.score(record, pixels, [cond] * len(todo))
            except ClinisynthError:
                continue  # Triton down: the queue still works, in FIFO order
            with self._lock:
                for it, value in zip(todo, p, strict=True):
                    self._active_scores[it.id] = (ref, float(value))

    def next_items(
        self,
        rater_id: str,
        *,
        condition: Condition | None = None,
        limit: int = 0,
        viewer: Viewer | None = None,
    ) -> tuple[list[QueuedItem], int]:
        """In the queue's strategy order, never one the rater judged, never a full item; with a
        ``viewer``, only its tenant's items (an admin: all)."""
        errors = ValidationErrors()
        self.rules.check_rater(rater_id, errors, "rater_id")
        if condition is not None:
            self.check_condition_value(condition, errors, "condition")
        if not 0 <= limit <= MAX_LIMIT:
            errors.add("limit", f"must be 0..{MAX_LIMIT}")
        errors.raise_if_any()
        self.feedback.refresh_soon(self.refresh_interval_s)
        stale: list[ReviewItem] = []
        for cond in self.index.conditions(condition):
            try:
                ref = resolve_model(self.catalog.seen_by(viewer), "", "", cond).ref
            except InvalidArgument:
                continue  # no reward model for this condition yet: FIFO order
            stale.extend(
                it
                for it in self.index.stale(cond, ref, MAX_ACTIVE_SCORING)
                if viewer is None or viewer.sees(it.tenant)
            )
        if stale:
            self._score_items(stale)
        out = self.queue.next_items(rater_id, condition=condition, limit=limit, viewer=viewer)
        self._update_gauges(force=True)
        return out

    def item_png(self, item_id_: str, viewer: Viewer | None = None) -> bytes:
        return self.queue.item_png(item_id_, viewer)

    def pending_by_condition(self, viewer: Viewer | None = None) -> dict[Condition, int]:
        return self.index.pending_by_condition(viewer)

    # -- agreement ------------------------------------------------------------------------------
    def agreement(
        self, condition: Condition | None = None, viewer: Viewer | None = None
    ) -> AgreementReport:
        """Agreement over the judgements ``viewer`` sees (its tenant's; none / an admin: all)."""
        self.feedback.refresh_soon(self.refresh_interval_s)
        with self._lock:
            known = dict(self._conditions)
            agreements = self.agreements
            if viewer is not None and not viewer.admin:
                agreements = self._tenant_agreements.get(viewer.tenant, agr.AgreementIndex())
        if condition is not None:
            scopes = [condition.key]
            known.setdefault(condition.key, condition)
        else:
            scopes = agreements.scopes()
        conds = [ConditionAgreement(known[k], agreements.agreement(k)) for k in scopes]
        if self.metrics is not None and agreements is self.agreements:  # the gauge is global
            for ca in conds:
                if not math.isnan(ca.agreement.kappa):
                    self.metrics.agreement.labels(ca.condition.label).set(ca.agreement.kappa)
        raters = agreements.rater_stats(condition.key if condition is not None else None)
        return AgreementReport(conds, raters)

    # -- gauges -------------------------------------------------------------------------------
    def _update_gauges(self, *, force: bool = False) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        if not force and now - self._last_gauges < 2.0:
            return
        self._last_gauges = now
        by_label: dict[str, int] = {}
        for cond, pending in self.pending_by_condition().items():
            by_label[cond.label] = by_label.get(cond.label, 0) + pending
        for label, pending in by_label.items():
            self.metrics.feedback_pending.labels(label).set(pending)
        if not force:
            self.agreement()
