"""Expert judgements and review items in the artifact store, plus an in-memory index.

Store layout (every object written once with ``put_if_absent``; nothing is ever rewritten):

- ``feedback/records/<id>.json`` — one judgement. ``id`` is derived from (rater, client request
  id), so a retried submission lands on the same key: of concurrent retries exactly one writes,
  the others read the stored record back (``duplicate``). The reply is sent only after the write
  returned (fsync'd locally, acknowledged by S3), hence "acknowledged = durable".
- ``feedback/images/<sha256><suffix>`` — uploaded images, by content.
- ``review/items/<id>.json`` — review queue items; ``id`` is derived from (condition, image
  digest), so enqueuing the same image twice gives the same item.

Records and items carry the ``tenant`` of the identity that made them (``tenancy``); the ids of
a tenant's records and items also derive from it, so two tenants never share one. Records from
before tenants existed have no ``tenant``: they belong to tenant ``""`` and keep their ids.

The index is rebuilt from the store at start and refreshed incrementally (only unseen keys are
read), so several service replicas over one store converge. Derived indexes (the review queue's
order, agreement) ``subscribe`` and see every record and item exactly as the index does: the ones
loaded so far at once, each later one as it is written or loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.reward.scoring import Condition
from clinisynth_server.store.base import ArtifactStore, encode_json
from clinisynth_server.tenancy import Viewer

log = logging.getLogger(__name__)
RECORDS_PREFIX = "feedback/records/"
ITEMS_PREFIX = "review/items/"


def feedback_id(rater_id: str, client_request_id: str, tenant: str = "") -> str:
    seed = f"{rater_id}\0{client_request_id}" + (f"\0{tenant}" if tenant else "")
    h = hashlib.sha256(seed.encode()).hexdigest()
    return f"fb-{h[:32]}"


def item_id(condition: Condition, sha256: str, tenant: str = "") -> str:
    seed = f"{condition.key}\0{sha256}" + (f"\0{tenant}" if tenant else "")
    h = hashlib.sha256(seed.encode()).hexdigest()
    return f"ri-{h[:24]}"


@dataclass(frozen=True)
class FeedbackRecord:
    id: str
    client_request_id: str
    rater_id: str
    condition: Condition
    plausible: bool
    image_key: str
    image_sha256: str
    image_size: int = 0
    item_id: str = ""
    criteria: dict[str, bool] = field(default_factory=dict)
    comment: str = ""
    time_spent_ms: int = 0
    generator: str = ""  # "name@version"
    created: float = 0.0
    tenant: str = ""  # the owner (tenancy)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["condition"] = self.condition.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeedbackRecord:
        data = dict(data)
        data["condition"] = Condition.from_json(data.get("condition", {}))
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def image_group(self) -> str:
        """What "the same image" means for agreement: the item, else the image digest."""
        return self.item_id or f"{self.condition.key}\0{self.image_sha256}"


@dataclass(frozen=True)
class ReviewItem:
    id: str
    condition: Condition
    image_key: str
    image_sha256: str
    image_size: int = 0
    raters_per_item: int = 1
    generator: str = ""
    name: str = ""
    created: float = 0.0
    # Score given at enqueue time (the service keeps fresher scores in memory).
    p_aligned: float | None = None
    scored_by: str = ""
    tenant: str = ""  # the owner (tenancy)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["condition"] = self.condition.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReviewItem:
        data = dict(data)
        data["condition"] = Condition.from_json(data.get("condition", {}))
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


_Stored = TypeVar("_Stored", FeedbackRecord, ReviewItem)


class FeedbackStore:
    """Durable writes of judgements and review items; a thread-safe index over them."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._records: dict[str, FeedbackRecord] = {}
        self._items: dict[str, ReviewItem] = {}
        self._seen: set[str] = set()
        self._record_listeners: list[Callable[[FeedbackRecord], None]] = []
        self._item_listeners: list[Callable[[ReviewItem], None]] = []
        self._refreshed = -float("inf")  # monotonic time the last refresh finished
        self._refreshing = False

    def subscribe(
        self,
        on_record: Callable[[FeedbackRecord], None],
        on_item: Callable[[ReviewItem], None],
    ) -> None:
        """Call these for every record / item held now and for each one added later."""
        with self._lock:
            self._record_listeners.append(on_record)
            self._item_listeners.append(on_item)
            items, records = list(self._items.values()), list(self._records.values())
        for item in items:
            on_item(item)
        for record in records:
            on_record(record)

    def _notify(self, obj: FeedbackRecord | ReviewItem) -> None:
        with self._lock:
            listeners: list[Callable[[Any], None]] = list(
                self._record_listeners if isinstance(obj, FeedbackRecord) else self._item_listeners
            )
        for listen in listeners:
            listen(obj)

    # -- writes -----------------------------------------------------------------------------
    def add(self, record: FeedbackRecord) -> tuple[FeedbackRecord, bool]:
        """Store ``record`` unless its id exists; returns (stored record, duplicate)."""
        key = f"{RECORDS_PREFIX}{record.id}.json"
        if self.store.put_if_absent(
            key, encode_json(record.to_json()), content_type="application/json"
        ):
            stored, duplicate = record, False
        else:
            stored, duplicate = FeedbackRecord.from_json(self.store.get_json(key)), True
        with self._lock:
            self._records[stored.id] = stored
            self._seen.add(key)
        self._notify(stored)
        return stored, duplicate

    def add_item(self, item: ReviewItem) -> ReviewItem:
        key = f"{ITEMS_PREFIX}{item.id}.json"
        if not self.store.put_if_absent(
            key, encode_json(item.to_json()), content_type="application/json"
        ):
            item = ReviewItem.from_json(self.store.get_json(key))
        with self._lock:
            self._items[item.id] = item
            self._seen.add(key)
        self._notify(item)
        return item

    # -- reads ------------------------------------------------------------------------------
    def refresh(self, max_age_s: float = 0.0) -> None:
        """Load objects other replicas (or an earlier process) wrote.

        Listing the store costs O(objects); hot paths pass ``max_age_s`` so other replicas'
        writes show within that many seconds (this process's own writes show at once).
        """
        with self._refresh_lock:
            if max_age_s > 0 and time.monotonic() - self._refreshed < max_age_s:
                return
            self._load_new(RECORDS_PREFIX, self._records, FeedbackRecord.from_json)
            self._load_new(ITEMS_PREFIX, self._items, ReviewItem.from_json)
            self._refreshed = time.monotonic()

    def refresh_soon(self, max_age_s: float) -> None:
        """Refresh in a background thread when the last one ended over ``max_age_s`` ago.

        For the hot paths (next items, agreement): they answer from the index at once and never
        wait for a store listing, whose cost grows with the store.
        """
        with self._lock:
            if self._refreshing or time.monotonic() - self._refreshed < max_age_s:
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.refresh()
            except Exception:  # a store outage: the index stays, the next call retries
                log.warning("feedback index refresh failed", exc_info=True)
            finally:
                with self._lock:
                    self._refreshing = False
                    self._refreshed = time.monotonic()

        threading.Thread(target=run, daemon=True, name="feedback-refresh").start()

    def _load_new(
        self, prefix: str, target: dict[str, _Stored], parse: Callable[[Any], _Stored]
    ) -> None:
        """Parse the ``.json`` objects under ``prefix`` not seen yet into ``target`` by id."""
        for info in self.store.list(prefix):
            if info.key in self._seen or not info.key.endswith(".json"):
                continue
            try:
                obj = parse(json.loads(self.store.get_bytes(info.key)))
            except (ValueError, TypeError):
                continue  # not ours; never fail a listing over one bad object
            with self._lock:
                target[obj.id] = obj
                self._seen.add(info.key)
            self._notify(obj)

    def records(self) -> list[FeedbackRecord]:
        with self._lock:
            out = list(self._records.values())
        out.sort(key=lambda r: (r.created, r.id))
        return out

    def items(self) -> list[ReviewItem]:
        with self._lock:
            out = list(self._items.values())
        out.sort(key=lambda r: (r.created, r.id))
        return out

    def record(self, record_id: str) -> FeedbackRecord | None:
        """The indexed record with this id, if any (no store read)."""
        with self._lock:
            return self._records.get(record_id)

    def item(self, item_id_: str, *, field: str, viewer: Viewer | None = None) -> ReviewItem:
        """The review item; another tenant's than ``viewer``'s is unknown, as a missing one."""
        with self._lock:
            found = self._items.get(item_id_)
        if found is None:
            key = f"{ITEMS_PREFIX}{item_id_}.json"
            if item_id_ and "/" not in item_id_ and self.store.exists(key):
                found = ReviewItem.from_json(self.store.get_json(key))
                with self._lock:
                    self._items[found.id] = found
                    self._seen.add(key)
                self._notify(found)
        if found is None or (viewer is not None and not viewer.sees(found.tenant)):
            raise InvalidArgument.for_field(field, f"unknown review item {item_id_!r}")
        return found
