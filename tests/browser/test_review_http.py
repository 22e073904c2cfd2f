"""The review page's HTTP surface, spoken to with urllib against a real reward service with bearer
tokens: security headers on every response, no token in URLs, JSON-only POSTs (form CSRF), and
bad input answered 4xx naming the field — never 500."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

import clinisynth

pytestmark = pytest.mark.stack

TOKEN = "review-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _call(
    url: str,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    base = urllib.parse.urlsplit(url)
    req = urllib.request.Request(
        f"{base.scheme}://{base.netloc}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture()
def review(start_reward):
    running, url = start_reward(auth_tokens=TOKEN)
    with clinisynth.Client(
        endpoints={"reward": running.address}, token=TOKEN, timeout=60
    ) as client:
        item = client.review.enqueue([np.zeros((8, 8), np.float32)], class_name="neutrophil")[0]
    return url, item.id


def _feedback(item_id: str, **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "client_request_id": "r1",
        "rater_id": "dr_http",
        "item_id": item_id,
        "plausible": True,
        "criteria": {},
        "time_spent_ms": 1200,
    }
    return {**body, **overrides}


def _json_post(url: str, payload: object, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return _call(
        url,
        "/api/feedback",
        method="POST",
        body=json.dumps(payload).encode(),
        headers={**AUTH, "Content-Type": "application/json", **headers},
    )


def test_every_response_carries_the_security_headers(review):
    url, item_id = review
    for path, headers in (
        ("/review", {}),
        ("/review.js", {}),
        ("/review.css", {}),
        ("/api/conditions", AUTH),
        (f"/api/image/{item_id}", AUTH),
        ("/api/conditions", {}),
        ("/nowhere", {}),
    ):
        status, got, _ = _call(url, path, headers=headers)
        assert status in (200, 401, 404), path
        csp = got["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, path
        assert got["X-Content-Type-Options"] == "nosniff", path
        assert got["Referrer-Policy"] == "no-referrer", path
    _, _, page = _call(url, "/review")
    # Nothing inline for the CSP to have to allow: no script / style blocks, handlers, styles.
    assert b"<script>" not in page and b"<style>" not in page
    assert not re.search(rb"\son[a-z]+\s*=|\sstyle\s*=|javascript:", page, re.IGNORECASE)


def test_token_only_in_the_authorization_header(review):
    url, _ = review
    assert _call(url, "/api/conditions")[0] == 401
    assert _call(url, "/api/conditions", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert _call(url, "/api/conditions", headers=AUTH)[0] == 200
    for path in (
        f"/api/conditions?token={TOKEN}",
        f"/review?token={TOKEN}",
        f"/api/conditions?access_token={TOKEN}",
    ):
        status, _, body = _call(url, path, headers=AUTH)
        assert status == 400, path
        error = json.loads(body)["error"]
        assert error["code"] == "INVALID_ARGUMENT" and "token" in error["violations"][0]["field"]
        assert TOKEN not in body.decode()


def test_posts_must_be_json_from_this_origin(review):
    url, item_id = review
    form = urllib.parse.urlencode(_feedback(item_id)).encode()
    for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data"):
        status, _, body = _call(
            url, "/api/feedback", method="POST", body=form, headers={**AUTH, "Content-Type": ctype}
        )
        assert status == 415, ctype
        assert json.loads(body)["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    status, _, _ = _json_post(url, _feedback(item_id), Origin="https://evil.example")
    assert status == 403
    base = urllib.parse.urlsplit(url)
    status, _, body = _json_post(url, _feedback(item_id), Origin=f"{base.scheme}://{base.netloc}")
    assert status == 200 and json.loads(body)["duplicate"] is False


@pytest.mark.parametrize("limit", ["abc", "-1", "101", "1e3", "9" * 5000, "0x10"])
def test_bad_limit_is_400_naming_the_parameter(review, limit):
    url, _ = review
    status, _, body = _call(url, f"/api/next?rater=dr_http&limit={limit}", headers=AUTH)
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["violations"][0]["field"] == "limit"


def test_no_caller_input_gets_a_500(review):
    url, item_id = review
    gets = [
        "/api/next?rater=dr_http&class_name=neutrophil&prompt=x",
        "/api/next?rater=" + "x" * 300,
        "/api/next?rater=%00",
        "/api/checklist",
        "/api/checklist?class_name=%3Cb%3E",
        "/api/agreement?prompt=" + "p" * 2000,
        "/api/image/nope",
        "/api/image/..%2F..%2Fx",
        "/api/image/%00",
        "/api/image/",
        "/api/" + "a" * 3000,
        "/api/next?" + "&".join(f"k{i}=v" for i in range(100)),
    ]
    posts: list[tuple[bytes, dict[str, str]]] = [
        (b"not json", {}),
        (b"[1, 2]", {}),
        (b"{" * 100000, {}),
        (b"\xff\xfe", {}),
        (b"{}", {"Content-Length": "-5"}),
        (b"{}", {"Content-Length": "lots"}),
        (b"{}", {"Content-Length": str(10**9)}),
    ] + [
        (json.dumps({**_feedback(item_id), **bad}).encode(), {})
        for bad in (
            {"time_spent_ms": "soon"},
            {"time_spent_ms": 1e400},
            {"time_spent_ms": 10**30},
            {"time_spent_ms": -1},
            {"time_spent_ms": True},
            {"criteria": [1]},
            {"criteria": {"nucleus_count": "yes"}},
            {"criteria": {"no_such": True}},
            {"plausible": "yes"},
            {"rater_id": {"a": 1}},
            {"rater_id": "<script>"},
            {"item_id": 7},
            {"item_id": "../../catalog/x"},
            {"client_request_id": "x" * 1000},
            {"comment": "c" * 10000},
        )
    ]
    for path in gets:
        status, _, body = _call(url, path, headers=AUTH)
        assert 400 <= status < 500, (path, status, body[:200])
        assert json.loads(body)["error"]["code"]
    for payload, extra in posts:
        status, _, body = _call(
            url,
            "/api/feedback",
            method="POST",
            body=payload,
            headers={**AUTH, "Content-Type": "application/json", **extra},
        )
        assert 400 <= status < 500, (payload[:80], extra, status, body[:200])
        assert json.loads(body)["error"]["code"]
    for method in ("PUT", "DELETE"):
        status, _, _ = _call(
            url,
            "/api/feedback",
            method=method,
            body=b"{}",
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert status in (404, 405), method
