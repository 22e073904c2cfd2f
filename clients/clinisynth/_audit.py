"""The audit trail (``client.audit()``, ``clinisynth audit``): requests built, replies parsed.

Every service serves ``AuditService`` over the one shared trail, so the call goes to whichever
service the client knows an address for (finetune first: it is the admin's service).
"""

from __future__ import annotations

import datetime as dt
import re

from clinisynth._discovery import Endpoints
from clinisynth._rpc import Rpc
from clinisynth._types import AuditEntry, AuditModel
from clinisynth.v1 import audit_pb2, audit_pb2_grpc

STUB = audit_pb2_grpc.AuditServiceStub
PREFERRED = ("finetune", "reward", "generator", "counterfactual")
TimeLike = dt.datetime | float | int | str | None
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def list_rpc(endpoints: Endpoints) -> Rpc:
    """ListAudit on the first service with a known address (any one lists every record)."""
    service = next((s for s in PREFERRED if endpoints.for_service(s)), PREFERRED[0])
    return Rpc(service, STUB, "ListAudit", idempotent=True)


def to_seconds(value: TimeLike, name: str, *, now: float | None = None) -> float | None:
    """A point in time: a datetime (naive = UTC), Unix seconds, an ISO-8601 string or a span
    back from now ("15m", "2h", "7d")."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    ago = _AGO.match(text)
    if ago:
        base = dt.datetime.now(dt.UTC).timestamp() if now is None else now
        return base - float(ago.group(1)) * _UNITS[ago.group(2)]
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{name}: {value!r} is neither an ISO-8601 time nor a span such as 15m, 2h, 7d"
        ) from None
    return to_seconds(parsed, name)


def list_request(
    since: float | None,
    until: float | None,
    principal: str | None,
    method: str | None,
    page_size: int,
    page_token: str,
) -> audit_pb2.ListAuditRequest:
    req = audit_pb2.ListAuditRequest(
        principal=principal or "",
        method=method or "",
        page_size=page_size,
        page_token=page_token,
    )
    if since is not None:
        req.since.FromNanoseconds(round(since * 1e9))
    if until is not None:
        req.until.FromNanoseconds(round(until * 1e9))
    return req


def entry_from(r: audit_pb2.AuditRecord) -> AuditEntry:
    return AuditEntry(
        id=r.id,
        time=r.time.ToNanoseconds() / 1e9,
        service=r.service,
        principal=r.principal,
        tenant=r.tenant,
        via=r.via,
        method=r.method,
        code=r.code,
        request_id=r.request_id,
        models=[AuditModel(m.name, m.version, m.digest, m.field) for m in r.models],
        request_bytes=r.request_bytes,
        response_bytes=r.response_bytes,
        request_messages=r.request_messages,
        response_messages=r.response_messages,
        duration_ms=r.duration_ms,
        peer=r.peer,
    )
