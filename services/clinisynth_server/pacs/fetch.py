"""PACS in: one DICOM instance fetched by its UIDs, de-identified before anything else sees it.

A request names an instance in a configured PACS (``[pacs.NAME]``, :mod:`.config`) by Study /
Series / SOP Instance UID. :class:`PacsReader` fetches it by the destination's ``retrieve``
method — DICOMweb WADO-RS (destinations with ``dicomweb_url``), DIMSE C-GET, or DIMSE C-MOVE to
a short-lived Storage SCP of ours (:class:`MoveScp`) — bounded in size and time, and passes
the bytes through :func:`imaging.deid.deidentify_input` — the same PS3.15 basic
profile every inline DICOM input gets — before returning them. The original UIDs never leave
this module: what the services keep is :meth:`PacsReader.lineage`, an HMAC-SHA256 of the three
UIDs under a salt held in the store (``LINEAGE_SALT_KEY``, a service namespace callers cannot
read), so an operator holding the salt can tell which PACS instance an output derives from.

Errors: a bad UID or an unknown PACS is INVALID_ARGUMENT naming the field
(``images[0].pacs.sop_uid``); an instance the PACS does not hold is NOT_FOUND naming the field
of the UID; a PACS that is down, refuses us or times out is UNAVAILABLE; an instance over the
size bound is INVALID_ARGUMENT; a PACS that does not know our C-MOVE destination AE is
FAILED_PRECONDITION (an operator fix, not a retry).

Time: every fetch runs under a :class:`Budget` — the destination's ``timeout_s``, capped by the
remaining time of the calling RPC (``timeout_s`` of :meth:`PacsReader.fetch`, a plain number the
servicer passes; a slice of it is kept back so the error reaches the caller before its own
deadline). The budget caps every network wait (HTTP connect / read, ACSE / DIMSE / network /
connection timeouts) and the whole fetch: a PACS that accepts the connection and never answers
is given up when the budget is spent. The code then says which limit was hit: the call's
deadline → DEADLINE_EXCEEDED (``PACS_DEADLINE_EXCEEDED``: the caller may retry with a longer
deadline); the destination's own ``timeout_s`` → UNAVAILABLE (the PACS is treated as down).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import pydicom
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

# pynetdicom builds its SOP class names at import time; mypy cannot see them.
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.transport import ThreadedAssociationServer

from clinisynth_server.errors import (
    ClinisynthError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    ValidationErrors,
)
from clinisynth_server.imaging import deid
from clinisynth_server.pacs.config import PacsDestination
from clinisynth_server.pacs.cstore import _tls_args
from clinisynth_server.store.base import ArtifactStore

log = logging.getLogger(__name__)


class _DropWadoUrls(logging.Filter):
    """urllib3's debug lines show request paths; a WADO-RS path holds the original UIDs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/studies/" not in record.getMessage()


# pynetdicom logs every C-GET identifier (the original UIDs) at INFO: keep only its warnings.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
logging.getLogger("urllib3.connectionpool").addFilter(_DropWadoUrls())

#: The salt of the lineage hash; under the PACS namespace, which callers can never read.
LINEAGE_SALT_KEY = "pacs-outbox/secrets/lineage-salt.txt"
#: The most bytes one fetched instance may have (a large radiograph is ~ 20-50 MiB).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_UID_CHARS = 64
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_CHUNK = 1 << 16
#: C-GET statuses with which the peer answers "done" (success, or warning: some sub-operations
#: failed) rather than "cannot process".
_GET_DONE = {0x0000, 0xB000}
#: C-MOVE: "move destination unknown" — the PACS has no entry for our Storage SCP's AE title.
_MOVE_DESTINATION_UNKNOWN = 0xA801
#: C-STORE status our move SCP answers for an instance no fetch is waiting for.
_NOT_AUTHORIZED = 0x0124
_T = TypeVar("_T")


@dataclass(frozen=True)
class Budget:
    """How long one fetch may take, and which limit that is (see the module doc)."""

    seconds: float
    by_deadline: bool
    ends: float  # time.monotonic() after which the fetch is given up
    grace: float = 0.0  # what the watchdog waits beyond ``ends`` for the fetch to unwind

    def left(self) -> float:
        """The time still allowed, never below a millisecond (a zero socket timeout polls)."""
        return max(self.ends - time.monotonic(), 1e-3)

    def spent(self) -> bool:
        """Whether (nearly) all of it is gone: a failure now is a timeout, not a refusal."""
        return time.monotonic() >= self.ends - 0.05 * self.seconds

    def expired(self, dest: PacsDestination, field_name: str, what: str) -> ClinisynthError:
        """The error for a fetch that ran out of time, by the limit that bound it."""
        if self.by_deadline:
            return DeadlineExceeded(
                f"{field_name}: PACS {dest.name!r} did not answer {what} within the "
                f"{self.seconds:.2f} s left of the call's deadline",
                reason="PACS_DEADLINE_EXCEEDED",
                metadata={"field": field_name, "pacs": dest.name},
            )
        return Unavailable(
            f"{field_name}: PACS {dest.name!r} did not answer {what} within its timeout_s of "
            f"{self.seconds:.2f} s",
            reason="PACS_UNAVAILABLE",
        )


def budget_for(dest: PacsDestination, timeout_s: float | None, field_name: str) -> Budget:
    """The destination's ``timeout_s``, capped by the caller's remaining ``timeout_s`` less a
    reserve (a tenth, 50 ms .. 1 s) in which the error travels back before the caller gives up.
    Nothing left → DEADLINE_EXCEEDED at once, without touching the network."""
    now = time.monotonic()
    if timeout_s is None:
        return Budget(dest.timeout_s, False, now + dest.timeout_s, 0.5)
    reserve = min(max(0.1 * timeout_s, 0.05), 1.0)
    usable = timeout_s - reserve
    if usable <= 0.0:
        raise DeadlineExceeded(
            f"{field_name}: the call's deadline leaves no time to fetch from PACS {dest.name!r}",
            reason="PACS_DEADLINE_EXCEEDED",
            metadata={"field": field_name, "pacs": dest.name},
        )
    if usable < dest.timeout_s:
        return Budget(usable, True, now + usable, reserve / 2)
    return Budget(dest.timeout_s, False, now + dest.timeout_s, reserve / 2)


def _bounded(work: Callable[[], _T], budget: Budget, dest: PacsDestination, field_name: str) -> _T:
    """``work()`` in a worker thread, waited for no longer than the budget (plus its grace).

    The network timeouts inside ``work`` are capped by the same budget, so an abandoned worker
    ends on its own shortly after; the caller is answered in time either way."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the waiting caller, raised there
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"pacs-fetch-{dest.name}", daemon=True)
    worker.start()
    worker.join(max(budget.ends - time.monotonic(), 0.0) + budget.grace)
    if worker.is_alive():
        raise budget.expired(dest, field_name, "the fetch")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]  # always a BaseException, set by run()
    return outcome["value"]  # type: ignore[return-value]  # set by run() when no error was


@dataclass(frozen=True)
class PacsRef:
    """An instance in a named PACS, as a request gives it."""

    pacs: str
    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class FetchedInstance:
    """A fetched instance as the service may hold it: de-identified bytes and lineage."""

    data: bytes
    pacs: str
    lineage: str

    def provenance(self) -> dict[str, str]:
        """What an output's provenance records about this input (no original identifier)."""
        return {"input_source": "pacs", "input_pacs": self.pacs, "input_lineage": self.lineage}


def check_uid(value: str, field_name: str, errors: ValidationErrors) -> None:
    """DICOM UID grammar (PS3.5 §9.1): numeric components, no leading zeros, ≤ 64 chars."""
    if not value:
        errors.add(field_name, "required: a DICOM UID")
    elif len(value) > MAX_UID_CHARS:
        errors.add(field_name, f"a DICOM UID has at most {MAX_UID_CHARS} characters")
    elif not _UID_RE.fullmatch(value):
        errors.add(
            field_name,
            "not a DICOM UID: digits in dot-separated components, no leading zeros "
            "(e.g. 1.2.840.10008.1.1)",
        )


def check_ref(
    ref: PacsRef, destinations: Mapping[str, PacsDestination], field_name: str
) -> PacsDestination:
    """The destination ``ref`` names; INVALID_ARGUMENT naming every bad field at once."""
    errors = ValidationErrors()
    if not ref.pacs:
        errors.add(f"{field_name}.pacs", "required: the name of a configured PACS")
    elif ref.pacs not in destinations:
        known = ", ".join(sorted(destinations)) or "none configured"
        errors.add(f"{field_name}.pacs", f"unknown PACS {ref.pacs!r} ({known})")
    check_uid(ref.study_uid, f"{field_name}.study_uid", errors)
    check_uid(ref.series_uid, f"{field_name}.series_uid", errors)
    check_uid(ref.sop_uid, f"{field_name}.sop_uid", errors)
    errors.raise_if_any()
    return destinations[ref.pacs]


def _too_big(field_name: str, max_bytes: int) -> InvalidArgument:
    return InvalidArgument.for_field(
        field_name, f"the PACS instance is over the limit of {max_bytes} bytes"
    )


def _first_part(body: bytes, content_type: str) -> bytes:
    """The first body part of a multipart/related answer (PS3.18 §8.6.1.2)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError(f"no multipart boundary in {content_type!r}")
    delimiter = b"--" + match.group(1).strip().encode()
    start = body.find(delimiter)
    if start < 0:
        raise ValueError("no body part")
    head_end = body.find(b"\r\n\r\n", start)
    if head_end < 0:
        raise ValueError("body part without headers")
    end = body.find(b"\r\n" + delimiter, head_end + 4)
    if end < 0:
        raise ValueError("body part not terminated")
    return body[head_end + 4 : end]


def wado_rs(
    dest: PacsDestination,
    ref: PacsRef,
    *,
    field: str,
    max_bytes: int,
    budget: Budget | None = None,
) -> bytes:
    """GET one instance (Part 10 bytes) with WADO-RS: ``/studies/…/series/…/instances/…``."""
    budget = budget or budget_for(dest, None, field)
    url = (
        f"{dest.dicomweb_url}/studies/{ref.study_uid}/series/{ref.series_uid}"
        f"/instances/{ref.sop_uid}"
    )
    headers = {"Accept": 'multipart/related; type="application/dicom"'}
    token = dest.token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    cert = (dest.cert_file, dest.key_file) if dest.cert_file else None
    try:
        with requests.get(
            url,
            headers=headers,
            timeout=budget.left(),  # connect, then each read
            verify=dest.ca_file or True,
            cert=cert,
            stream=True,
        ) as resp:
            if resp.status_code == 404:
                raise NotFound(
                    f"{field}.sop_uid: PACS {dest.name!r} holds no such instance in that "
                    "study and series",
                    reason="PACS_INSTANCE_NOT_FOUND",
                    metadata={"field": f"{field}.sop_uid"},
                )
            if resp.status_code != 200:
                raise Unavailable(
                    f"{field}: PACS {dest.name!r} answered WADO-RS with HTTP {resp.status_code}",
                    reason="PACS_UNAVAILABLE",
                )
            declared = int(resp.headers.get("Content-Length") or 0)
            if declared > max_bytes + _CHUNK:
                raise _too_big(field, max_bytes)
            body = bytearray()
            for chunk in resp.iter_content(_CHUNK):
                body += chunk
                if len(body) > max_bytes + _CHUNK:  # multipart framing is a few hundred bytes
                    raise _too_big(field, max_bytes)
                if time.monotonic() >= budget.ends:  # a peer trickling bytes
                    raise budget.expired(dest, field, "WADO-RS")
            content_type = resp.headers.get("Content-Type", "")
    except (requests.Timeout, TimeoutError) as exc:
        raise budget.expired(dest, field, "WADO-RS") from exc
    except (requests.RequestException, ssl.SSLError, OSError) as exc:
        raise Unavailable(
            f"{field}: PACS {dest.name!r} unreachable: {type(exc).__name__}",
            reason="PACS_UNAVAILABLE",
        ) from exc
    try:
        part = _first_part(bytes(body), content_type)
    except ValueError as exc:
        raise Unavailable(
            f"{field}: PACS {dest.name!r} sent no DICOM body part: {exc}",
            reason="PACS_UNAVAILABLE",
        ) from exc
    if len(part) > max_bytes:
        raise _too_big(field, max_bytes)
    return part


def _query(ref: PacsRef) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = ref.study_uid
    query.SeriesInstanceUID = ref.series_uid
    query.SOPInstanceUID = ref.sop_uid
    return query


def _timed_ae(ae_title: str, budget: Budget) -> AE:
    """An AE whose every wait (TCP connect, ACSE, DIMSE, network idle) is the budget's rest."""
    ae = AE(ae_title=ae_title)
    left = budget.left()
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = left
    return ae


def _associate(
    ae: AE,
    dest: PacsDestination,
    budget: Budget,
    field: str,
    **kwargs: object,
) -> Association:
    """An established association to ``dest``; UNAVAILABLE, or the budget's error when its
    time ran out before the peer answered."""
    try:
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.called_ae,
            tls_args=_tls_args(dest),
            **kwargs,  # type: ignore[arg-type]  # ext_neg / evt_handlers, typed by pynetdicom
        )
    except (OSError, ssl.SSLError) as exc:
        if budget.spent():
            raise budget.expired(dest, field, "the association request") from exc
        raise Unavailable(
            f"{field}: PACS {dest.name!r} unreachable: {type(exc).__name__}",
            reason="PACS_UNAVAILABLE",
        ) from exc
    if not assoc.is_established:
        if not assoc.is_rejected and budget.spent():
            raise budget.expired(dest, field, "the association request")
        raise Unavailable(
            f"{field}: PACS {dest.name!r} ({dest.host}:{dest.port}) rejected or never "
            "established the association",
            reason="PACS_UNAVAILABLE",
        )
    return assoc


def c_get(
    dest: PacsDestination,
    ref: PacsRef,
    *,
    field: str,
    max_bytes: int,
    budget: Budget | None = None,
) -> bytes:
    """C-GET one instance at IMAGE level; the peer sends it back on the same association."""
    budget = budget or budget_for(dest, None, field)
    ae = _timed_ae(dest.ae_title, budget)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for context in StoragePresentationContexts[:127]:  # 128 contexts at most, one is the GET
        assert context.abstract_syntax is not None
        ae.add_requested_context(context.abstract_syntax)
        roles.append(build_role(context.abstract_syntax, scp_role=True))
    received: list[bytes] = []
    oversized = threading.Event()

    def on_store(event: evt.Event) -> int:
        data = event.encoded_dataset(include_meta=True)
        if len(data) > max_bytes:
            oversized.set()
            return 0xA700  # out of resources: refused
        received.append(data)
        return 0x0000

    assoc = _associate(
        ae, dest, budget, field, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    final: int | None = None
    try:
        for status, _ in assoc.send_c_get(_query(ref), StudyRootQueryRetrieveInformationModelGet):
            if status and "Status" in status:
                final = int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()
    if oversized.is_set():
        raise _too_big(field, max_bytes)
    if received:
        return received[0]
    if final is None:
        if budget.spent():
            raise budget.expired(dest, field, "the C-GET")
        raise Unavailable(
            f"{field}: PACS {dest.name!r} aborted the C-GET",
            reason="PACS_UNAVAILABLE",
        )
    raise NotFound(
        f"{field}.sop_uid: PACS {dest.name!r} holds no such instance in that study and series "
        f"(C-GET status 0x{final:04X})",
        reason="PACS_INSTANCE_NOT_FOUND",
        metadata={"field": f"{field}.sop_uid"},
    )


@dataclass
class _Wait:
    """One C-MOVE fetch waiting at the Storage SCP for its instance."""

    max_bytes: int
    received: list[bytes] = field(default_factory=list)
    oversized: bool = False


class MoveScp:
    """Our Storage SCP for C-MOVE on one address / port / AE title, shared by the concurrent
    fetches that use it: the first starts it, the last stops it (it listens only while a fetch
    waits). An arriving instance goes to the fetches waiting for its SOP Instance UID; one no
    fetch asked for is refused, so the port is no way to push objects into the service."""

    _live: ClassVar[dict[tuple[str, int, str], MoveScp]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, host: str, port: int, ae_title: str) -> None:
        self.key = (host, port, ae_title)
        self._users = 0
        self._waits: dict[str, list[_Wait]] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    @classmethod
    def acquire(cls, dest: PacsDestination, field_name: str) -> MoveScp:
        """The SCP for ``dest``'s move address, started if none is listening yet."""
        key = (dest.move_host, dest.move_port, dest.move_ae_title)
        with cls._registry_lock:
            scp = cls._live.get(key)
            if scp is None:
                scp = cls(*key)
                scp._start(dest, field_name)
                cls._live[key] = scp
            scp._users += 1
            return scp

    def release(self) -> None:
        """One user fewer; the last one stops the server."""
        with self._registry_lock:
            self._users -= 1
            if self._users > 0:
                return
            self._live.pop(self.key, None)
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def _start(self, dest: PacsDestination, field_name: str) -> None:
        ae = AE(ae_title=self.key[2])
        ae.require_called_aet = True  # only associations addressed to our move AE
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
        for context in StoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax)
        try:
            self._server = ae.start_server(
                (self.key[0], self.key[1]),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            )
        except OSError as exc:
            raise Unavailable(
                f"{field_name}: cannot listen for C-MOVE of PACS {dest.name!r} on "
                f"{self.key[0]}:{self.key[1]}: {type(exc).__name__}",
                reason="PACS_MOVE_SCP_UNAVAILABLE",
            ) from exc

    def expect(self, sop_uid: str, max_bytes: int) -> _Wait:
        wait = _Wait(max_bytes)
        with self._lock:
            self._waits.setdefault(sop_uid, []).append(wait)
        return wait

    def forget(self, sop_uid: str, wait: _Wait) -> None:
        with self._lock:
            waits = self._waits.get(sop_uid, [])
            if wait in waits:
                waits.remove(wait)
            if not waits:
                self._waits.pop(sop_uid, None)

    def _on_store(self, event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)  # the one event this SCP handles
        sop_uid = str(request.AffectedSOPInstanceUID)
        with self._lock:
            waits = list(self._waits.get(sop_uid, []))
        if not waits:
            log.warning("C-MOVE SCP %s: refused an instance no fetch waits for", self.key[2])
            return _NOT_AUTHORIZED
        data = event.encoded_dataset(include_meta=True)
        status = 0x0000
        for wait in waits:
            if len(data) > wait.max_bytes:
                wait.oversized = True
                status = 0xA700  # out of resources: refused
            elif not wait.received:
                wait.received.append(data)
        return status


def c_move(
    dest: PacsDestination,
    ref: PacsRef,
    *,
    field: str,
    max_bytes: int,
    budget: Budget | None = None,
) -> bytes:
    """C-MOVE one instance at IMAGE level to our Storage SCP (:class:`MoveScp`), which listens
    from before the request until the PACS's final response."""
    budget = budget or budget_for(dest, None, field)
    scp = MoveScp.acquire(dest, field)
    wait = scp.expect(ref.sop_uid, max_bytes)
    final: int | None = None
    attempted = 0
    holds: bool | None = None
    try:
        ae = _timed_ae(dest.ae_title, budget)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = _associate(ae, dest, budget, field)
        try:
            for status, _ in assoc.send_c_move(
                _query(ref), dest.move_ae_title, StudyRootQueryRetrieveInformationModelMove
            ):
                if status and "Status" in status:
                    final = int(status.Status)
                    attempted = sum(
                        int(status.get(k, 0) or 0)
                        for k in (
                            "NumberOfCompletedSuboperations",
                            "NumberOfFailedSuboperations",
                            "NumberOfWarningSuboperations",
                        )
                    )
            if final is not None and not wait.received and not wait.oversized:
                holds = _holds(assoc, ref)  # a failed move: absent instance, or our setup?
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        scp.forget(ref.sop_uid, wait)
        scp.release()
    if wait.oversized:
        raise _too_big(field, max_bytes)
    if wait.received:
        return wait.received[0]
    if final is None:
        if budget.spent():
            raise budget.expired(dest, field, "the C-MOVE")
        raise Unavailable(
            f"{field}: PACS {dest.name!r} aborted the C-MOVE", reason="PACS_UNAVAILABLE"
        )
    if holds is False:
        raise NotFound(
            f"{field}.sop_uid: PACS {dest.name!r} holds no such instance in that study and "
            f"series (C-MOVE status 0x{final:04X}, C-FIND found none)",
            reason="PACS_INSTANCE_NOT_FOUND",
            metadata={"field": f"{field}.sop_uid"},
        )
    if final == _MOVE_DESTINATION_UNKNOWN or (holds and not attempted):
        raise FailedPrecondition(
            f"{field}: PACS {dest.name!r} refused to move the instance to "
            f"{dest.move_ae_title!r} (C-MOVE status 0x{final:04X}): the PACS must list AE "
            f"{dest.move_ae_title} at this service's address, port {dest.move_port}, as a "
            "DICOM node",
            reason="PACS_MOVE_DESTINATION_UNKNOWN",
            metadata={"field": field, "pacs": dest.name},
        )
    raise Unavailable(
        f"{field}: PACS {dest.name!r} could not deliver the instance to the move destination "
        f"{dest.move_ae_title!r} (C-MOVE status 0x{final:04X})",
        reason="PACS_UNAVAILABLE",
    )


def _holds(assoc: Association, ref: PacsRef) -> bool | None:
    """Whether the PACS finds the instance (C-FIND at IMAGE level); None when it cannot say."""
    found = False
    try:
        for status, identifier in assoc.send_c_find(
            _query(ref), StudyRootQueryRetrieveInformationModelFind
        ):
            if not status or "Status" not in status:
                return None
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                found = True
            elif code != 0x0000:
                return None
    except (OSError, ValueError, RuntimeError):
        return None
    return found


def _check_identity(data: bytes, ref: PacsRef, dest: PacsDestination, field: str) -> None:
    """The PACS sent the instance asked for (a misrouted answer is the PACS's fault)."""
    if not (len(data) >= 132 and data[128:132] == b"DICM"):
        raise Unavailable(
            f"{field}: PACS {dest.name!r} sent an object that is not a DICOM Part 10 file",
            reason="PACS_UNAVAILABLE",
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        got = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    except Exception as exc:  # hostile or broken answer: described without its contents
        raise InvalidArgument.for_field(
            field, f"PACS {dest.name!r} sent an object that is not readable DICOM"
        ) from exc
    if got != (ref.study_uid, ref.series_uid, ref.sop_uid):
        raise Unavailable(
            f"{field}: PACS {dest.name!r} answered with another instance than the one asked for",
            reason="PACS_UNAVAILABLE",
        )


def retriever(dest: PacsDestination) -> Callable[..., bytes]:
    """The fetch function of ``dest``'s retrieve method."""
    if dest.protocol == "dicomweb":
        return wado_rs
    return c_move if dest.retrieve == "c-move" else c_get


class PacsReader:
    """Fetches referenced instances from the configured PACS and de-identifies them."""

    def __init__(
        self,
        destinations: Mapping[str, PacsDestination],
        store: ArtifactStore,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.destinations = dict(destinations)
        self.store = store
        self.max_bytes = max_bytes
        self._salt: bytes | None = None
        self._lock = threading.Lock()

    def _lineage_salt(self) -> bytes:
        with self._lock:
            if self._salt is None:
                self.store.put_if_absent(LINEAGE_SALT_KEY, secrets.token_hex(32).encode())
                self._salt = self.store.get_bytes(LINEAGE_SALT_KEY).strip()
            return self._salt

    def lineage(self, ref: PacsRef) -> str:
        """``hmac-sha256:<hex>`` over the three original UIDs (the same instance read from
        two PACS, or by WADO-RS and by C-GET, has one lineage)."""
        message = "\x00".join((ref.study_uid, ref.series_uid, ref.sop_uid)).encode()
        digest = hmac.new(self._lineage_salt(), message, hashlib.sha256).hexdigest()
        return f"hmac-sha256:{digest}"

    def fetch(
        self,
        ref: PacsRef,
        *,
        field: str,
        max_bytes: int | None = None,
        timeout_s: float | None = None,
    ) -> FetchedInstance:
        """The instance, de-identified (INVALID_ARGUMENT / NOT_FOUND / UNAVAILABLE /
        DEADLINE_EXCEEDED otherwise). ``timeout_s``: what is left of the calling RPC's deadline
        (None: no deadline), which caps the destination's own ``timeout_s``."""
        dest = check_ref(ref, self.destinations, field)
        limit = min(max_bytes or self.max_bytes, self.max_bytes)
        budget = budget_for(dest, timeout_s, field)
        get = retriever(dest)
        data = _bounded(
            lambda: get(dest, ref, field=field, max_bytes=limit, budget=budget),
            budget,
            dest,
            field,
        )
        _check_identity(data, ref, dest, field)
        clean = deid.deidentify_input(data, field=field)
        fetched = FetchedInstance(clean, dest.name, self.lineage(ref))
        log.info(
            "%s: fetched from PACS %s (%s), lineage %s: %s",
            field,
            dest.name,
            dest.retrieve if dest.protocol == "dimse" else "wado",
            fetched.lineage,
            deid.safe_log_repr(clean),
        )
        return fetched


__all__ = [
    "DEFAULT_MAX_BYTES",
    "LINEAGE_SALT_KEY",
    "Budget",
    "FetchedInstance",
    "MoveScp",
    "PacsReader",
    "PacsRef",
    "budget_for",
    "c_get",
    "c_move",
    "check_ref",
    "check_uid",
    "retriever",
    "wado_rs",
]
