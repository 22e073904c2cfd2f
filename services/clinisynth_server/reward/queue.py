"""The review queue: which open item a rater sees next, kept as an index updated on each write.

An item is *open* while fewer raters than ``raters_per_item`` judged it. The order of open items
is a pluggable strategy (:class:`OrderStrategy`), the way MONAI Label plugs in active-learning
strategies: ``least_certain`` (|p − 0.5| of the current reward model, unscored last; the
default), ``disagreement`` (items whose judgements so far split most, then least certain) and
``random`` (a fixed pseudo-random order by item id, the same after a restart). The operator picks
one with ``CLINISYNTH_REWARD_REVIEW_ORDER``.

Why an index: a scan of every item and judgement on each ``next_items`` call grows with the
store. :class:`QueueIndex` keeps, per condition, the open items sorted by strategy key and the
raters of each item; it is rebuilt once from the store at start (``FeedbackStore.subscribe``)
and updated on each item, judgement or score, so a call costs O(limit + items the rater already
judged), and the same writes give the same index in any order (see tests/unit).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from clinisynth_server.errors import InvalidArgument, ValidationErrors
from clinisynth_server.imaging.decode import PixelBudget
from clinisynth_server.reward import images as imgs
from clinisynth_server.reward.feedback import FeedbackRecord, FeedbackStore, ReviewItem, item_id
from clinisynth_server.reward.scoring import Condition
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.tenancy import Viewer

MAX_RATERS_PER_ITEM = 20
MAX_ENQUEUE = 256
MAX_LIMIT = 100
DEFAULT_LIMIT = 10

SortKey = tuple[float, ...]


@dataclass(frozen=True)
class QueuedItem:
    item: ReviewItem
    judgements: int
    p_aligned: float | None
    scored_by: str


@dataclass(frozen=True)
class EnqueueImage:
    name: str
    image: imgs.ImageInput
    condition: Condition | None = None


@dataclass(frozen=True)
class ItemView:
    """What a strategy may look at: the item, its current score and its votes so far."""

    item: ReviewItem
    p_aligned: float | None
    plausible: int
    implausible: int


class OrderStrategy(Protocol):
    """Orders open items: smaller keys come first (ties: oldest, then by id)."""

    name: str

    def key(self, view: ItemView) -> SortKey: ...


class LeastCertain:
    name = "least_certain"

    def key(self, view: ItemView) -> SortKey:
        if view.p_aligned is None:
            return (1.0, 0.0)
        return (0.0, abs(view.p_aligned - 0.5))


class Disagreement:
    name = "disagreement"

    def key(self, view: ItemView) -> SortKey:
        votes = view.plausible + view.implausible
        split = min(view.plausible, view.implausible) / votes if votes else 0.0
        return (-split, *LeastCertain().key(view))


class RandomOrder:
    name = "random"

    def key(self, view: ItemView) -> SortKey:
        h = hashlib.sha256(b"clinisynth-review\0" + view.item.id.encode()).digest()
        return (int.from_bytes(h[:8], "big") / 2.0**64,)


STRATEGIES: dict[str, Callable[[], OrderStrategy]] = {
    "least_certain": LeastCertain,
    "disagreement": Disagreement,
    "random": RandomOrder,
}


def strategy_named(name: str, field: str = "review_order") -> OrderStrategy:
    """The strategy called ``name`` ('' = least certain first)."""
    factory = STRATEGIES.get(name or "least_certain")
    if factory is None:
        raise InvalidArgument.for_field(field, f"one of {sorted(STRATEGIES)}, got {name!r}")
    return factory()


_Entry = tuple[SortKey, float, str]  # (strategy key, created, item id)


class QueueIndex:
    """Open items per condition in strategy order; raters and scores per item (thread-safe)."""

    def __init__(self, strategy: OrderStrategy | None = None) -> None:
        self.strategy = strategy or LeastCertain()
        self._lock = threading.RLock()
        self._items: dict[str, ReviewItem] = {}
        self._seen_records: set[str] = set()
        # item id → rater → (created, record id, plausible); the latest verdict counts.
        self._votes: dict[str, dict[str, tuple[float, str, bool]]] = {}
        self._scores: dict[str, tuple[str, float]] = {}
        self._open: dict[Condition, list[_Entry]] = {}
        self._entry: dict[str, _Entry] = {}
        # condition → (model ref, open item ids not yet scored by it), built on first use.
        self._stale: dict[Condition, tuple[str, dict[str, None]]] = {}
        # (tenant, condition) → open items: a tenant's pending count without a scan.
        self._open_count: dict[tuple[str, Condition], int] = {}

    # -- writes -------------------------------------------------------------------------------
    def add_item(self, item: ReviewItem) -> None:
        with self._lock:
            if item.id in self._items:
                return
            self._items[item.id] = item
            self._open.setdefault(item.condition, [])
            self._place(item.id)

    def add_record(self, record: FeedbackRecord) -> None:
        if not record.item_id:
            return
        with self._lock:
            if record.id in self._seen_records:
                return
            self._seen_records.add(record.id)
            votes = self._votes.setdefault(record.item_id, {})
            old = votes.get(record.rater_id)
            if old is None or old[:2] < (record.created, record.id):
                votes[record.rater_id] = (record.created, record.id, record.plausible)
            self._place(record.item_id)

    def set_score(self, item_id_: str, ref: str, p_aligned: float) -> None:
        with self._lock:
            self._scores[item_id_] = (ref, p_aligned)
            item = self._items.get(item_id_)
            if item is not None:
                stale = self._stale.get(item.condition)
                if stale is not None and stale[0] == ref:
                    stale[1].pop(item_id_, None)
                self._place(item_id_)

    def _place(self, item_id_: str) -> None:
        """(Re)insert one item at its key, or drop it when it is full (lock held)."""
        item = self._items.get(item_id_)
        if item is None:
            return  # a judgement of an item not loaded yet: placed when the item comes
        lane = self._open[item.condition]
        old = self._entry.pop(item_id_, None)
        count = (item.tenant, item.condition)
        if old is not None:
            del lane[bisect.bisect_left(lane, old)]
            self._open_count[count] -= 1
        votes = self._votes.get(item_id_, {})
        stale = self._stale.get(item.condition)
        if len(votes) >= item.raters_per_item:
            if stale is not None:
                stale[1].pop(item_id_, None)
            return
        entry = (self.strategy.key(self._view(item)), item.created, item.id)
        bisect.insort(lane, entry)
        self._entry[item_id_] = entry
        self._open_count[count] = self._open_count.get(count, 0) + 1
        if stale is not None and self._scores.get(item_id_, ("",))[0] != stale[0]:
            stale[1][item_id_] = None

    def _view(self, item: ReviewItem) -> ItemView:
        votes = self._votes.get(item.id, {})
        yes = sum(v[2] for v in votes.values())
        return ItemView(item, self._score(item)[1], yes, len(votes) - yes)

    def _score(self, item: ReviewItem) -> tuple[str, float | None]:
        active = self._scores.get(item.id)
        return active if active is not None else (item.scored_by, item.p_aligned)

    # -- reads --------------------------------------------------------------------------------
    def score_of(self, item_id_: str) -> tuple[str, float] | None:
        with self._lock:
            return self._scores.get(item_id_)

    def queued(self, item: ReviewItem) -> QueuedItem:
        with self._lock:
            scored_by, p = self._score(item)
            return QueuedItem(item, len(self._votes.get(item.id, {})), p, scored_by)

    def conditions(self, condition: Condition | None = None) -> list[Condition]:
        """Conditions with open items (only ``condition`` when given)."""
        with self._lock:
            return [c for c, lane in self._open.items() if lane and condition in (None, c)]

    def next(
        self,
        rater_id: str,
        condition: Condition | None,
        limit: int,
        viewer: Viewer | None = None,
    ) -> list[QueuedItem]:
        """The first ``limit`` open items in strategy order the rater has not judged (of
        ``viewer``'s tenant; none / an admin: every tenant's)."""
        with self._lock:
            lanes = [lane for c, lane in self._open.items() if condition in (None, c)]
            ordered: Iterator[_Entry] = (
                lanes[0].__iter__() if len(lanes) == 1 else heapq.merge(*lanes)
            )
            out = []
            for _, _, iid in ordered:
                if rater_id in self._votes.get(iid, {}):
                    continue
                if viewer is not None and not viewer.sees(self._items[iid].tenant):
                    continue
                out.append(self.queued(self._items[iid]))
                if len(out) >= limit:
                    break
            return out

    def pending(self, condition: Condition | None = None, viewer: Viewer | None = None) -> int:
        """Open items (of ``condition``; of ``viewer``'s tenant unless none or an admin)."""
        with self._lock:
            if viewer is not None and not viewer.admin:
                return sum(
                    n
                    for (t, c), n in self._open_count.items()
                    if t == viewer.tenant and condition in (None, c)
                )
            return sum(len(lane) for c, lane in self._open.items() if condition in (None, c))

    def pending_by_condition(self, viewer: Viewer | None = None) -> dict[Condition, int]:
        """Open items per condition (of ``viewer``'s tenant unless none or an admin)."""
        with self._lock:
            if viewer is not None and not viewer.admin:
                return {c: n for (t, c), n in self._open_count.items() if t == viewer.tenant}
            return {c: len(lane) for c, lane in self._open.items()}

    def stale(self, condition: Condition, ref: str, limit: int) -> list[ReviewItem]:
        """Up to ``limit`` open items of ``condition`` not yet scored by model ``ref``.

        When the condition's reward model changes, the set is rebuilt once from its open items
        (O(open items), once per new model); afterwards scores and new items keep it current.
        """
        with self._lock:
            stale = self._stale.get(condition)
            if stale is None or stale[0] != ref:
                todo = {
                    e[2]: None
                    for e in self._open.get(condition, [])
                    if self._scores.get(e[2], ("",))[0] != ref
                }
                stale = (ref, todo)
                self._stale[condition] = stale
            out = []
            for iid in stale[1]:
                out.append(self._items[iid])
                if len(out) >= limit:
                    break
            return out


class ScoreBoard:
    """The active scores as the scoring code sees them: a mapping whose writes re-order."""

    def __init__(self, index: QueueIndex) -> None:
        self._index = index

    def get(
        self, item_id_: str, default: tuple[str, float] | tuple[str] = ("",)
    ) -> tuple[str, float] | tuple[str]:
        found = self._index.score_of(item_id_)
        return found if found is not None else default

    def __setitem__(self, item_id_: str, value: tuple[str, float]) -> None:
        self._index.set_score(item_id_, value[0], value[1])


class ReviewQueue:
    """Enqueue images for review and hand them out; scoring is the caller's (``score_items``)."""

    def __init__(
        self,
        store: ArtifactStore,
        feedback: FeedbackStore,
        index: QueueIndex,
        *,
        check_condition: Callable[[Condition | None, ValidationErrors, str], None],
        max_upload_bytes: int,
        max_request_pixels: int,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.feedback = feedback
        self.index = index
        self.check_condition = check_condition
        self.max_upload_bytes = max_upload_bytes
        self.max_request_pixels = max_request_pixels
        self.clock = clock

    def enqueue(
        self,
        images: Sequence[EnqueueImage],
        *,
        condition: Condition | None,
        raters_per_item: int,
        generator: str,
        shrink: Callable[[Condition, np.ndarray], np.ndarray] | None = None,
        tenant: str = "",
    ) -> tuple[list[ReviewItem], list[np.ndarray]]:
        """Validate, de-identify and store the images as items; returns items and pixels.

        ``shrink`` (the scorer's model-size input for the condition) is applied to each image
        as soon as it is decoded, so a request holds one full-size image at a time. The items
        belong to ``tenant`` (their ids derive from it: tenants never share an item).
        """
        errors = ValidationErrors()
        if not 1 <= len(images) <= MAX_ENQUEUE:
            errors.add("images", f"send 1..{MAX_ENQUEUE} images, got {len(images)}")
        if not 0 <= raters_per_item <= MAX_RATERS_PER_ITEM:
            errors.add("raters_per_item", f"must be 0..{MAX_RATERS_PER_ITEM}")
        conds = [im.condition or condition for im in images]
        for i, cond in enumerate(conds):
            where = f"images[{i}].condition" if images[i].condition else "condition"
            before = len(errors.violations)
            self.check_condition(cond, errors, where)
            if len(errors.violations) > before and not images[i].condition:
                break
        arrays: list[np.ndarray] = []
        uploads: list[tuple[bytes, str] | None] = []
        admitted: list[imgs.ImageInput] = []
        budget = PixelBudget(self.max_request_pixels)
        for i, im in enumerate(images):
            clean = im.image
            upload = None
            try:  # de-identified first: only the clean object is decoded, hashed and stored
                clean = imgs.admit(
                    im.image, field=f"images[{i}].image", max_bytes=self.max_upload_bytes
                )
                arr = imgs.decode(
                    clean,
                    field=f"images[{i}].image",
                    store=self.store,
                    max_bytes=self.max_upload_bytes,
                    budget=budget,
                )
                if clean.kind != "ref":  # a raw array's PNG needs the full-size pixels
                    upload = imgs.encoded_bytes(clean, arr)
                cond_i = conds[i]
                arrays.append(shrink(cond_i, arr) if shrink and cond_i is not None else arr)
                del arr
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
                arrays.append(np.zeros((1, 1), dtype=np.float32))
            admitted.append(clean)
            uploads.append(upload)
        errors.raise_if_any()
        now = self.clock()
        out = []
        for i, (im, clean, cond, upload) in enumerate(
            zip(images, admitted, conds, uploads, strict=True)
        ):
            assert cond is not None
            if upload is None:
                stored = imgs.stored_ref(
                    self.store, clean.key, f"images[{i}].image.ref.key", clean.viewer
                )
            else:
                stored = imgs.store_upload(self.store, *upload)
            item = ReviewItem(
                id=item_id(cond, stored.sha256, tenant),
                condition=cond,
                image_key=stored.key,
                image_sha256=stored.sha256,
                image_size=stored.size,
                raters_per_item=raters_per_item or 1,
                generator=generator,
                name=im.name,
                created=now + i * 1e-6,
                tenant=tenant,
            )
            out.append(self.feedback.add_item(item))
        return out, arrays

    def next_items(
        self,
        rater_id: str,
        *,
        condition: Condition | None,
        limit: int,
        viewer: Viewer | None = None,
    ) -> tuple[list[QueuedItem], int]:
        items = self.index.next(rater_id, condition, limit or DEFAULT_LIMIT, viewer)
        return items, self.index.pending(condition, viewer)

    def item_png(self, item_id_: str, viewer: Viewer | None = None) -> bytes:
        item = self.feedback.item(item_id_, field="item_id", viewer=viewer)
        return imgs.display_png(self.store.get_bytes(item.image_key))
