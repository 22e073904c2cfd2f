"""The reward service's domain: scoring, expert feedback, the review queue and agreement.

Knows nothing of gRPC or HTTP: the servicer (gRPC) and the review page's JSON API (``web.py``)
both call these methods, so a judgement made on the page and one made through the SDK are the
same record. Every reward-model forward pass runs in Triton (``scoring.Scorer``).

Stages of a Score request:
  1. validate every field up front (count, conditions, model, each image) — all errors at once;
  2. decode images to the model's channels (and size, when ``resize``);
  3. score in Triton batches; record the quality metrics (by model / generator / condition).

A SubmitFeedback request:
  1. a retry of a stored judgement is answered from the index (``duplicate``);
  2. validate rater, condition, checklist answers, the image (size, bytes, reference);
  3. store the uploaded image by content, then the judgement with ``put_if_absent``;
  4. only then reply: acknowledged = durable.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from clinisynth_server.cancel import NEVER, CancelToken
from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import ClinisynthError, InvalidArgument, ValidationErrors
from clinisynth_server.imaging.decode import DEFAULT_MAX_REQUEST_PIXELS, PixelBudget
from clinisynth_server.reward import agreement as agr
from clinisynth_server.reward import images as imgs
from clinisynth_server.reward.checklists import Criterion, checklist_for, known_cell_classes
from clinisynth_server.reward.feedback import (
    FeedbackRecord,
    FeedbackStore,
    ReviewItem,
    feedback_id,
    item_id,
)
from clinisynth_server.reward.scoring import (
    Condition,
    Scorer,
    check_condition,
    decode_inputs,
    resolve_model,
    to_model_input,
)
from clinisynth_server.runtime.metrics import RewardMetrics
from clinisynth_server.store.base import (
    ArtifactStore,
    dir_prefix,
    encode_json,
    outside_service_namespaces,
    validate_prefix,
)
from clinisynth_server.triton.client import TritonClient

log = logging.getLogger(__name__)

MAX_SCORE_IMAGES = 256
DEFAULT_STREAM_BATCH = 64
MAX_STREAM_BATCH = 256
MAX_PROMPT_CHARS = 1000
MAX_COMMENT_CHARS = 4000
MAX_REQUEST_ID_CHARS = 200
MAX_RATERS_PER_ITEM = 20
MAX_ENQUEUE = 256
MAX_ACTIVE_SCORING = 256  # pending items (re)scored per NextReviewItems call
_RATER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")
_AGGREGATES = ("all", "majority")
EXPORT_MANIFEST = "export.json"


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


@dataclass(frozen=True)
class ImageScore:
    index: int
    p_aligned: float
    model: ModelRecord
    name: str = ""


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
class FeedbackDraft:
    client_request_id: str
    rater_id: str
    plausible: bool
    item_id: str = ""
    image: imgs.ImageInput | None = None
    condition: Condition | None = None
    criteria: Sequence[tuple[str, bool]] = ()
    comment: str = ""
    time_spent_ms: int = 0
    generator: str = ""


@dataclass(frozen=True)
class EnqueueImage:
    name: str
    image: imgs.ImageInput
    condition: Condition | None = None


@dataclass(frozen=True)
class QueuedItem:
    item: ReviewItem
    judgements: int
    p_aligned: float | None
    scored_by: str


@dataclass(frozen=True)
class ExportResult:
    prefix: str
    judgements: int
    images: int
    labels_key: str
    labels_sha256: str
    labels_size: int
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConditionAgreement:
    condition: Condition
    agreement: agr.Agreement


@dataclass(frozen=True)
class AgreementReport:
    conditions: list[ConditionAgreement]
    raters: list[agr.RaterStats]


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
    ) -> None:
        self.catalog = catalog
        self.triton = triton
        self.store = store
        self.metrics = metrics
        self.raters = frozenset(r for r in raters if r)
        self.extra_classes = tuple(c for c in classes if c)
        self.max_upload_bytes = max_upload_bytes
        self.max_request_pixels = max_request_pixels
        self.clock = clock
        self.scorer = Scorer(catalog, triton)
        self.feedback = FeedbackStore(store)
        self.feedback.refresh()
        # item id → (model ref, p_aligned) by the current default reward model.
        self._active_scores: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._last_gauges = 0.0
        self._update_gauges(force=True)

    # -- conditions -----------------------------------------------------------------------------
    def known_classes(self) -> set[str]:
        classes = set(self.extra_classes) | set(known_cell_classes())
        for record in self.catalog.list():
            classes.update(record.classes)
        return classes

    def check_condition_value(
        self, condition: Condition | None, errors: ValidationErrors, field_name: str
    ) -> None:
        if condition is None or not (condition.class_name or condition.prompt):
            errors.add(field_name, "required: a class_name or a prompt")
        elif condition.class_name and condition.class_name not in self.known_classes():
            errors.add(
                f"{field_name}.class_name",
                f"unknown class {condition.class_name!r}; known: {sorted(self.known_classes())}",
            )
        elif condition.prompt and len(condition.prompt) > MAX_PROMPT_CHARS:
            errors.add(f"{field_name}.prompt", f"at most {MAX_PROMPT_CHARS} characters")

    def checklist(self, condition: Condition | None) -> tuple[Criterion, ...]:
        errors = ValidationErrors()
        self.check_condition_value(condition, errors, "condition")
        errors.raise_if_any()
        assert condition is not None
        return checklist_for(condition)

    # -- scoring ------------------------------------------------------------------------------
    def score(self, opts: ScoreOptions, *, cancel: CancelToken = NEVER) -> ScoreResult:
        errors = ValidationErrors()
        n = len(opts.images)
        if not 1 <= n <= MAX_SCORE_IMAGES:
            errors.add("images", f"send 1..{MAX_SCORE_IMAGES} images, got {n} (use ScoreStream)")
        if opts.conditions and len(opts.conditions) != n:
            errors.add("conditions", f"{len(opts.conditions)} conditions for {n} images")
        errors.raise_if_any()
        conditions = [(opts.conditions[i] if opts.conditions else opts.condition) for i in range(n)]
        record = self._resolve(opts.model, opts.version, conditions[0])
        for i, cond in enumerate(conditions):
            where = f"conditions[{i}]" if opts.conditions else "condition"
            try:
                check_condition(record, cond or Condition(), where)
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
            if errors.violations and not opts.conditions:
                break
        pixels = self._decode_all(opts.images, record, errors, "images", resize=opts.resize)
        errors.raise_if_any()
        cancel.check()
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
            [ImageScore(i, float(p[i]), record, names[i]) for i in range(n)],
        )

    def _resolve(self, model: str, version: str, condition: Condition | None) -> ModelRecord:
        if not model and condition is None:
            raise InvalidArgument.for_field(
                "condition", "required (a class_name or a prompt) to pick the reward model"
            )
        return resolve_model(self.catalog, model, version, condition)

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

    def stream_images_under(self, prefix: str, condition: Condition | None) -> list[StreamImage]:
        """Every image under a store prefix; sub-folder = class when no condition is set."""
        base = dir_prefix(
            outside_service_namespaces(prefix, "config.store_prefix"), "config.store_prefix"
        )
        out = []
        for info in self.store.list(base):
            if not info.key.lower().endswith(imgs.IMAGE_KEY_SUFFIXES):
                continue
            cond = condition
            rel = info.key[len(base) :]
            if cond is None and "/" in rel:
                cond = Condition(class_name=rel.split("/", 1)[0])
            out.append(StreamImage(info.key, imgs.ImageInput("ref", key=info.key), cond))
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
        record: ModelRecord | None = None
        scored, reward_sum, index = 0, 0.0, 0
        batch: list[StreamImage] = []

        def flush() -> None:
            nonlocal record, scored, reward_sum, index
            cancel.check()
            conds = [b.condition or config.condition for b in batch]
            if record is None:
                record = self._resolve(config.model, config.version, conds[0])
            errors = ValidationErrors()
            for i, cond in enumerate(conds):
                try:
                    check_condition(record, cond or Condition(), f"images[{index + i}].condition")
                except InvalidArgument as exc:
                    errors.violations.extend(exc.violations)
            pixels = self._decode_all(
                [b.image for b in batch], record, errors, "images", index, resize=config.resize
            )
            errors.raise_if_any()
            p = self.scorer.score(record, pixels, conds, timeout_s=cancel.remaining())  # type: ignore[arg-type]
            self._observe(record, p, conds, config.generator)
            for i, item in enumerate(batch):
                emit(ImageScore(index + i, float(p[i]), record, item.name))
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

    # -- feedback -----------------------------------------------------------------------------
    def submit(self, draft: FeedbackDraft) -> tuple[FeedbackRecord, bool]:
        errors = ValidationErrors()
        crid = draft.client_request_id
        if not crid or len(crid) > MAX_REQUEST_ID_CHARS:
            errors.add("feedback.client_request_id", f"required, 1..{MAX_REQUEST_ID_CHARS} chars")
        self._check_rater(draft.rater_id, errors, "feedback.rater_id")
        errors.raise_if_any()
        fid = feedback_id(draft.rater_id, crid)
        with self.feedback._lock:
            stored = self.feedback._records.get(fid)
        if stored is not None:  # a retry: answer from the index, write nothing
            return stored, True

        has_image = draft.image is not None and draft.image.kind != "none"
        item: ReviewItem | None = None
        condition = draft.condition
        if draft.item_id and has_image:
            errors.add("feedback.image", "send item_id or image, not both")
        elif draft.item_id:
            try:
                item = self.feedback.item(draft.item_id, field="feedback.item_id")
                if condition is not None and condition != item.condition:
                    errors.add("feedback.condition", "differs from the review item's condition")
                condition = item.condition
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
        elif not has_image:
            errors.add("feedback.image", "required: the judged image (or a review item_id)")
        if item is None or condition is not None:
            self.check_condition_value(condition, errors, "feedback.condition")
        criteria: dict[str, bool] = {}
        if condition is not None and not any(
            v.field.startswith("feedback.condition") for v in errors.violations
        ):
            allowed = {c.name for c in checklist_for(condition)}
            for i, (name, ok) in enumerate(draft.criteria):
                if name not in allowed:
                    errors.add(
                        f"feedback.criteria[{i}].criterion",
                        f"unknown criterion {name!r} for {condition.key}; one of {sorted(allowed)}",
                    )
                elif name in criteria:
                    errors.add(f"feedback.criteria[{i}].criterion", f"{name!r} answered twice")
                else:
                    criteria[name] = bool(ok)
        if len(draft.comment) > MAX_COMMENT_CHARS:
            errors.add("feedback.comment", f"at most {MAX_COMMENT_CHARS} characters")
        if draft.time_spent_ms < 0:
            errors.add("feedback.time_spent_ms", "must be >= 0")
        pixels = None
        image = draft.image
        if has_image and draft.image is not None:
            try:  # de-identified first: only the clean object is decoded, hashed and stored
                image = imgs.admit(
                    draft.image, field="feedback.image", max_bytes=self.max_upload_bytes
                )
                pixels = imgs.decode(
                    image,
                    field="feedback.image",
                    store=self.store,
                    max_bytes=self.max_upload_bytes,
                )
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
        errors.raise_if_any()
        assert condition is not None

        # Durable image first, then the judgement that points at it.
        if item is not None:
            stored_image = imgs.StoredImage(item.image_key, item.image_sha256, item.image_size)
        elif image is not None and image.kind == "ref":
            stored_image = imgs.stored_ref(self.store, image.key, "feedback.image.ref.key")
        else:
            assert image is not None and pixels is not None
            data, suffix = imgs.encoded_bytes(image, pixels)
            stored_image = imgs.store_upload(self.store, data, suffix)
        record = FeedbackRecord(
            id=fid,
            client_request_id=crid,
            rater_id=draft.rater_id,
            condition=condition,
            plausible=bool(draft.plausible),
            image_key=stored_image.key,
            image_sha256=stored_image.sha256,
            image_size=stored_image.size,
            item_id=item.id if item is not None else "",
            criteria=criteria,
            comment=draft.comment,
            time_spent_ms=int(draft.time_spent_ms),
            generator=draft.generator or (item.generator if item is not None else ""),
            created=self.clock(),
        )
        stored, duplicate = self.feedback.add(record)
        if not duplicate and self.metrics is not None:
            label = "plausible" if stored.plausible else "implausible"
            self.metrics.feedback.labels(stored.condition.label, label).inc()
        self._update_gauges()
        return stored, duplicate

    def _check_rater(self, rater_id: str, errors: ValidationErrors, field_name: str) -> None:
        if not rater_id:
            errors.add(field_name, "required")
        elif not _RATER_RE.match(rater_id):
            errors.add(field_name, "letters, digits and _.@+- only, at most 128 characters")
        elif self.raters and rater_id not in self.raters:
            errors.add(field_name, f"unknown rater {rater_id!r}: not in the registered raters")

    def list_feedback(
        self,
        *,
        condition: Condition | None = None,
        rater_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[FeedbackRecord], str, int]:
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", "must be >= 0")
        after: tuple[float, str] | None = None
        if page_token:
            try:
                created, last = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                after = (float(created), str(last))
            except (ValueError, TypeError) as exc:
                raise InvalidArgument.for_field("page_token", "not a token from this API") from exc
        self.feedback.refresh()
        rows = [
            r
            for r in self.feedback.records()
            if (condition is None or r.condition == condition)
            and (not rater_id or r.rater_id == rater_id)
        ]
        total = len(rows)
        if after is not None:
            rows = [r for r in rows if (r.created, r.id) > after]
        size = min(page_size or 100, 1000)
        page = rows[:size]
        token = ""
        if len(rows) > size:
            last = page[-1]
            token = base64.urlsafe_b64encode(json.dumps([last.created, last.id]).encode()).decode()
        return page, token, total

    # -- export ---------------------------------------------------------------------------------
    def export(
        self, *, prefix: str = "", condition: Condition | None = None, aggregate: str = ""
    ) -> ExportResult:
        """Write ``<prefix>/labels.jsonl`` + ``images/`` + ``export.json`` ."""
        aggregate = aggregate or "all"
        errors = ValidationErrors()
        if aggregate not in _AGGREGATES:
            errors.add("aggregate", f"one of {_AGGREGATES}, got {aggregate!r}")
        if prefix:
            try:
                outside_service_namespaces(prefix, "prefix")
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
        errors.raise_if_any()
        base = (
            dir_prefix(prefix)
            if prefix
            else time.strftime("exports/feedback/%Y%m%dT%H%M%S/", time.gmtime(self.clock()))
        )
        self.feedback.refresh()
        records = [
            r for r in self.feedback.records() if condition is None or r.condition == condition
        ]
        rows: list[dict[str, object]] = []
        images: dict[str, str] = {}  # store key → relative path in the export
        for r in records:
            rel = "images/" + r.image_sha256 + _suffix(r.image_key)
            images[r.image_key] = rel
        if aggregate == "all":
            for r in records:
                rows.append(
                    {
                        "image": images[r.image_key],
                        "condition": r.condition.to_json(),
                        "plausible": r.plausible,
                        "rater_id": r.rater_id,
                        "criteria": r.criteria,
                        "feedback_id": r.id,
                        "generator": r.generator,
                        "item_id": r.item_id,
                        "comment": r.comment,
                        "time_spent_ms": r.time_spent_ms,
                        "created": r.created,
                    }
                )
        else:
            groups: dict[str, list[FeedbackRecord]] = {}
            for r in records:
                groups.setdefault(f"{r.condition.key}\0{r.image_sha256}", []).append(r)
            for group in groups.values():
                yes = sum(r.plausible for r in group)
                if yes * 2 == len(group):
                    continue  # a tie carries no label
                first = group[0]
                rows.append(
                    {
                        "image": images[first.image_key],
                        "condition": first.condition.to_json(),
                        "plausible": yes * 2 > len(group),
                        "rater_id": "majority",
                        "raters": sorted({r.rater_id for r in group}),
                        "votes": {"plausible": yes, "implausible": len(group) - yes},
                        "criteria": _majority_criteria(group),
                        "feedback_id": ",".join(r.id for r in group),
                        "generator": first.generator,
                        "item_id": first.item_id,
                    }
                )
        used = {str(row["image"]) for row in rows}
        files = []
        for key, rel in sorted(images.items(), key=lambda kv: kv[1]):
            if rel in used and rel not in files:
                try:  # exports leave de-identified, whatever the store holds
                    data = imgs.deidentified_copy(self.store.get_bytes(key), field=key)
                except InvalidArgument as exc:
                    log.warning("export %s: image %s left out: %s", base, key, exc.message)
                    continue
                self.store.put_bytes(base + rel, data)
                files.append(rel)
        rows = [row for row in rows if str(row["image"]) in files]
        labels = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
        info = self.store.put_bytes(
            base + "labels.jsonl", labels, content_type="application/x-ndjson"
        )
        manifest = {
            "kind": "clinisynth-feedback-export",
            "format_version": 1,
            "aggregate": aggregate,
            "condition": condition.to_json() if condition is not None else None,
            "judgements": len(records),
            "rows": len(rows),
            "files": ["labels.jsonl", *files],
            "created": self.clock(),
        }
        self.store.put_bytes(base + EXPORT_MANIFEST, encode_json(manifest))
        return ExportResult(
            base,
            len(records),
            len(files),
            base + "labels.jsonl",
            info.sha256 or "",
            info.size,
            [*manifest["files"], EXPORT_MANIFEST],  # type: ignore[list-item]
        )

    def export_files(self, prefix: str) -> list[str]:
        """Keys of an export written by :meth:`export` (refuses any other prefix)."""
        base = dir_prefix(validate_prefix(prefix, "prefix"), "prefix") if prefix else ""
        if not base:
            raise InvalidArgument.for_field("prefix", "required")
        key = base + EXPORT_MANIFEST
        if not self.store.exists(key):
            raise InvalidArgument.for_field("prefix", f"no feedback export at {base!r}")
        manifest = self.store.get_json(key)
        if manifest.get("kind") != "clinisynth-feedback-export":
            raise InvalidArgument.for_field("prefix", f"{base!r} is not a feedback export")
        return [base + f for f in [*manifest["files"], EXPORT_MANIFEST]]

    # -- review queue ---------------------------------------------------------------------------
    def enqueue(
        self,
        images: Sequence[EnqueueImage],
        *,
        condition: Condition | None,
        raters_per_item: int = 0,
        generator: str = "",
    ) -> list[QueuedItem]:
        errors = ValidationErrors()
        if not 1 <= len(images) <= MAX_ENQUEUE:
            errors.add("images", f"send 1..{MAX_ENQUEUE} images, got {len(images)}")
        if not 0 <= raters_per_item <= MAX_RATERS_PER_ITEM:
            errors.add("raters_per_item", f"must be 0..{MAX_RATERS_PER_ITEM}")
        conds = [im.condition or condition for im in images]
        for i, cond in enumerate(conds):
            where = f"images[{i}].condition" if images[i].condition else "condition"
            before = len(errors.violations)
            self.check_condition_value(cond, errors, where)
            if len(errors.violations) > before and not images[i].condition:
                break
        arrays: list[np.ndarray] = []
        admitted: list[imgs.ImageInput] = []
        budget = PixelBudget(self.max_request_pixels)  # the arrays are held until scored
        for i, im in enumerate(images):
            clean = im.image
            try:  # de-identified first: only the clean object is decoded, hashed and stored
                clean = imgs.admit(
                    im.image, field=f"images[{i}].image", max_bytes=self.max_upload_bytes
                )
                arrays.append(
                    imgs.decode(
                        clean,
                        field=f"images[{i}].image",
                        store=self.store,
                        max_bytes=self.max_upload_bytes,
                        budget=budget,
                    )
                )
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
                arrays.append(np.zeros((1, 1), dtype=np.float32))
            admitted.append(clean)
        errors.raise_if_any()
        now = self.clock()
        out = []
        for i, (im, clean, cond, arr) in enumerate(
            zip(images, admitted, conds, arrays, strict=True)
        ):
            assert cond is not None
            if clean.kind == "ref":
                stored = imgs.stored_ref(self.store, clean.key, f"images[{i}].image.ref.key")
            else:
                data, suffix = imgs.encoded_bytes(clean, arr)
                stored = imgs.store_upload(self.store, data, suffix)
            item = ReviewItem(
                id=item_id(cond, stored.sha256),
                condition=cond,
                image_key=stored.key,
                image_sha256=stored.sha256,
                image_size=stored.size,
                raters_per_item=raters_per_item or 1,
                generator=generator,
                name=im.name,
                created=now + i * 1e-6,
            )
            out.append(self.feedback.add_item(item))
        self._score_items(out, arrays_by_id={it.id: a for it, a in zip(out, arrays, strict=True)})
        self._update_gauges(force=True)
        return [self._queued(it) for it in out]

    def _judgements_by_item(self) -> dict[str, set[str]]:
        raters: dict[str, set[str]] = {}
        for r in self.feedback.records():
            if r.item_id:
                raters.setdefault(r.item_id, set()).add(r.rater_id)
        return raters

    def _queued(self, item: ReviewItem, judged: dict[str, set[str]] | None = None) -> QueuedItem:
        judged = judged if judged is not None else self._judgements_by_item()
        with self._lock:
            active = self._active_scores.get(item.id)
        if active is not None:
            scored_by, p = active
        else:
            scored_by, p = item.scored_by, item.p_aligned  # type: ignore[assignment]
        return QueuedItem(item, len(judged.get(item.id, ())), p, scored_by)

    def _score_items(
        self, items: Sequence[ReviewItem], arrays_by_id: dict[str, np.ndarray] | None = None
    ) -> None:
        """Score items with the current default reward model of their condition (best effort)."""
        by_cond: dict[Condition, list[ReviewItem]] = {}
        for it in items:
            by_cond.setdefault(it.condition, []).append(it)
        for cond, group in by_cond.items():
            try:
                record = resolve_model(self.catalog, "", "", cond)
            except InvalidArgument:
                continue  # no reward model for this condition yet: FIFO order
            ref = record.ref
            with self._lock:
                todo = [it for it in group if self._active_scores.get(it.id, ("",))[0] != ref]
            todo = todo[:MAX_ACTIVE_SCORING]
            if not todo:
                continue
            try:
                arrays = [
                    (arrays_by_id or {}).get(it.id)
                    if (arrays_by_id or {}).get(it.id) is not None
                    else imgs.decode(
                        imgs.ImageInput("ref", key=it.image_key),
                        field="item",
                        store=self.store,
                        max_bytes=1 << 62,
                    )
                    for it in todo
                ]
                pixels = to_model_input(arrays, record, resize=True)  # type: ignore[arg-type]
                p = self.scorer.score(record, pixels, [cond] * len(todo))
            except ClinisynthError:
                continue  # Triton down: the queue still works, in FIFO order
            with self._lock:
                for it, value in zip(todo, p, strict=True):
                    self._active_scores[it.id] = (ref, float(value))

    def next_items(
        self, rater_id: str, *, condition: Condition | None = None, limit: int = 0
    ) -> tuple[list[QueuedItem], int]:
        """Least certain first (|p − 0.5|), never one the rater judged, never a full item."""
        errors = ValidationErrors()
        self._check_rater(rater_id, errors, "rater_id")
        if condition is not None:
            self.check_condition_value(condition, errors, "condition")
        if not 0 <= limit <= 100:
            errors.add("limit", "must be 0..100")
        errors.raise_if_any()
        self.feedback.refresh()
        judged = self._judgements_by_item()
        open_items = [
            it
            for it in self.feedback.items()
            if (condition is None or it.condition == condition)
            and len(judged.get(it.id, ())) < it.raters_per_item
        ]
        mine = [it for it in open_items if rater_id not in judged.get(it.id, set())]
        self._score_items(mine)
        queued = [self._queued(it, judged) for it in mine]

        def uncertainty(q: QueuedItem) -> tuple[int, float, float]:
            if q.p_aligned is None:
                return (1, 0.0, q.item.created)
            return (0, abs(q.p_aligned - 0.5), q.item.created)

        queued.sort(key=uncertainty)
        self._update_gauges(force=True)
        return queued[: limit or 10], len(open_items)

    def item_png(self, item_id_: str) -> bytes:
        item = self.feedback.item(item_id_, field="item_id")
        return imgs.display_png(self.store.get_bytes(item.image_key))

    def pending_by_condition(self) -> dict[Condition, int]:
        judged = self._judgements_by_item()
        out: dict[Condition, int] = {}
        for it in self.feedback.items():
            if len(judged.get(it.id, ())) < it.raters_per_item:
                out[it.condition] = out.get(it.condition, 0) + 1
            else:
                out.setdefault(it.condition, 0)
        return out

    # -- agreement ------------------------------------------------------------------------------
    def agreement(self, condition: Condition | None = None) -> AgreementReport:
        self.feedback.refresh()
        records = [
            r for r in self.feedback.records() if condition is None or r.condition == condition
        ]
        per_cond: dict[Condition, dict[str, dict[str, bool]]] = {}
        all_items: dict[str, dict[str, bool]] = {}
        times: dict[str, list[int]] = {}
        for r in records:
            per_cond.setdefault(r.condition, {}).setdefault(r.image_group, {})[r.rater_id] = (
                r.plausible
            )
            all_items.setdefault(r.image_group, {})[r.rater_id] = r.plausible
            times.setdefault(r.rater_id, []).append(r.time_spent_ms)
        if condition is not None:
            per_cond.setdefault(condition, {})
        conds = [
            ConditionAgreement(c, agr.agreement(items))
            for c, items in sorted(per_cond.items(), key=lambda kv: kv[0].key)
        ]
        if self.metrics is not None:
            for ca in conds:
                if not math.isnan(ca.agreement.kappa):
                    self.metrics.agreement.labels(ca.condition.label).set(ca.agreement.kappa)
        return AgreementReport(conds, agr.rater_stats(all_items, times))

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


def _suffix(key: str) -> str:
    dot = key.rfind(".")
    return key[dot:] if dot > key.rfind("/") else ".png"


def _majority_criteria(group: Sequence[FeedbackRecord]) -> dict[str, bool]:
    votes: dict[str, list[bool]] = {}
    for r in group:
        for name, ok in r.criteria.items():
            votes.setdefault(name, []).append(ok)
    return {n: sum(v) * 2 > len(v) for n, v in votes.items() if sum(v) * 2 != len(v)}
