"""The review page's HTTP door has the same audit trail as gRPC: each ``/api/`` request is
recorded under the RPC its route stands for, with the signed-in principal and the outcome, and
the page's static files are not (a real reward service, real JWTs, real HTTP)."""

from __future__ import annotations

import json
import pathlib
import urllib.error
import urllib.request
from typing import Any

from auth_helpers import Issuer

R = "/clinisynth.v1.RewardService/"


def _call(url: str, token: str, body: dict[str, Any] | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Authorization", f"Bearer {token}")
    if data:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _records(store: pathlib.Path) -> list[dict[str, Any]]:
    files = sorted(p for p in (store / "audit").rglob("*.json") if p.is_file())
    return [json.loads(p.read_text()) for p in files]


def test_page_api_calls_are_audited_with_principal_and_outcome(start_reward, tmp_path) -> None:  # type: ignore[no-untyped-def]
    issuer = Issuer()
    _running, page = start_reward(**issuer.settings(tmp_path))
    base = page.rsplit("/review", 1)[0]
    expert = issuer.token("expert", sub="dr_a")

    assert _call(base + "/review.js", expert) == 200  # static: not audited
    assert _call(base + "/api/whoami", expert) == 200
    assert _call(base + "/api/next?rater=dr_a&class_name=neutrophil", expert) == 200
    judgement = {"item_id": "absent", "rater_id": "dr_b", "plausible": True}
    assert _call(base + "/api/feedback", expert, judgement) == 403  # judged as someone else
    requester = issuer.token("requester", sub="lab_7")
    assert _call(base + "/api/agreement?class_name=x", requester) == 403

    seen = [(r["principal"], r["method"], r["code"]) for r in _records(tmp_path / "s0")]
    assert sorted(seen) == sorted(
        [
            ("dr_a", R + "whoami", "OK"),
            ("dr_a", R + "NextReviewItems", "OK"),
            ("dr_a", R + "SubmitFeedback", "PERMISSION_DENIED"),
            ("lab_7", R + "GetAgreement", "PERMISSION_DENIED"),
        ]
    ), seen
    for record in _records(tmp_path / "s0"):
        assert record["peer"].startswith("review-page http:127.0.0.1")
        assert "dr_b" not in json.dumps(record)  # the body's content is never recorded


def test_page_answers_503_when_its_record_cannot_be_written(start_reward, tmp_path) -> None:  # type: ignore[no-untyped-def]
    issuer = Issuer()
    _running, page = start_reward(**issuer.settings(tmp_path))
    base = page.rsplit("/review", 1)[0]
    expert = issuer.token("expert", sub="dr_a")
    assert _call(base + "/api/whoami", expert) == 200
    store = tmp_path / "s0"
    moved = store / "audit-moved"
    (store / "audit").rename(moved)
    (store / "audit").write_text("the audit prefix is not writable")
    try:
        assert _call(base + "/api/whoami", expert) == 503
    finally:
        (store / "audit").unlink()
        moved.rename(store / "audit")
    assert _call(base + "/api/whoami", expert) == 200  # back without a restart
    assert len(_records(store)) == 2
