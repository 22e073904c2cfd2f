"""Durable PACS outbox: DICOM objects are stored before the request is answered, then delivered.

Layout in the artifact store (a service namespace)::

    pacs-outbox/<origin service>/<destination>/<SOP Instance UID>/instance.dcm
    pacs-outbox/<origin service>/<destination>/<SOP Instance UID>/state.json

``state.json`` says ``pending`` / ``delivered`` / ``failed`` with attempts and the last error.
One worker thread per service delivers its own origin's pending items in batches, with
exponential backoff between attempts; an outage only delays delivery. The SOP Instance UID is
the key: enqueuing an instance again is a no-op, and a delivered one is never sent again. The
one window for a repeat is a crash between the PACS's answer and the state write; PACSes
store by SOP Instance UID, so a repeat replaces the same instance rather than adding one.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import pydicom

from clinisynth_server.errors import NotFound
from clinisynth_server.pacs.config import PacsDestination, load_destinations
from clinisynth_server.pacs.cstore import cstore
from clinisynth_server.pacs.stow import DeliveryError, stow
from clinisynth_server.runtime.config import ServiceConfig
from clinisynth_server.runtime.metrics import PacsMetrics
from clinisynth_server.store.base import ArtifactStore

log = logging.getLogger(__name__)

OUTBOX_NAMESPACE = "pacs-outbox/"
STATUSES = ("pending", "delivered", "failed")
#: Instances per STOW-RS request / C-STORE association.
BATCH = 16

Deliver = Callable[[PacsDestination, Sequence[tuple[str, bytes]]], set[str]]


def deliver(dest: PacsDestination, instances: Sequence[tuple[str, bytes]]) -> set[str]:
    """Send by the destination's protocol; the SOP Instance UIDs it stored."""
    return (stow if dest.protocol == "dicomweb" else cstore)(dest, instances)


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class OutboxItem:
    """The delivery state of one instance to one destination."""

    origin: str
    destination: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    request_id: str
    status: str = "pending"
    attempts: int = 0
    last_error: str = ""
    enqueued_at: float = 0.0
    next_attempt_at: float = 0.0
    delivered_at: float = 0.0

    @property
    def prefix(self) -> str:
        return f"{OUTBOX_NAMESPACE}{self.origin}/{self.destination}/{self.sop_instance_uid}/"


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1 = min(base_s * 2**(n-1), max_s); ``failed`` after max_attempts."""

    base_s: float = 2.0
    max_s: float = 300.0
    max_attempts: int = 20

    def delay(self, attempts: int) -> float:
        return min(self.base_s * 2 ** max(attempts - 1, 0), self.max_s)


class Outbox:
    """Enqueue (durable, synchronous) and deliver (background thread) DICOM instances."""

    def __init__(
        self,
        store: ArtifactStore,
        destinations: Mapping[str, PacsDestination],
        *,
        origin: str,
        backoff: Backoff = Backoff(),
        poll_s: float = 1.0,
        rescan_s: float = 30.0,
        deliver_fn: Deliver = deliver,
        metrics: PacsMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.destinations = dict(destinations)
        self.origin = origin
        self.backoff = backoff
        self.poll_s = poll_s
        self.rescan_s = rescan_s
        self.deliver_fn = deliver_fn
        self._pending: dict[str, OutboxItem] = {}  # key: prefix
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_scan = 0.0

    # -- enqueue ----------------------------------------------------------------------------
    def enqueue(
        self, destination: str, request_id: str, blobs: Sequence[bytes]
    ) -> list[OutboxItem]:
        """Write every instance and its ``pending`` state; returns once all are durable."""
        items = []
        for data in blobs:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            now = _now()
            item = OutboxItem(
                origin=self.origin,
                destination=destination,
                sop_instance_uid=str(ds.SOPInstanceUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                request_id=request_id,
                enqueued_at=now,
                next_attempt_at=now,
            )
            if self.store.exists(item.prefix + "state.json"):  # queued before: keyed by SOP UID
                items.append(self._read(item.prefix))
                continue
            # The instance first, so a pending state never points at a missing instance.
            self.store.put_bytes(
                item.prefix + "instance.dcm", data, content_type="application/dicom"
            )
            if self.store.put_if_absent(item.prefix + "state.json", _encode(item)):
                with self._lock:
                    self._pending[item.prefix] = item
            else:
                item = self._read(item.prefix)
            items.append(item)
        self._count_pending()
        self._wake.set()
        return items

    # -- state ------------------------------------------------------------------------------
    def _read(self, prefix: str) -> OutboxItem:
        return OutboxItem(**self.store.get_json(prefix + "state.json"))

    def _write(self, item: OutboxItem) -> None:
        self.store.put_bytes(
            item.prefix + "state.json", _encode(item), content_type="application/json"
        )

    def list(self, *, status: str = "", destination: str = "") -> builtins.list[OutboxItem]:
        """Every item of every origin (the store is shared), oldest first."""
        items = []
        for info in self.store.list(OUTBOX_NAMESPACE):
            if not info.key.endswith("/state.json"):
                continue
            try:
                item = self._read(info.key.removesuffix("state.json"))
            except NotFound:
                continue
            if (not status or item.status == status) and (
                not destination or item.destination == destination
            ):
                items.append(item)
        return sorted(items, key=lambda i: (i.enqueued_at, i.sop_instance_uid))

    def _rescan(self) -> None:
        """Pick up pending items written before a restart (or by another replica's enqueue)."""
        mine = [i for i in self.list(status="pending") if i.origin == self.origin]
        with self._lock:
            for item in mine:
                self._pending.setdefault(item.prefix, item)
        self._last_scan = _now()
        self._count_pending()

    # -- delivery ---------------------------------------------------------------------------
    def deliver_due(self) -> int:
        """One pass: deliver every due pending item; returns how many were delivered."""
        now = _now()
        if now - self._last_scan >= self.rescan_s:
            self._rescan()
        with self._lock:
            due = [i for i in self._pending.values() if i.next_attempt_at <= now]
        by_dest: dict[str, builtins.list[OutboxItem]] = {}
        for item in due:
            by_dest.setdefault(item.destination, []).append(item)
        delivered = 0
        for name, items in by_dest.items():
            for start in range(0, len(items), BATCH):
                delivered += self._deliver_batch(name, items[start : start + BATCH])
        return delivered

    def _deliver_batch(self, name: str, items: builtins.list[OutboxItem]) -> int:
        dest = self.destinations.get(name)
        payload: builtins.list[tuple[str, bytes]] = []
        ready: builtins.list[OutboxItem] = []
        for item in items:
            if self._read(item.prefix).status != "pending":  # settled elsewhere
                self._forget(item)
                continue
            try:
                payload.append(
                    (item.sop_instance_uid, self.store.get_bytes(item.prefix + "instance.dcm"))
                )
                ready.append(item)
            except NotFound:
                self._settle(item, "failed", "instance.dcm missing from the outbox")
        if not ready:
            return 0
        error = ""
        stored: set[str] = set()
        if dest is None:
            error = f"destination {name!r} is no longer configured"
        else:
            try:
                stored = self.deliver_fn(dest, payload)
            except DeliveryError as exc:
                error = str(exc)
            except Exception as exc:  # a bug in one batch must not stop the worker
                log.exception("PACS delivery to %s failed unexpectedly", name)
                error = f"{type(exc).__name__}: {exc}"
        for item in ready:
            if item.sop_instance_uid in stored:
                self._settle(item, "delivered", "")
            else:
                self._retry(item, error or "not stored by the destination")
        return sum(1 for i in ready if i.sop_instance_uid in stored)

    def _forget(self, item: OutboxItem) -> None:
        with self._lock:
            self._pending.pop(item.prefix, None)
        self._count_pending()

    def _count(self, item: OutboxItem, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.deliveries.labels(self.origin, item.destination, outcome).inc()

    def _count_pending(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            counts = {name: 0 for name in self.destinations}
            for item in self._pending.values():
                counts[item.destination] = counts.get(item.destination, 0) + 1
        for name, n in counts.items():
            self.metrics.pending.labels(self.origin, name).set(n)

    def _settle(self, item: OutboxItem, status: str, error: str) -> None:
        now = _now()
        done = replace(
            item,
            status=status,
            attempts=item.attempts + 1,
            last_error=error,
            delivered_at=now if status == "delivered" else 0.0,
        )
        self._write(done)
        self._count(item, status)
        if status == "delivered":
            self.store.delete(item.prefix + "instance.dcm")
        self._forget(item)

    def _retry(self, item: OutboxItem, error: str) -> None:
        attempts = item.attempts + 1
        if attempts >= self.backoff.max_attempts:
            log.warning(
                "PACS %s: giving up on %s: %s", item.destination, item.sop_instance_uid, error
            )
            self._settle(replace(item, attempts=attempts - 1), "failed", error)
            return
        later = replace(
            item,
            attempts=attempts,
            last_error=error,
            next_attempt_at=_now() + self.backoff.delay(attempts),
        )
        self._write(later)
        self._count(item, "retried")
        with self._lock:
            if item.prefix in self._pending:
                self._pending[item.prefix] = later

    # -- the worker thread ------------------------------------------------------------------
    def start(self) -> Outbox:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pacs-outbox", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # the store itself down: keep trying, nothing is lost
                log.exception("PACS outbox pass failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()


def _encode(item: OutboxItem) -> bytes:
    return json.dumps(asdict(item), sort_keys=True).encode()


def open_outbox(
    config: ServiceConfig, store: ArtifactStore, metrics: PacsMetrics | None = None
) -> Outbox:
    """The service's outbox over its ``[pacs.NAME]`` destinations; the worker runs when any.

    Tuning (``CLINISYNTH_<SERVICE>_PACS_*``): ``retry_base_s`` (2), ``retry_max_s`` (300),
    ``max_attempts`` (20), ``poll_s`` (1).
    """
    destinations = load_destinations(config.config_file)
    outbox = Outbox(
        store,
        destinations,
        origin=config.service,
        backoff=Backoff(
            base_s=float(config.get("pacs_retry_base_s", "2")),
            max_s=float(config.get("pacs_retry_max_s", "300")),
            max_attempts=int(config.get("pacs_max_attempts", "20")),
        ),
        poll_s=float(config.get("pacs_poll_s", "1")),
        metrics=metrics,
    )
    return outbox.start() if destinations else outbox
