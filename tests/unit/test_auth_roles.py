"""The role table covers every RPC, the doc shows it, and token verification refuses what it must.

No network: keys are generated here, the JWKS is a file or a loopback HTTP server this test runs.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import pathlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from clinisynth_server.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from clinisynth_server.runtime import roles
from clinisynth_server.runtime.auth import (
    AllowAll,
    BearerAuth,
    JwksSource,
    JwtVerifier,
    authenticator_for,
    load_service_accounts,
    token_sha256,
)
from clinisynth_server.runtime.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
ISS, AUD = "https://idp.test", "clinisynth"
PROTO_MODULES = ("generator", "reward", "counterfactual", "finetune", "common", "audit")


def _proto_rpcs() -> set[str]:
    out: set[str] = set()
    for name in PROTO_MODULES:
        module = importlib.import_module(f"clinisynth.v1.{name}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            out |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return out


def test_every_rpc_of_every_proto_service_has_a_role_entry() -> None:
    rpcs = _proto_rpcs()
    assert len(rpcs) >= 30  # the four services; an import that found none would pass vacuously
    assert sorted(rpcs - set(roles.RPC_ROLES)) == [], "add them to runtime/roles.py RPC_ROLES"
    assert sorted(set(roles.RPC_ROLES) - rpcs) == [], "stale entries: no such RPC"


def test_security_doc_shows_the_role_table() -> None:
    doc = (ROOT / "docs" / "SECURITY.md").read_text()
    assert roles.markdown_table() in doc, "regenerate: python scripts/gen_role_table.py"


def test_admin_everything_unknown_methods_admin_only_health_open() -> None:
    trainer = roles.Principal("t", frozenset({roles.TRAINER}))
    admin = roles.Principal("a", frozenset({roles.ADMIN}))
    for method in roles.RPC_ROLES:
        roles.authorize(method, admin)
    with pytest.raises(PermissionDenied):
        roles.authorize("/clinisynth.v1.FinetuneService/ImportModel", trainer)
    with pytest.raises(PermissionDenied):
        roles.authorize("/some.New/Rpc", trainer)
    roles.authorize("/grpc.health.v1.Health/Check", roles.PUBLIC)


def test_the_rater_is_the_principal() -> None:
    me = roles.Principal("dr_a", frozenset({roles.EXPERT}))
    assert roles.bind_rater(me, "", "rater_id") == "dr_a"
    assert roles.bind_rater(me, "dr_a", "rater_id") == "dr_a"
    with pytest.raises(PermissionDenied, match="rater_id"):
        roles.bind_rater(me, "dr_b", "rater_id")
    # auth off / a legacy shared token: nobody in particular, the body names the rater as before
    assert roles.bind_rater(roles.ANONYMOUS, "dr_b", "rater_id") == "dr_b"


# --- tokens --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "r1"}
    ec_jwk = {**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "e1"}
    return {"rsa": rsa_key, "ec": ec_key, "jwks": {"keys": [rsa_jwk, ec_jwk]}}


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "dr_a", "exp": now + 600, "iat": now, "nbf": now}
    base.update({"clinisynth_roles": ["expert"], "clinisynth_tenant": "lab-1"})
    return {k: v for k, v in {**base, **over}.items() if v is not None}


def _verifier(tmp_path: pathlib.Path, jwks: dict[str, Any]) -> JwtVerifier:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    return JwtVerifier(JwksSource(str(path)), issuer=ISS, audience=AUD, clock_skew_s=30)


def test_valid_rs256_and_es256_tokens_become_principals(tmp_path, keys) -> None:
    verifier = _verifier(tmp_path, keys["jwks"])
    rs = jwt.encode(_claims(), keys["rsa"], algorithm="RS256", headers={"kid": "r1"})
    es = jwt.encode(
        _claims(clinisynth_roles="scorer requester"), keys["ec"], "ES256", headers={"kid": "e1"}
    )
    assert verifier.verify(rs) == roles.Principal("dr_a", frozenset({"expert"}), "lab-1")
    assert verifier.verify(es).roles == frozenset({"scorer", "requester"})


def _hs256(secret: bytes, body: str) -> str:
    """A token MACed with ``secret`` by hand (PyJWT itself refuses to use a PEM as a secret)."""
    head = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT","kid":"r1"}').decode()
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{jwt.utils.base64url_encode(mac).decode()}"


def test_bad_tokens_are_unauthenticated(tmp_path, keys) -> None:
    verifier = _verifier(tmp_path, keys["jwks"])
    rsa_key = keys["rsa"]
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    good = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})
    head, body, sig = good.split(".")
    forged_body = jwt.utils.base64url_encode(
        json.dumps(_claims(clinisynth_roles=["admin"])).encode()
    ).decode()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    unsigned = jwt.utils.base64url_encode(b'{"alg":"none","kid":"r1"}').decode()
    cases = {
        "expired": jwt.encode(_claims(exp=int(time.time()) - 120), rsa_key, "RS256", {"kid": "r1"}),
        "not yet": jwt.encode(_claims(nbf=int(time.time()) + 600), rsa_key, "RS256", {"kid": "r1"}),
        "audience": jwt.encode(_claims(aud="other"), rsa_key, "RS256", {"kid": "r1"}),
        "issuer": jwt.encode(_claims(iss="https://evil.test"), rsa_key, "RS256", {"kid": "r1"}),
        "no exp": jwt.encode(_claims(exp=None), rsa_key, "RS256", {"kid": "r1"}),
        "tampered": f"{head}.{forged_body}.{sig}",
        "other key": jwt.encode(_claims(), other, "RS256", {"kid": "r1"}),
        "unknown kid": jwt.encode(_claims(), rsa_key, "RS256", {"kid": "nope"}),
        "alg none": f"{unsigned}.{body}.",
        # the classic confusion: the public key used as an HMAC secret
        "hs256 public key": _hs256(public_pem, body),
        "rs key, es alg": jwt.encode(_claims(), keys["ec"], "ES256", {"kid": "r1"}),
        "garbage": "a.b.c",
    }
    for name, token in cases.items():
        with pytest.raises(Unauthenticated):
            verifier.verify(token)
            pytest.fail(name)


def test_small_clock_skew_is_tolerated(tmp_path, keys) -> None:
    verifier = _verifier(tmp_path, keys["jwks"])
    # expired 10 s ago, within the 30 s skew the verifier was given
    token = jwt.encode(_claims(exp=int(time.time()) - 10), keys["rsa"], "RS256", {"kid": "r1"})
    assert verifier.verify(token).name == "dr_a"


def test_symmetric_keys_in_a_jwks_are_never_used(tmp_path, keys) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    jwks = {"keys": [{"kty": "oct", "kid": "h1", "k": jwt.utils.base64url_encode(secret).decode()}]}
    verifier = _verifier(tmp_path, jwks)
    verifier.algorithms = ("HS256", "RS256")  # even if someone widened the list
    token = jwt.encode(_claims(), secret, "HS256", {"kid": "h1"})
    with pytest.raises((Unauthenticated, Unavailable)):
        verifier.verify(token)


def test_config_refuses_hmac_algorithms_and_needs_issuer_and_audience(tmp_path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    base = {"CLINISYNTH_AUTH_JWKS": str(jwks), "CLINISYNTH_AUTH_ISSUER": ISS}
    with pytest.raises(InvalidArgument, match="CLINISYNTH_AUTH_AUDIENCE"):
        authenticator_for(load_config("reward", env=base))
    env = {**base, "CLINISYNTH_AUTH_AUDIENCE": AUD, "CLINISYNTH_AUTH_ALGORITHMS": "RS256,HS256"}
    with pytest.raises(InvalidArgument, match="CLINISYNTH_AUTH_ALGORITHMS"):
        authenticator_for(load_config("reward", env=env))
    assert isinstance(authenticator_for(load_config("reward", env={})), AllowAll)


def test_static_tokens_map_to_service_accounts_and_unmapped_ones_are_legacy(tmp_path) -> None:
    path = tmp_path / "accounts.toml"
    path.write_text(
        f'[[accounts]]\nname = "ci-trainer"\nroles = ["trainer"]\ntenant = "lab-1"\n'
        f'token_sha256 = "{token_sha256("svc-token")}"\n'
    )
    auth = BearerAuth(["old-token"], load_service_accounts(str(path), "accounts"))
    meta = [("authorization", "Bearer svc-token")]
    assert auth.authenticate("/x/Y", meta) == roles.Principal(
        "ci-trainer", frozenset({"trainer"}), "lab-1", via="service-account"
    )
    legacy = auth.authenticate("/x/Y", [("authorization", "Bearer old-token")])
    assert legacy.roles == roles.ALL_ROLES and not legacy.personal
    assert "old-token" not in legacy.name
    for bad in ([], [("authorization", "Basic x")], [("authorization", "Bearer nope")]):
        with pytest.raises(Unauthenticated):
            auth.authenticate("/x/Y", bad)
    path.write_text('[[accounts]]\nname = "x"\nroles = ["root"]\ntoken_sha256 = "00"\n')
    with pytest.raises(InvalidArgument):
        load_service_accounts(str(path), "accounts")


# --- a JWKS URL: cached, refreshed on an unknown kid (bounded), with a timeout ------------------


@pytest.fixture()
def jwks_server() -> Iterator[tuple[str, dict[str, Any]]]:
    state: dict[str, Any] = {"jwks": {"keys": []}, "hits": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["hits"] += 1
            body = json.dumps(state["jwks"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json", state
    httpd.shutdown()
    httpd.server_close()


def test_jwks_url_refreshes_on_rotation_but_not_for_every_made_up_kid(jwks_server, keys) -> None:
    url, state = jwks_server
    rsa_jwk, ec_jwk = keys["jwks"]["keys"]
    state["jwks"] = {"keys": [rsa_jwk]}
    source = JwksSource(url, min_refresh_s=0)
    assert source.key("r1").key_id == "r1" and state["hits"] == 1
    assert source.key("r1") and state["hits"] == 1  # cached
    state["jwks"] = {"keys": [rsa_jwk, ec_jwk]}  # the issuer rotated in a new key
    assert source.key("e1").key_id == "e1" and state["hits"] == 2

    bounded = JwksSource(url, min_refresh_s=3600)
    bounded.key("r1")
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            bounded.key("made-up")
    assert state["hits"] == 3  # one fetch for the first lookup, none for the made-up kids


def test_jwks_url_that_hangs_is_unavailable_not_a_hang() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        source = JwksSource(f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout_s=0.3)
        with pytest.raises(Unavailable):
            source.key("r1")
    finally:
        listener.close()


def test_plain_http_jwks_only_on_loopback() -> None:
    with pytest.raises(InvalidArgument, match="https"):
        JwksSource("http://idp.example/jwks.json")


def test_cli_and_sdk_read_the_token_file_on_every_call(tmp_path, monkeypatch) -> None:
    from clinisynth._transport import make_settings
    from clinisynth.cli import build_parser
    from clinisynth.cli._common import client_from

    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    ns = build_parser().parse_args(
        ["--address", "127.0.0.1", "--token-file", str(token_file), "models", "list"]
    )
    settings = client_from(ns)._t.settings
    assert settings.metadata == (("authorization", "Bearer first"),)
    token_file.write_text("rotated")
    assert settings.metadata == (("authorization", "Bearer rotated"),)
    monkeypatch.setenv("CLINISYNTH_TOKEN_FILE", str(token_file))
    from_env = make_settings("127.0.0.1", None, None, False, None, 5.0, 0)
    assert from_env.metadata == (("authorization", "Bearer rotated"),)
    explicit = make_settings("127.0.0.1", None, "given", False, None, 5.0, 0)
    assert explicit.metadata == (("authorization", "Bearer given"),)  # a token beats the env
