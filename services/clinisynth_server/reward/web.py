"""The expert review page: a small JSON API over the same domain code as gRPC, plus one HTML page.

Served with the standard library (``ThreadingHTTPServer``) on ``http_port`` beside the gRPC port.
Routes:

- ``GET  /review``                  the page (keyboard: y / n verdict, 1-9 criteria, Enter submit)
- ``GET  /api/conditions``          conditions with pending counts
- ``GET  /api/next?rater=&class_name=|prompt=&limit=``  next items (least certain first)
- ``GET  /api/image/<item_id>``     the item's image as PNG
- ``GET  /api/checklist?class_name=|prompt=``
- ``POST /api/feedback``            a judgement (JSON; same validation and storage as gRPC)
- ``GET  /api/agreement?class_name=|prompt=``

Errors come back as ``{"error": {"code", "message", "violations": [{field, description}]}}``
with HTTP 400 / 404 / 503. With bearer tokens configured, the API wants
``Authorization: Bearer <t>`` (the page forwards a ``?token=`` query parameter).
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import logging
import math
import threading
import urllib.parse
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from clinisynth_server.errors import ClinisynthError, InvalidArgument
from clinisynth_server.reward import service as svc
from clinisynth_server.reward.images import ImageInput
from clinisynth_server.reward.scoring import Condition

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
_STATUS = {
    "INVALID_ARGUMENT": HTTPStatus.BAD_REQUEST,
    "NOT_FOUND": HTTPStatus.NOT_FOUND,
    "UNAVAILABLE": HTTPStatus.SERVICE_UNAVAILABLE,
    "UNAUTHENTICATED": HTTPStatus.UNAUTHORIZED,
}


def _page() -> bytes:
    return (importlib.resources.files("clinisynth_server.reward") / "review.html").read_bytes()


def _condition(query: dict[str, list[str]]) -> Condition | None:
    if query.get("class_name", [""])[0]:
        return Condition(class_name=query["class_name"][0])
    if query.get("prompt", [""])[0]:
        return Condition(prompt=query["prompt"][0])
    return None


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


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
                "kappa": _num(c.agreement.kappa),
                "statistic": c.agreement.statistic,
                "percent_agreement": _num(c.agreement.percent_agreement),
            }
            for c in report.conditions
        ],
        "raters": [
            {
                "rater_id": r.rater_id,
                "judgements": r.judgements,
                "plausible_rate": r.plausible_rate,
                "agreement_with_majority": _num(r.agreement_with_majority),
                "median_time_spent_ms": r.median_time_spent_ms,
            }
            for r in report.raters
        ],
    }


class ReviewWeb:
    """The HTTP server of the review page; ``url`` is where the page is."""

    def __init__(
        self, reward: svc.Reward, host: str, port: int, tokens: Sequence[str] = ()
    ) -> None:
        self.reward = reward
        self.tokens = tuple(tokens)
        handler = type("Handler", (_Handler,), {"web": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, daemon=True, name="review-http"
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/review"

    def start(self) -> ReviewWeb:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def authorised(self, header: str) -> bool:
        if not self.tokens:
            return True
        given = header.removeprefix("Bearer ").strip()
        return any(hmac.compare_digest(given, t) for t in self.tokens)


class _Handler(BaseHTTPRequestHandler):
    web: ReviewWeb
    server_version = "clinisynth-review"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("review http: " + format, *args)

    # -- plumbing -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, err: ClinisynthError) -> None:
        status = _STATUS.get(err.code, HTTPStatus.INTERNAL_SERVER_ERROR)
        self._json(
            {
                "error": {
                    "code": err.code,
                    "message": err.message,
                    "violations": [
                        {"field": v.field, "description": v.description} for v in err.violations
                    ],
                }
            },
            status,
        )

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        path = url.path.rstrip("/") or "/"
        try:
            if path in ("/", "/review") and method == "GET":
                self._send(200, _page(), "text/html; charset=utf-8")
                return
            if not path.startswith("/api/"):
                self._json({"error": {"code": "NOT_FOUND", "message": path}}, 404)
                return
            given = self.headers.get("Authorization", "") or query.get("token", [""])[0]
            if not self.web.authorised(given):
                self._json({"error": {"code": "UNAUTHENTICATED", "message": "bearer token"}}, 401)
                return
            self._api(method, path, query)
        except ClinisynthError as err:
            self._error(err)
        except Exception:  # never leak a traceback to the page
            log.exception("review page request failed")
            self._json({"error": {"code": "INTERNAL", "message": "internal error"}}, 500)

    def _api(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        reward = self.web.reward
        if method == "GET" and path == "/api/conditions":
            pending = reward.pending_by_condition()
            self._json({
                "conditions": [
                    {"condition": c.to_json(), "pending": n}
                    for c, n in sorted(pending.items(), key=lambda kv: kv[0].key)
                ],
                "raters": sorted(reward.raters),
            })
        elif method == "GET" and path == "/api/next":
            limit = int(query.get("limit", ["10"])[0] or 10)
            items, pending = reward.next_items(
                query.get("rater", [""])[0], condition=_condition(query), limit=limit
            )
            self._json({"items": [item_json(q) for q in items], "pending": pending})
        elif method == "GET" and path.startswith("/api/image/"):
            self._send(200, reward.item_png(path.rsplit("/", 1)[1]), "image/png")
        elif method == "GET" and path == "/api/checklist":
            crits = reward.checklist(_condition(query))
            self._json({"criteria": [{"name": c.name, "description": c.description}
                                     for c in crits]})
        elif method == "GET" and path == "/api/agreement":
            self._json(agreement_json(reward.agreement(_condition(query))))
        elif method == "POST" and path == "/api/feedback":
            body = self._body()
            criteria = body.get("criteria") or {}
            if not isinstance(criteria, dict):
                raise InvalidArgument.for_field("criteria", "an object {name: bool}")
            if not isinstance(body.get("plausible"), bool):
                raise InvalidArgument.for_field("plausible", "required: true or false")
            draft = svc.FeedbackDraft(
                client_request_id=str(body.get("client_request_id", "")),
                rater_id=str(body.get("rater_id", "")),
                plausible=body["plausible"],
                item_id=str(body.get("item_id", "")),
                image=ImageInput("none") if not body.get("item_id") else None,
                criteria=[(str(k), bool(v)) for k, v in criteria.items()],
                comment=str(body.get("comment", "")),
                time_spent_ms=int(body.get("time_spent_ms", 0) or 0),
            )
            record, duplicate = reward.submit(draft)
            self._json({"feedback": {**record.to_json()}, "duplicate": duplicate})
        else:
            self._json({"error": {"code": "NOT_FOUND", "message": f"{method} {path}"}}, 404)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length", "0") or 0)
        if length > MAX_BODY:
            raise InvalidArgument.for_field("body", f"at most {MAX_BODY} bytes")
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument.for_field("body", f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidArgument.for_field("body", "a JSON object")
        return data

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")
