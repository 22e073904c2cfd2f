"""The expert review page: a small JSON API over the same domain code as gRPC, plus one HTML page.

Served with the standard library (``ThreadingHTTPServer``) on ``http_port`` beside the gRPC port;
over HTTPS only when the service has a TLS certificate (``CLINISYNTH_TLS_CERT`` / ``_KEY``, the
same pair gRPC serves), each connection's handshake in its own thread.
Routes:

- ``GET  /review``                  the page (keyboard: y / n verdict, 1-9 criteria, Enter submit)
- ``GET  /review.js``, ``/review.css``  its script and style (no inline code: the CSP forbids it)
- ``GET  /api/conditions``          conditions with pending counts
- ``GET  /api/next?rater=&class_name=|prompt=&limit=``  next items, in the queue's order
- ``GET  /api/image/<item_id>``     the item's image as PNG
- ``GET  /api/checklist?class_name=|prompt=``
- ``POST /api/feedback``            a judgement (JSON; same validation and storage as gRPC)
- ``GET  /api/agreement?class_name=|prompt=``
- ``GET  /api/whoami``              the signed-in principal (the page fills the rater from it)

Errors come back as ``{"error": {"code", "message", "violations": [{field, description}]}}``
with HTTP 400 / 401 / 403 / 404 / 411 / 415 / 503 — never a 500 for anything a caller sent.

Why it is built this way (every value on the page is someone else's input):

- Every response carries a Content-Security-Policy of ``default-src 'self'`` (images also from
  ``blob:``, which is how the page shows images it fetched with its bearer header), no framing,
  ``nosniff`` and ``Referrer-Policy: no-referrer``; the page renders data with ``textContent``.
- With authentication configured the API wants ``Authorization: Bearer <t>`` (a JWT or a static
  token, verified by the same authenticator as gRPC; each route is checked against the role of
  the RPC it stands for in :mod:`clinisynth_server.runtime.roles`); the page asks for the token
  in a form and keeps it in ``sessionStorage``. The rater is the signed-in principal: a
  ``rater`` / ``rater_id`` naming someone else is refused (403). A ``token`` query parameter
  is refused (400): a URL with a secret ends up in access logs, history and ``Referer``
  headers.
- POSTs must be ``Content-Type: application/json`` (else 415) and, when the browser says where
  they come from, from this origin (else 403): an HTML form on another site can send neither.
- Every ``/api/`` request has its audit record (the same trail as gRPC calls, under the RPC the
  route stands for, peer ``review-page http:<address>``) written before the response goes out;
  when it cannot be written the response is 503 instead (nothing acknowledged without it).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from clinisynth_server.errors import ClinisynthError, InvalidArgument, ValidationErrors
from clinisynth_server.reward import service as svc
from clinisynth_server.reward.images import ImageInput
from clinisynth_server.reward.scoring import Condition
from clinisynth_server.runtime.audit import AuditLog, CallAudit
from clinisynth_server.runtime.auth import AllowAll, Authenticator
from clinisynth_server.runtime.roles import Principal, authorize, bind_rater
from clinisynth_server.runtime.tls import ReloadingCertificates
from clinisynth_server.tenancy import Viewer, viewer_of

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
# Seconds a client gets to finish the TLS handshake before its connection is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
MAX_LIMIT = 100
MAX_TIME_SPENT_MS = 2**31 - 1  # ~24 days; anything larger is a client bug, not a judgement
_STATUS = {
    "INVALID_ARGUMENT": HTTPStatus.BAD_REQUEST,
    "FAILED_PRECONDITION": HTTPStatus.CONFLICT,
    "ALREADY_EXISTS": HTTPStatus.CONFLICT,
    "NOT_FOUND": HTTPStatus.NOT_FOUND,
    "UNAVAILABLE": HTTPStatus.SERVICE_UNAVAILABLE,
    "RESOURCE_EXHAUSTED": HTTPStatus.TOO_MANY_REQUESTS,
    "DEADLINE_EXCEEDED": HTTPStatus.GATEWAY_TIMEOUT,
    "UNAUTHENTICATED": HTTPStatus.UNAUTHORIZED,
    "PERMISSION_DENIED": HTTPStatus.FORBIDDEN,
}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)
_RPC = "/clinisynth.v1.RewardService/"
# Each API route is authorized as the RPC it stands for (one role table for both doors).
ROUTE_RPC = {
    "/api/conditions": _RPC + "NextReviewItems",
    "/api/next": _RPC + "NextReviewItems",
    "/api/image/": _RPC + "NextReviewItems",
    "/api/checklist": _RPC + "GetChecklist",
    "/api/agreement": _RPC + "GetAgreement",
    "/api/feedback": _RPC + "SubmitFeedback",
}
_STATIC = {
    "/": ("review.html", "text/html; charset=utf-8"),
    "/review": ("review.html", "text/html; charset=utf-8"),
    "/review.js": ("review.js", "text/javascript; charset=utf-8"),
    "/review.css": ("review.css", "text/css; charset=utf-8"),
}


class HttpError(Exception):
    """A refusal that is about HTTP itself (status other than the domain mapping's)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _asset(name: str) -> bytes:
    return (importlib.resources.files("clinisynth_server.reward") / name).read_bytes()


def _param(query: dict[str, list[str]], name: str) -> str:
    return query.get(name, [""])[0]


def _int_param(query: dict[str, list[str]], name: str, default: int, lo: int, hi: int) -> int:
    """A bounded integer query parameter; anything else is INVALID_ARGUMENT naming it."""
    raw = _param(query, name).strip()
    if not raw:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise InvalidArgument.for_field(name, f"an integer {lo}..{hi}, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise InvalidArgument.for_field(name, f"must be {lo}..{hi}, got {value}")
    return value


def _condition(reward: svc.Reward, query: dict[str, list[str]]) -> Condition | None:
    """The ``class_name`` or ``prompt`` of a query (at most one), validated like gRPC's."""
    class_name, prompt = _param(query, "class_name"), _param(query, "prompt")
    if not (class_name or prompt):
        return None
    if class_name and prompt:
        raise InvalidArgument.for_field("prompt", "send class_name or prompt, not both")
    condition = Condition(class_name=class_name) if class_name else Condition(prompt=prompt)
    errors = ValidationErrors()
    reward.check_condition_value(condition, errors, "condition")
    errors.raise_if_any()
    return condition


def _finite(obj: Any) -> Any:
    """JSON-safe: NaN / ±inf become null (``JSON.parse`` rejects them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def item_json(q: svc.QueuedItem) -> dict[str, Any]:
    return {
        "id": q.item.id,
        "condition": q.item.condition.to_json(),
        "name": q.item.name,
        "image_url": f"/api/image/{q.item.id}",
        "p_aligned": q.p_aligned,
        "scored_by": q.scored_by,
        "judgements": q.judgements,
        "raters_per_item": q.item.raters_per_item,
        "generator": q.item.generator,
    }


def agreement_json(report: svc.AgreementReport) -> dict[str, Any]:
    return {
        "conditions": [
            {
                "condition": c.condition.to_json(),
                "shared_items": c.agreement.shared_items,
                "raters": c.agreement.raters,
                "kappa": c.agreement.kappa,
                "statistic": c.agreement.statistic,
                "percent_agreement": c.agreement.percent_agreement,
            }
            for c in report.conditions
        ],
        "raters": [
            {
                "rater_id": r.rater_id,
                "judgements": r.judgements,
                "plausible_rate": r.plausible_rate,
                "agreement_with_majority": r.agreement_with_majority,
                "median_time_spent_ms": r.median_time_spent_ms,
            }
            for r in report.raters
        ],
    }


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument.for_field(name, "a string")
    return value


def feedback_draft(body: dict[str, Any], viewer: Viewer | None = None) -> svc.FeedbackDraft:
    """The page's JSON judgement → the domain draft; wrong JSON types are INVALID_ARGUMENT.

    ``viewer``: the signed-in principal's tenant, who owns the judgement."""
    viewer = viewer or Viewer()
    criteria = body.get("criteria") or {}
    if not isinstance(criteria, dict):
        raise InvalidArgument.for_field("criteria", "an object {name: bool}")
    for name, ok in criteria.items():
        if not isinstance(ok, bool):
            raise InvalidArgument.for_field(f"criteria.{name}"[:200], "true or false")
    if not isinstance(body.get("plausible"), bool):
        raise InvalidArgument.for_field("plausible", "required: true or false")
    spent = body.get("time_spent_ms", 0) or 0
    if (
        isinstance(spent, bool)
        or not isinstance(spent, int | float)
        or not math.isfinite(spent)
        or not 0 <= spent <= MAX_TIME_SPENT_MS
    ):
        raise InvalidArgument.for_field("time_spent_ms", f"a number 0..{MAX_TIME_SPENT_MS}")
    item_id = _string(body, "item_id")
    return svc.FeedbackDraft(
        client_request_id=_string(body, "client_request_id"),
        rater_id=_string(body, "rater_id"),
        plausible=body["plausible"],
        item_id=item_id,
        image=ImageInput("none") if not item_id else None,
        criteria=list(criteria.items()),
        comment=_string(body, "comment"),
        time_spent_ms=int(spent),
        tenant=viewer.tenant,
        admin=viewer.admin,
    )


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for the certificate chain ``cert`` and its ``key`` (TLS 1.2 or newer)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:  # missing file, unreadable, not a matching pair
        raise InvalidArgument.for_field(
            "CLINISYNTH_TLS_CERT", f"cannot load the certificate {cert!r} with key {key!r}: {exc}"
        ) from None
    return context


class _HttpsServer(ThreadingHTTPServer):
    """HTTPS: the listening socket accepts plain TCP and each connection is wrapped, its
    handshake done in the connection's own thread — a client that stalls the handshake holds one
    thread for at most ``HANDSHAKE_TIMEOUT_S``, never the accept loop."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        files: tuple[str, str] = ("", ""),
    ) -> None:
        self.context = context
        # Renewed certificate files are served to new connections, as on the gRPC port.
        self.files = files
        self.certificates = ReloadingCertificates(*files) if all(files) else None
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.certificates is not None and self.certificates.check() is not None:
            try:
                self.context = tls_context(*self.files)
            except InvalidArgument as exc:  # changed again since the check: keep the old one
                log.error("review https: renewed certificate not loaded: %s", exc)
        wrapped = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as exc:  # plain HTTP, an untrusting client, a timeout
            log.debug("review https: handshake with %s failed: %s", client_address, exc)
            return
        request.settimeout(None)
        super().finish_request(request, client_address)


def _content_length(headers: Any) -> int:
    try:
        return max(0, int(headers.get("Content-Length") or 0))
    except ValueError:
        return 0


class ReviewWeb:
    """The HTTP server of the review page; ``url`` is where the page is."""

    def __init__(
        self,
        reward: svc.Reward,
        host: str,
        port: int,
        auth: Authenticator | None = None,
        audit: AuditLog | None = None,
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        self.reward = reward
        self.auth: Authenticator = auth or AllowAll()
        self.audit = audit
        handler = type("Handler", (_Handler,), {"web": self})
        # the context first: a bad certificate is a settings error, not a taken port
        context = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
        self.tls = context is not None
        self.httpd: ThreadingHTTPServer = (
            _HttpsServer((host, port), handler, context, (tls_cert, tls_key))
            if context is not None
            else ThreadingHTTPServer((host, port), handler)
        )
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, daemon=True, name="review-http"
        )

    @property
    def url(self) -> str:
        """The page's address: never carries a token (the page asks for it)."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/review"

    def start(self) -> ReviewWeb:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def principal(self, path: str, header: str | None, call: CallAudit | None = None) -> Principal:
        """Authenticate the request, then authorize it as the RPC ``path`` stands for (the
        audit record names the principal even when it is refused)."""
        rpc = ROUTE_RPC.get("/api/image/" if path.startswith("/api/image/") else path)
        metadata = [("authorization", header)] if header else []
        principal = self.auth.authenticate(rpc or _RPC + "whoami", metadata)
        if call is not None:
            call.principal = principal
        if rpc is not None:
            authorize(rpc, principal)
        return principal

    def begin_audit(self, path: str, peer: str, request_bytes: int) -> CallAudit | None:
        """The audit record of one API request, under the RPC its route stands for."""
        if self.audit is None:
            return None
        rpc = ROUTE_RPC.get("/api/image/" if path.startswith("/api/image/") else path)
        call = self.audit.begin(rpc or _RPC + "whoami", [])
        if call is not None:
            call.peer = f"review-page http:{peer}"
            call.request_messages, call.request_bytes = 1, request_bytes
        return call


class _Handler(BaseHTTPRequestHandler):
    web: ReviewWeb
    server_version = "clinisynth-review"
    sys_version = ""
    _audit: CallAudit | None = None
    _audit_code = "OK"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("review http: " + format, *args)

    # -- plumbing -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        call, self._audit = self._audit, None
        if call is not None and self.web.audit is not None:
            call.response_messages, call.response_bytes = 1, len(body)
            try:
                self.web.audit.commit(call, self._audit_code if status >= 400 else "OK")
            except ClinisynthError as err:  # not acknowledged without its record
                status, ctype = HTTPStatus.SERVICE_UNAVAILABLE, "application/json"
                body = json.dumps(
                    {"error": {"code": err.code, "message": err.message, "violations": []}}
                ).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(_finite(obj)).encode(), "application/json")

    def _fail(self, status: int, code: str, message: str, violations: Sequence[Any] = ()) -> None:
        self._audit_code = code
        self._json(
            {
                "error": {
                    "code": code,
                    "message": message,
                    "violations": [
                        {"field": v.field, "description": v.description} for v in violations
                    ],
                }
            },
            status,
        )

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, unknown method) as JSON, with headers."""
        try:
            short = HTTPStatus(code).phrase
        except ValueError:
            short = "error"
        self.close_connection = True
        self._fail(code, short.upper().replace(" ", "_"), message or short)

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        try:
            query = urllib.parse.parse_qs(url.query, max_num_fields=32)
        except ValueError:
            self._fail(400, "INVALID_ARGUMENT", "query: too many parameters")
            return
        path = url.path.rstrip("/") or "/"
        try:
            if "token" in query or "access_token" in query:
                name = "token" if "token" in query else "access_token"
                raise InvalidArgument.for_field(
                    name, "never put a token in a URL: send Authorization: Bearer <token>"
                )
            if path in _STATIC and method in ("GET", "HEAD"):
                name, ctype = _STATIC[path]
                self._send(200, _asset(name), ctype)
                return
            if not path.startswith("/api/"):
                raise HttpError(404, "NOT_FOUND", path[:200])
            self._audit_code = "OK"
            self._audit = self.web.begin_audit(
                path, str(self.client_address[0]), _content_length(self.headers)
            )
            principal = self.web.principal(path, self.headers.get("Authorization"), self._audit)
            self._api(method, path, query, principal)
        except ClinisynthError as err:
            status = _STATUS.get(err.code, HTTPStatus.INTERNAL_SERVER_ERROR)
            self._fail(status, err.code, err.message, err.violations)
        except HttpError as err:
            self._fail(err.status, err.code, err.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser left; nobody to answer
        except Exception:  # never leak a traceback to the page
            log.exception("review page request failed")
            self._fail(500, "INTERNAL", "internal error")

    def _api(
        self, method: str, path: str, query: dict[str, list[str]], principal: Principal
    ) -> None:
        reward = self.web.reward
        viewer = viewer_of(principal)  # the queue and judgements are this tenant's
        if method == "GET" and path == "/api/whoami":
            self._json(
                {
                    "name": principal.name,
                    "roles": sorted(principal.roles),
                    "rater": principal.name if principal.personal else "",
                }
            )
        elif method == "GET" and path == "/api/conditions":
            pending = reward.pending_by_condition(viewer)
            self._json(
                {
                    "conditions": [
                        {"condition": c.to_json(), "pending": n}
                        for c, n in sorted(pending.items(), key=lambda kv: kv[0].key)
                    ],
                    "raters": sorted(reward.raters),
                }
            )
        elif method == "GET" and path == "/api/next":
            limit = _int_param(query, "limit", 10, 1, MAX_LIMIT)
            condition = _condition(reward, query)
            rater = bind_rater(principal, _param(query, "rater"), "rater")
            items, left = reward.next_items(rater, condition=condition, limit=limit, viewer=viewer)
            self._json({"items": [item_json(q) for q in items], "pending": left})
        elif method == "GET" and path.startswith("/api/image/"):
            self._send(200, reward.item_png(path.rsplit("/", 1)[1], viewer), "image/png")
        elif method == "GET" and path == "/api/checklist":
            crits = reward.checklist(_condition(reward, query))
            self._json(
                {"criteria": [{"name": c.name, "description": c.description} for c in crits]}
            )
        elif method == "GET" and path == "/api/agreement":
            self._json(agreement_json(reward.agreement(_condition(reward, query), viewer)))
        elif method == "POST" and path == "/api/feedback":
            body = self._body()
            body["rater_id"] = bind_rater(principal, _string(body, "rater_id"), "rater_id")
            record, duplicate = reward.submit(feedback_draft(body, viewer))
            self._json({"feedback": {**record.to_json()}, "duplicate": duplicate})
        elif path in (
            "/api/conditions",
            "/api/next",
            "/api/checklist",
            "/api/agreement",
            "/api/feedback",
            "/api/whoami",
        ) or path.startswith("/api/image/"):
            raise HttpError(405, "METHOD_NOT_ALLOWED", f"{method} {path}")
        else:
            raise HttpError(404, "NOT_FOUND", f"{method} {path[:200]}")

    def _body(self) -> dict[str, Any]:
        """The JSON object of a POST: only ``application/json`` (CSRF), same origin, bounded."""
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type: application/json only")
        origin = self.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != self.headers.get(
            "Host", ""
        ):
            raise HttpError(403, "PERMISSION_DENIED", "cross-origin POST refused")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HttpError(411, "LENGTH_REQUIRED", "Content-Length required")
        try:
            length = int(raw)
        except ValueError:
            raise InvalidArgument.for_field("Content-Length", "an integer") from None
        if not 0 <= length <= MAX_BODY:
            raise InvalidArgument.for_field("body", f"0..{MAX_BODY} bytes")
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidArgument.for_field("body", f"not JSON: {str(exc)[:100]}") from exc
        if not isinstance(data, dict):
            raise InvalidArgument.for_field("body", "a JSON object")
        return data

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")
