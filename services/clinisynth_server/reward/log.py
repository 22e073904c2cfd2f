"""The feedback log: validate and durably store expert judgements; list them by page.

A SubmitFeedback request:
  1. a retry of a stored judgement is answered from the index (``duplicate``);
  2. validate rater, condition, checklist answers, the image (size, bytes, reference);
  3. store the uploaded image by content, then the judgement with ``put_if_absent``;
  4. only then reply: acknowledged = durable.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clinisynth_server.errors import InvalidArgument, ValidationErrors
from clinisynth_server.reward import images as imgs
from clinisynth_server.reward.checklists import checklist_for
from clinisynth_server.reward.conditions import Rules
from clinisynth_server.reward.feedback import (
    FeedbackRecord,
    FeedbackStore,
    ReviewItem,
    feedback_id,
)
from clinisynth_server.reward.scoring import Condition
from clinisynth_server.runtime.metrics import RewardMetrics
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.tenancy import Viewer

MAX_COMMENT_CHARS = 4000
MAX_REQUEST_ID_CHARS = 200


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
    # The judging identity's tenant: the record's owner; ``admin`` may judge any tenant's item.
    tenant: str = ""
    admin: bool = False


class FeedbackLog:
    """Judgements in, pages of judgements out; ``on_written`` runs after each new one."""

    def __init__(
        self,
        store: ArtifactStore,
        feedback: FeedbackStore,
        rules: Rules,
        *,
        metrics: RewardMetrics | None,
        max_upload_bytes: int,
        clock: Callable[[], float],
        on_written: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.feedback = feedback
        self.rules = rules
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes
        self.clock = clock
        self.on_written = on_written

    def submit(self, draft: FeedbackDraft) -> tuple[FeedbackRecord, bool]:
        errors = ValidationErrors()
        crid = draft.client_request_id
        if not crid or len(crid) > MAX_REQUEST_ID_CHARS:
            errors.add("feedback.client_request_id", f"required, 1..{MAX_REQUEST_ID_CHARS} chars")
        self.rules.check_rater(draft.rater_id, errors, "feedback.rater_id")
        errors.raise_if_any()
        fid = feedback_id(draft.rater_id, crid, draft.tenant)
        viewer = Viewer(draft.tenant, draft.admin)
        stored = self.feedback.record(fid)
        if stored is not None:  # a retry: answer from the index, write nothing
            return stored, True

        has_image = draft.image is not None and draft.image.kind != "none"
        item: ReviewItem | None = None
        condition = draft.condition
        if draft.item_id and has_image:
            errors.add("feedback.image", "send item_id or image, not both")
        elif draft.item_id:
            try:
                item = self.feedback.item(draft.item_id, field="feedback.item_id", viewer=viewer)
                if condition is not None and condition != item.condition:
                    errors.add("feedback.condition", "differs from the review item's condition")
                condition = item.condition
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
        elif not has_image:
            errors.add("feedback.image", "required: the judged image (or a review item_id)")
        if item is None or condition is not None:
            self.rules.check_condition(condition, errors, "feedback.condition")
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
            stored_image = imgs.stored_ref(
                self.store, image.key, "feedback.image.ref.key", image.viewer
            )
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
            tenant=draft.tenant,
        )
        stored, duplicate = self.feedback.add(record)
        if not duplicate and self.metrics is not None:
            label = "plausible" if stored.plausible else "implausible"
            self.metrics.feedback.labels(stored.condition.label, label).inc()
        self.on_written()
        return stored, duplicate

    def list_feedback(
        self,
        *,
        condition: Condition | None = None,
        rater_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        viewer: Viewer | None = None,
    ) -> tuple[list[FeedbackRecord], str, int]:
        """A page of judgements (``viewer``: only its tenant's; none / an admin: all)."""
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
            and (viewer is None or viewer.sees(r.tenant))
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
