"""The audit trail: one append-only record per RPC call, kept in the artifact store.

What a record holds (:class:`AuditRecord`): when the call started, the principal (name, tenant,
how it authenticated), the RPC, the models it named or was served by (name, version, weights
digest), the request id, the final status code, the bytes and messages received and sent, the
duration and the peer address. What it never holds: request or response content — no pixels,
prompts, comments, store keys or patient identifiers. The record is built from the call's
metadata and from a few typed proto fields only (``ModelRef`` / ``ModelInfo`` / ``Provenance``
model names, ``request_id``); sizes are ``ByteSize()`` of the messages. Health probes and
reflection are not audited.

**Durable before the answer, for every call.** The interceptor writes the record after the
handler finished and *before* gRPC sends the reply (for a server stream: before its final
status), with ``put_if_absent`` (an object is never overwritten: append-only). When the write
fails, a call that succeeded answers UNAVAILABLE instead, so nothing is acknowledged without its
record (its effect may exist: the caller retries with its idempotency key, as after any
UNAVAILABLE); a call that failed keeps its own error code. Reads are written the same way, not
batched: one small object per call costs one PUT (about 1 ms on the local store here), and a
trail that is complete by construction needs no flush on shutdown or crash.

**Layout: one object per record**, keyed by the call's start time::

    audit/YYYY/MM/DD/HH/<YYYYMMDDTHHMMSS.ffffffZ>-<service>-<id>.json

Why not per-minute segment objects: S3 has no append, so a segment means read-modify-write,
which four service processes with many threads each would have to serialise (or lose records);
one object per record is an independent atomic PUT that cannot collide (a random id) and is
never rewritten. Listing a time range is cheap all the same: keys sort chronologically (fixed
width, zero-padded, UTC), so a listing starts *at* ``since`` (``start_after``, which S3
ListObjectsV2 and the local store both seek to) and stops at the first key past ``until``,
reading only the range asked for. The hour folders serve people browsing the bucket and make
retention rules by date prefix possible; the store's lifecycle rules (age-based expiry of
``audit/``) are the retention policy.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from clinisynth.v1 import audit_pb2, audit_pb2_grpc
from clinisynth_server.errors import ClinisynthError, InvalidArgument, Unavailable
from clinisynth_server.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Page
from clinisynth_server.runtime.metrics import AuditMetrics
from clinisynth_server.runtime.roles import Principal
from clinisynth_server.store.base import ArtifactStore, encode_json, validate_key

log = logging.getLogger(__name__)
SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
AUDIT_NAMESPACE = "audit/"
#: Calls that are never audited: probes and discovery (they carry no principal and no data).
UNAUDITED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: Records a listing reads per page at most while filters skip them (then it returns a short
#: page with a token to go on): a rare principal over a long range must not make one call
#: read the whole trail.
SCAN_LIMIT = 5000
MAX_REQUEST_ID = 128
MAX_MODELS = 8
_ATTR = "_clinisynth_audit"
#: The exact shape of a record's key (see the module docstring).
RECORD_KEY = re.compile(
    r"audit/\d{4}/\d{2}/\d{2}/\d{2}/\d{8}T\d{6}\.\d{6}Z-[a-z0-9_-]+-[0-9a-f]{32}\.json"
)
_STAMP = "%Y%m%dT%H%M%S"


def audited(method: str) -> bool:
    return not method.startswith(UNAUDITED_PREFIXES)


@dataclass(frozen=True)
class ModelUse:
    """A model a call named (``field`` = the request field) or was served by (``field`` "")."""

    name: str
    version: str = ""
    digest: str = ""
    field: str = ""


@dataclass
class AuditRecord:
    id: str
    time: float  # Unix seconds: when the call started
    service: str
    method: str
    code: str
    principal: str = ""
    tenant: str = ""
    via: str = ""
    request_id: str = ""
    models: list[ModelUse] = field(default_factory=list)
    request_bytes: int = 0
    response_bytes: int = 0
    request_messages: int = 0
    response_messages: int = 0
    duration_ms: float = 0.0
    peer: str = ""

    def __post_init__(self) -> None:
        self.time = _parse_iso(_iso(self.time))  # µs, as stored: a record reads back equal

    @property
    def key(self) -> str:
        return record_key(self.time, self.service, self.id)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["time"] = _iso(self.time)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditRecord:
        values = dict(data)
        values["time"] = _parse_iso(str(values["time"]))
        values["models"] = [ModelUse(**m) for m in values.get("models", [])]
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def _iso(seconds: float) -> str:
    return _utc(seconds).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def time_prefix(seconds: float) -> str:
    """The key prefix every record of a call started at ``seconds`` begins with (µs resolution);
    keys sort as their times do, so it is also where a listing from ``seconds`` starts."""
    t = _utc(seconds)
    return f"{AUDIT_NAMESPACE}{t:%Y/%m/%d/%H}/{t.strftime(_STAMP)}.{t.microsecond:06d}Z"


def record_key(seconds: float, service: str, record_id: str) -> str:
    return f"{time_prefix(seconds)}-{service}-{record_id}.json"


# --- what a call's messages may tell (typed fields only, never content) ------------------------

_MODEL_REF = "clinisynth.v1.ModelRef"
_MODEL_INFO = "clinisynth.v1.ModelInfo"
_PROVENANCE = "clinisynth.v1.Provenance"
_REQUEST_ID_FIELDS = ("request_id", "client_request_id")
_WALK_DEPTH = 4
_WALK_REPEATED = 2  # elements of a repeated message field looked at (the models repeat)


def message_size(message: object) -> int:
    if isinstance(message, Message):
        return int(message.ByteSize())
    if isinstance(message, (bytes, bytearray, memoryview)):
        return len(message)
    return 0


def _clean_id(value: str) -> str:
    return "".join(c for c in value if c.isprintable())[:MAX_REQUEST_ID]


def request_id_of(message: object, depth: int = 2) -> str:
    """A ``request_id`` / ``client_request_id`` string field, at the top or one message down."""
    if not isinstance(message, Message):
        return ""
    fields = message.DESCRIPTOR.fields_by_name
    for name in _REQUEST_ID_FIELDS:
        fd = fields.get(name)
        if fd is not None and fd.type == fd.TYPE_STRING and not _repeated(fd):
            value = getattr(message, name)
            if value:
                return _clean_id(value)
    if depth > 1:
        for fd, value in message.ListFields():
            if fd.message_type is not None and not _repeated(fd):
                found = request_id_of(value, depth - 1)
                if found:
                    return found
    return ""


def _repeated(fd: Any) -> bool:
    # protobuf 5+ deprecates ``label`` in favour of ``is_repeated``; both exist on the 6.x runtime
    is_repeated = getattr(fd, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else fd.label == fd.LABEL_REPEATED


def models_of(message: object, *, requested: bool) -> list[ModelUse]:
    """Model names in ``message``: ``ModelRef`` fields (named by their path when ``requested``),
    ``ModelInfo`` and ``Provenance`` (name, version and digest of what served the call)."""
    out: list[ModelUse] = []
    if isinstance(message, Message):
        _walk(message, "", _WALK_DEPTH, requested, out)
    return out


def _walk(message: Message, path: str, depth: int, requested: bool, out: list[ModelUse]) -> None:
    kind = message.DESCRIPTOR.full_name
    if kind == _MODEL_REF:
        name = getattr(message, "name", "")
        if name:
            out.append(
                ModelUse(name, getattr(message, "version", ""), "", path if requested else "")
            )
        return
    if kind == _MODEL_INFO:
        name = getattr(message, "name", "")
        if name:
            out.append(
                ModelUse(name, getattr(message, "version", ""), getattr(message, "digest", ""))
            )
        return
    if kind == _PROVENANCE:
        ref = getattr(message, "model", None)
        if ref is not None and ref.name:
            out.append(ModelUse(ref.name, ref.version, getattr(message, "model_digest", "")))
        return
    if depth <= 0:
        return
    for fd, value in message.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        sub = f"{path}.{fd.name}" if path else fd.name
        if _repeated(fd):
            for item in list(value)[:_WALK_REPEATED]:
                _walk(item, sub, depth - 1, requested, out)
        else:
            _walk(value, sub, depth - 1, requested, out)


def merge_models(requested: Sequence[ModelUse], resolved: Sequence[ModelUse]) -> list[ModelUse]:
    """What the request named, completed by what served it (same name), plus anything else that
    served it; at most :data:`MAX_MODELS`, in order, without repeats."""
    done: list[ModelUse] = []
    used: set[int] = set()
    for ref in requested:
        match = next(
            (
                i
                for i, r in enumerate(resolved)
                if r.name == ref.name and (not ref.version or ref.version == r.version)
            ),
            None,
        )
        if match is None:
            done.append(ref)
            continue
        used.add(match)
        r = resolved[match]
        done.append(ModelUse(ref.name, r.version or ref.version, r.digest, ref.field))
    done += [r for i, r in enumerate(resolved) if i not in used]
    unique: list[ModelUse] = []
    for m in done:
        if m not in unique:
            unique.append(m)
    return unique[:MAX_MODELS]


# --- one call, as the interceptor sees it ------------------------------------------------------


class CallAudit:
    """The record of one call in the making; the interceptor feeds it, :meth:`AuditLog.commit`
    writes it. Servicers may add what they resolved with :func:`note_model`."""

    def __init__(self, service: str, method: str, metadata: Sequence[tuple[str, Any]]) -> None:
        self.service, self.method = service, method
        self.started = time.time()
        self._t0 = time.perf_counter()
        self.principal: Principal | None = None
        self.peer = ""
        self.request_id = ""
        for key, value in metadata:
            if key.lower() == "x-request-id":
                raw = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
                self.request_id = _clean_id(raw)
        self.requested: list[ModelUse] = []
        self.resolved: list[ModelUse] = []
        self.request_bytes = self.response_bytes = 0
        self.request_messages = self.response_messages = 0
        self.committed = False

    def incoming(self, message: object) -> None:
        """One request message (every message of a client stream)."""
        self.request_messages += 1
        self.request_bytes += message_size(message)
        if self.request_messages <= 2:  # a stream's first message configures it
            if len(self.requested) < MAX_MODELS:
                self.requested += models_of(message, requested=True)
            self.request_id = self.request_id or request_id_of(message)

    def incoming_stream(self, messages: Iterator[Any]) -> Iterator[Any]:
        for message in messages:
            self.incoming(message)
            yield message

    def outgoing(self, message: object) -> None:
        """One response message (every message of a server stream)."""
        self.response_messages += 1
        self.response_bytes += message_size(message)
        if len(self.resolved) < MAX_MODELS:
            self.resolved += models_of(message, requested=False)
        self.request_id = self.request_id or request_id_of(message)

    def note_model(self, name: str, version: str = "", digest: str = "") -> None:
        if name and len(self.resolved) < MAX_MODELS:
            self.resolved.append(ModelUse(name, str(version), digest))

    def record(self, code: str) -> AuditRecord:
        p = self.principal
        return AuditRecord(
            id=uuid.uuid4().hex,
            time=self.started,
            service=self.service,
            method=self.method,
            code=code,
            principal=p.name if p is not None else "",
            tenant=p.tenant if p is not None else "",
            via=p.via if p is not None else "",
            request_id=self.request_id,
            models=merge_models(self.requested, self.resolved),
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
            request_messages=self.request_messages,
            response_messages=self.response_messages,
            duration_ms=round((time.perf_counter() - self._t0) * 1000, 3),
            peer=self.peer,
        )


def attach(context: object, call: CallAudit) -> None:
    setattr(context, _ATTR, call)


def note_model(context: object, name: str, version: str = "", digest: str = "") -> None:
    """The hook for servicers: record the model version and digest a call resolved to (a no-op
    outside an audited call)."""
    call = getattr(context, _ATTR, None)
    if isinstance(call, CallAudit):
        call.note_model(name, version, digest)


# --- the trail in the store --------------------------------------------------------------------


def encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    try:
        key = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        validate_key(key, "page_token")
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidArgument):
        key = ""
    if not key.startswith(AUDIT_NAMESPACE):
        raise InvalidArgument.for_field("page_token", "not a token from this API")
    return key


class AuditLog:
    """A service's writer of audit records and reader of everyone's (the shared store).

    Without a store (a bare test server that opened none) it is :attr:`enabled` false: the
    interceptor records nothing and ListAudit answers UNAVAILABLE.
    """

    def __init__(
        self,
        service: str,
        store: ArtifactStore | None = None,
        metrics: AuditMetrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service, self.store, self.metrics, self.clock = service, store, metrics, clock

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def bind(self, store: ArtifactStore) -> None:
        self.store = store

    def begin(self, method: str, metadata: Sequence[tuple[str, Any]]) -> CallAudit | None:
        if not self.enabled or not audited(method):
            return None
        return CallAudit(self.service, method, metadata)

    def commit(self, call: CallAudit, code: str) -> AuditRecord:
        """Write the record of ``call`` ending with ``code``; Unavailable when it cannot be."""
        call.committed = True
        record = call.record(code)
        self.write(record)
        return record

    def write(self, record: AuditRecord) -> None:
        if self.store is None:
            raise Unavailable("the audit trail has no store")
        try:
            written = self.store.put_if_absent(
                record.key, encode_json(record.to_json()), content_type="application/json"
            )
            if not written:  # a random 128-bit id met itself: never overwrite a record
                raise OSError(f"audit record {record.key} exists")
        except (ClinisynthError, OSError) as exc:
            if self.metrics is not None:
                self.metrics.failures.labels(self.service).inc()
            log.error("audit record of %s (%s) not written: %s", record.method, record.code, exc)
            raise Unavailable(
                "the audit trail cannot be written; the call is not acknowledged",
                reason="AUDIT_UNAVAILABLE",
            ) from exc
        if self.metrics is not None:
            self.metrics.records.labels(self.service, record.code).inc()

    def list(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        principal: str = "",
        method: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[AuditRecord]:
        """Records of calls started in [since, until), oldest first, one page at a time."""
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", "must be >= 0")
        if since is not None and until is not None and until < since:
            raise InvalidArgument.for_field("until", "must not be before since")
        if self.store is None:
            raise Unavailable("the audit trail has no store")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = decode_token(page_token) if page_token else None
        if since is not None:
            floor = time_prefix(since)
            start = floor if start is None or start < floor else start
        stop = time_prefix(until) if until is not None else None
        wanted = _method_filter(method)
        items: list[AuditRecord] = []
        scanned = 0
        for info in self.store.list(AUDIT_NAMESPACE, start_after=start):
            if stop is not None and info.key >= stop:
                break
            if not RECORD_KEY.fullmatch(info.key):
                continue  # only names this module writes: nothing else under audit/ is a record
            scanned += 1
            record = self._read(info.key)
            if (
                record is not None
                and (not principal or record.principal == principal)
                and wanted(record.method)
            ):
                items.append(record)
            if len(items) >= size or scanned >= SCAN_LIMIT:
                return Page(items, encode_token(info.key))
        return Page(items, "")

    def _read(self, key: str) -> AuditRecord | None:
        assert self.store is not None
        try:
            return AuditRecord.from_json(self.store.get_json(key))
        except ClinisynthError as exc:
            if exc.code not in ("INTERNAL", "NOT_FOUND"):  # not garbled, not expired: down
                raise
            log.warning("audit record %s skipped: %s", key, exc)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("audit record %s skipped: %s", key, exc)
        return None


def _method_filter(method: str) -> Callable[[str], bool]:
    if not method:
        return lambda m: True
    if method.startswith("/"):
        return lambda m: m == method
    return lambda m: m.rsplit("/", 1)[-1] == method


# --- the RPC -----------------------------------------------------------------------------------


def _seconds(message: Any, name: str) -> float | None:
    return getattr(message, name).ToNanoseconds() / 1e9 if message.HasField(name) else None


def record_proto(record: AuditRecord) -> audit_pb2.AuditRecord:
    msg = audit_pb2.AuditRecord(
        id=record.id,
        service=record.service,
        principal=record.principal,
        tenant=record.tenant,
        via=record.via,
        method=record.method,
        code=record.code,
        request_id=record.request_id,
        models=[
            audit_pb2.AuditModel(name=m.name, version=m.version, digest=m.digest, field=m.field)
            for m in record.models
        ],
        request_bytes=record.request_bytes,
        response_bytes=record.response_bytes,
        request_messages=record.request_messages,
        response_messages=record.response_messages,
        duration_ms=record.duration_ms,
        peer=record.peer,
    )
    msg.time.FromNanoseconds(round(record.time * 1e6) * 1000)
    return msg


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """ListAudit, served by every service over the one shared trail: translation only."""

    def __init__(self, trail: AuditLog) -> None:
        self.trail = trail

    def ListAudit(
        self, request: audit_pb2.ListAuditRequest, context: grpc.ServicerContext
    ) -> audit_pb2.ListAuditResponse:
        page = self.trail.list(
            since=_seconds(request, "since"),
            until=_seconds(request, "until"),
            principal=request.principal,
            method=request.method,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return audit_pb2.ListAuditResponse(
            records=[record_proto(r) for r in page.items], next_page_token=page.next_page_token
        )
