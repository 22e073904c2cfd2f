"""Role × RPC over real gRPC: the four services, JWTs signed by a key pair made here.

Every RPC of every proto service is called with a minimal request, once per role. What matters is
the auth layer's answer: UNAUTHENTICATED / PERMISSION_DENIED, or anything else (the call got past
it and the servicer answered, usually INVALID_ARGUMENT or UNAVAILABLE: there is no Triton here,
on purpose — the services start in well under a second without one).
"""

from __future__ import annotations

import importlib
import itertools
import json
import pathlib
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import numpy as np
import pytest
from auth_helpers import Issuer
from conftest import start_service
from google.protobuf import message_factory

import clinisynth
from clinisynth.v1 import reward_pb2, reward_pb2_grpc
from clinisynth_server.reward import app as reward_app
from clinisynth_server.runtime import roles
from clinisynth_server.runtime.auth import token_sha256
from clinisynth_server.runtime.config import load_config
from clinisynth_server.runtime.server import start_server

DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
LEGACY, SERVICE_ACCOUNT = "legacy-shared-token", "svc-trainer-token"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("auth")
    issuer = Issuer()
    (home / "accounts.toml").write_text(
        '[[accounts]]\nname = "ci-trainer"\nroles = ["trainer"]\n'
        f'token_sha256 = "{token_sha256(SERVICE_ACCOUNT)}"\n'
    )
    auth = {
        **issuer.settings(home),
        "auth_tokens": LEGACY,
        "auth_service_accounts": str(home / "accounts.toml"),
    }
    running: dict[str, Any] = {}
    try:
        for name in ("generator", "counterfactual", "finetune"):
            running[name] = start_service(name, "127.0.0.1:1", str(home / "store"), home, **auth)
        env = {f"CLINISYNTH_{k.upper()}": v for k, v in auth.items()}
        env.update(CLINISYNTH_TRITON_URL="127.0.0.1:1", CLINISYNTH_STORE_URL=str(home / "store"))
        config = load_config("reward", env={**env, "CLINISYNTH_REWARD_HTTP_PORT": "0"}, port=0)
        register = reward_app.create(config)
        running["reward"] = start_server(config, register, serve_metrics=False)
        # a function attribute app.create sets (as the conftest fixture reads it)
        page = register.app.web.url.rsplit("/review", 1)[0]  # type: ignore[attr-defined]
        yield {"servers": running, "issuer": issuer, "page": page}
    finally:
        for server in running.values():
            server.stop(0)


def _methods() -> list[tuple[str, Any]]:
    out = []
    for name in ("generator", "reward", "counterfactual", "finetune"):
        module = importlib.import_module(f"clinisynth.v1.{name}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            out += [(name, m) for m in service.methods]
    # AuditService is served by every service: call it on the finetune service's channel.
    audit = importlib.import_module("clinisynth.v1.audit_pb2")
    for service in audit.DESCRIPTOR.services_by_name.values():
        out += [("finetune", m) for m in service.methods]
    return out


METHODS = _methods()


def _call(channel: grpc.Channel, method: Any, token: str | None) -> grpc.StatusCode:
    """Call ``method`` with an empty request (one for a client stream); return the final code."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = message_factory.GetMessageClass(method.input_type)()
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    stub = kinds[(method.client_streaming, method.server_streaming)](
        path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=None
    )
    arg = iter([request]) if method.client_streaming else request
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        result = stub(arg, timeout=20, metadata=metadata)
        if method.server_streaming:
            for _ in result:
                result.cancel()  # one message is proof enough that the call got through
                return grpc.StatusCode.OK
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


@pytest.fixture(scope="module")
def channels(stack: dict[str, Any]) -> Iterator[dict[str, grpc.Channel]]:
    chans = {name: grpc.insecure_channel(s.address) for name, s in stack["servers"].items()}
    yield chans
    for channel in chans.values():
        channel.close()


def test_role_matrix_every_rpc(stack: dict[str, Any], channels: dict[str, grpc.Channel]) -> None:
    """Each role passes exactly the RPCs the table gives it and is PERMISSION_DENIED elsewhere."""
    issuer = stack["issuer"]
    tokens = {role: issuer.token(role) for role in roles.ROLES}
    wrong: list[str] = []
    for service, method in METHODS:
        path = f"/{method.containing_service.full_name}/{method.name}"
        allowed = roles.roles_for(path)
        for role, token in tokens.items():
            code = _call(channels[service], method, token)
            if role in allowed and code in DENIED:
                wrong.append(f"{path} as {role}: {code.name}, the table allows it")
            if role not in allowed and code != grpc.StatusCode.PERMISSION_DENIED:
                wrong.append(f"{path} as {role}: {code.name}, wanted PERMISSION_DENIED")
    assert wrong == []
    assert len(METHODS) == len(roles.RPC_ROLES)  # every RPC was called


BAD_TOKENS = {
    "missing": lambda i: None,
    "expired": lambda i: i.token("admin", exp=int(time.time()) - 300),
    "wrong audience": lambda i: i.token("admin", aud="another-service"),
    "wrong issuer": lambda i: i.token("admin", iss="https://evil.test"),
    "tampered": lambda i: _tamper(i.token("expert")),
    "not a token": lambda i: "not-a-token",
    "other signer": lambda i: Issuer().token("admin"),
}


def _tamper(token: str) -> str:
    """Swap the claims for ones granting admin, keeping the original signature."""
    head, body, sig = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(body))
    claims["clinisynth_roles"] = ["admin"]
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    return f"{head}.{forged}.{sig}"


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_tokens_are_unauthenticated_on_every_service(
    stack: dict[str, Any], channels: dict[str, grpc.Channel], case: str
) -> None:
    token = BAD_TOKENS[case](stack["issuer"])
    for service, method in METHODS:
        if method.name in ("ListModels", "GetModel") or method.name == "CreateJob":
            assert _call(channels[service], method, token) == grpc.StatusCode.UNAUTHENTICATED


def test_static_tokens_service_account_and_legacy(channels: dict[str, grpc.Channel]) -> None:
    by_name = {f"{s}/{m.name}": (s, m) for s, m in METHODS}
    import_model, create_job = by_name["finetune/ImportModel"], by_name["finetune/CreateJob"]
    ch = channels["finetune"]
    # a mapped service account has its roles only
    assert _call(ch, create_job[1], SERVICE_ACCOUNT) not in DENIED
    assert _call(ch, import_model[1], SERVICE_ACCOUNT) == grpc.StatusCode.PERMISSION_DENIED
    # an unmapped static token keeps its old power: every role (documented as legacy)
    assert _call(ch, import_model[1], LEGACY) not in DENIED


def test_health_needs_no_token(channels: dict[str, grpc.Channel]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for channel in channels.values():
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- the rater is the authenticated principal ------------------------------------------------


_DISTINCT = itertools.count(1)


@pytest.fixture()
def review_item(stack: dict[str, Any]) -> str:
    """A fresh review item per test (its pixels differ: items are content-addressed)."""
    reward = stack["servers"]["reward"]
    token = stack["issuer"].token("trainer", sub="curator")
    pixels = np.full((8, 8), next(_DISTINCT) / 100, np.float32)
    with clinisynth.Client(endpoints={"reward": reward.address}, token=token, timeout=60) as c:
        return c.review.enqueue([pixels], class_name="neutrophil")[0].id


def test_feedback_rater_is_the_principal(
    stack: dict[str, Any], channels: dict[str, grpc.Channel], review_item: str
) -> None:
    stub = reward_pb2_grpc.RewardServiceStub(channels["reward"])
    meta = (("authorization", f"Bearer {stack['issuer'].token('expert', sub='dr_a')}"),)

    def submit(rater: str, crid: str) -> reward_pb2.SubmitFeedbackResponse:
        fb = reward_pb2.Feedback(
            rater_id=rater, item_id=review_item, plausible=True, client_request_id=crid
        )
        return stub.SubmitFeedback(
            reward_pb2.SubmitFeedbackRequest(feedback=fb), metadata=meta, timeout=20
        )

    with pytest.raises(grpc.RpcError) as info:
        submit("dr_b", "r-other")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "feedback.rater_id" in (info.value.details() or "")
    assert submit("", "r-own").feedback.rater_id == "dr_a"  # empty → the principal
    assert submit("dr_a", "r-own").duplicate  # naming yourself is fine (and a retry)
    with pytest.raises(grpc.RpcError) as info:
        stub.NextReviewItems(
            reward_pb2.NextReviewItemsRequest(rater_id="dr_b"), metadata=meta, timeout=20
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _http(url: str, path: str, token: str | None, body: dict[str, Any] | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_review_page_signs_in_as_the_principal(stack: dict[str, Any], review_item: str) -> None:
    page, issuer = stack["page"], stack["issuer"]
    expert = issuer.token("expert", sub="dr_c")
    assert _http(page, "/api/whoami", None)[0] == 401
    assert _http(page, "/api/whoami", issuer.token("expert", aud="x"))[0] == 401
    assert _http(page, "/api/next?rater=dr_c", issuer.token("requester"))[0] == 403
    status, me = _http(page, "/api/whoami", expert)
    assert status == 200 and me["rater"] == "dr_c" and me["roles"] == ["expert"]
    assert _http(page, "/api/next?rater=dr_a", expert)[0] == 403
    status, nxt = _http(page, "/api/next", expert)  # the rater comes from the token
    assert status == 200 and [i["id"] for i in nxt["items"]] == [review_item]
    judgement = {"item_id": review_item, "plausible": False, "client_request_id": "w1"}
    status, err = _http(page, "/api/feedback", expert, {**judgement, "rater_id": "dr_a"})
    assert status == 403 and err["error"]["code"] == "PERMISSION_DENIED"
    status, ok = _http(page, "/api/feedback", expert, judgement)
    assert status == 200 and ok["feedback"]["rater_id"] == "dr_c"


# --- the SDK reads a token file on every call (rotation) --------------------------------------


def test_sdk_token_file_is_reread_each_call(stack: dict[str, Any], tmp_path: pathlib.Path) -> None:
    reward = stack["servers"]["reward"]
    issuer = stack["issuer"]
    token_file = tmp_path / "token"
    token_file.write_text(issuer.token("expert", sub="dr_a") + "\n")
    with clinisynth.Client(
        endpoints={"reward": reward.address}, token_file=str(token_file), timeout=20, retries=0
    ) as client:
        assert client.feedback.list() is not None  # expert may list feedback
        token_file.write_text(issuer.token("requester"))  # rotated: a token without the role
        with pytest.raises(clinisynth.PermissionDeniedError):
            client.feedback.list()
        token_file.write_text(issuer.token("expert", exp=int(time.time()) - 300))
        with pytest.raises(clinisynth.UnauthenticatedError):
            client.feedback.list()
