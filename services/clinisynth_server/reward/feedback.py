"""Expert judgements and review items in the artifact store, plus an in-memory index.

Store layout (every object written once with ``put_if_absent``; nothing is ever rewritten):

- ``feedback/records/<id>.json`` — one judgement. ``id`` is derived from (rater, client request
  id), so a retried submission lands on the same key: of concurrent retries exactly one writes,
  the others read the stored record back (``duplicate``). The reply is sent only after the write
  returned (fsync'd locally, acknowledged by S3), hence "acknowledged = durable".
- ``feedback/images/<sha256><suffix>`` — uploaded images, by content.
- ``review/items/<id>.json`` — review queue items; ``id`` is derived from (condition, image
  digest), so enqueuing the same image twice gives the same item.

The index is rebuilt from the store at start and refreshed incrementally (only unseen keys are
read), so several service replicas over one store converge.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.reward.scoring import Condition
from clinisynth_server.store.base import ArtifactStore, encode_json

RECORDS_PREFIX = "feedback/records/"
ITEMS_PREFIX = "review/items/"


def feedback_id(rater_id: str, client_request_id: str) -> str:
    h = hashlib.sha256(f"{rater_id}\0{client_request_id}".encode()).hexdigest()
    return f"fb-{h[:32]}"


def item_id(condition: Condition, sha256: str) -> str:
    h = hashlib.sha256(f"{condition.key}\0{sha256}".encode()).hexdigest()
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


class FeedbackStore:
    """Durable writes of judgements and review items; a thread-safe index over them."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._records: dict[str, FeedbackRecord] = {}
        self._items: dict[str, ReviewItem] = {}
        self._seen: set[str] = set()

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
        return item

    # -- reads ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Load objects other replicas (or an earlier process) wrote."""
        with self._refresh_lock:
            for prefix, target, cls in (
                (RECORDS_PREFIX, self._records, FeedbackRecord),
                (ITEMS_PREFIX, self._items, ReviewItem),
            ):
                for info in self.store.list(prefix):
                    if info.key in self._seen or not info.key.endswith(".json"):
                        continue
                    try:
                        obj = cls.from_json(json.loads(self.store.get_bytes(info.key)))  # type: ignore[attr-defined]
                    except (ValueError, TypeError):
                        continue  # not ours; never fail a listing over one bad object
                    with self._lock:
                        target[obj.id] = obj  # type: ignore[index]
                        self._seen.add(info.key)

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

    def item(self, item_id_: str, *, field: str) -> ReviewItem:
        with self._lock:
            found = self._items.get(item_id_)
        if found is None:
            key = f"{ITEMS_PREFIX}{item_id_}.json"
            if item_id_ and "/" not in item_id_ and self.store.exists(key):
                found = ReviewItem.from_json(self.store.get_json(key))
                with self._lock:
                    self._items[found.id] = found
                    self._seen.add(key)
        if found is None:
            raise InvalidArgument.for_field(field, f"unknown review item {item_id_!r}")
        return found
