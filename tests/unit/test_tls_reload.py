"""The certificate reloader and the client-certificate accounts, without a server.

What is checked here is the decision logic behind the gRPC port (tests/grpc/test_mtls.py serves
the same through a real TLS port): a renewed set is served only when it is whole and matching,
a bad one is reported once per change and never replaces the served set, and a client
certificate maps to an account by fingerprint, SAN or subject, with a token winning over it.
"""

from __future__ import annotations

import os
import pathlib

import pytest
from tls_helpers import Issued, TestCA

from clinisynth_server.errors import InvalidArgument, Unauthenticated
from clinisynth_server.runtime import roles
from clinisynth_server.runtime.auth import (
    BearerAuth,
    CertificateAccounts,
    authenticator_for,
    load_service_accounts,
    token_sha256,
)
from clinisynth_server.runtime.config import load_config
from clinisynth_server.runtime.tls import (
    ReloadingCertificates,
    parse_peer_certificate,
    validate,
)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def _install(folder: pathlib.Path, issued: Issued) -> None:
    """Replace the files the way a Secret mount does: new files renamed into place."""
    for name, data in (("tls.crt", issued.cert), ("tls.key", issued.key)):
        tmp = folder / f".{name}.new"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)


def _reloader(folder: pathlib.Path, events: list[str]) -> ReloadingCertificates:
    return ReloadingCertificates(
        str(folder / "tls.crt"), str(folder / "tls.key"), on_reload=events.append
    )


def test_a_renewed_pair_is_served_and_a_touch_changes_nothing(tmp_path, ca) -> None:
    first, second = ca.server(), ca.server()
    _install(tmp_path, first)
    events: list[str] = []
    certs = _reloader(tmp_path, events)
    assert certs.served.serial == first.serial
    assert certs.check() is None  # nothing changed on disk
    os.utime(tmp_path / "tls.crt")  # same bytes, new mtime: not a renewal
    assert certs.check() is None and events == []
    _install(tmp_path, second)
    fresh = certs.check()
    assert fresh is not None and fresh.serial == second.serial == certs.served.serial
    assert events == ["reloaded"]
    assert certs.fetch() is None  # gRPC asks again on the next handshake: no change


@pytest.mark.parametrize("bad", ["garbage", "truncated", "wrong key", "missing"])
def test_a_bad_renewal_keeps_the_old_pair_and_is_counted_once(tmp_path, ca, bad) -> None:
    first, second = ca.server(), ca.server()
    _install(tmp_path, first)
    events: list[str] = []
    certs = _reloader(tmp_path, events)
    if bad == "garbage":
        (tmp_path / "tls.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    elif bad == "truncated":  # a half-written file
        (tmp_path / "tls.crt").write_bytes(second.cert[: len(second.cert) // 2])
    elif bad == "wrong key":  # the certificate renewed, its new key not written yet
        (tmp_path / "tls.crt").write_bytes(second.cert)
    else:
        (tmp_path / "tls.key").unlink()
    assert certs.fetch() is None
    assert certs.fetch() is None  # the same bad files: not reported again
    assert certs.served.serial == first.serial
    assert events == ["failed"]
    _install(tmp_path, second)  # the renewal completes
    assert certs.fetch() is not None
    assert certs.served.serial == second.serial
    assert events == ["failed", "reloaded"]


def test_the_first_load_must_succeed_and_names_the_setting(tmp_path, ca) -> None:
    a, b = ca.server(), ca.server()
    (tmp_path / "tls.crt").write_bytes(a.cert)
    (tmp_path / "tls.key").write_bytes(b.key)
    with pytest.raises(InvalidArgument, match="CLINISYNTH_TLS_KEY"):
        _reloader(tmp_path, [])
    (tmp_path / "tls.crt").write_bytes(b"not pem")
    with pytest.raises(InvalidArgument, match="CLINISYNTH_TLS_CERT"):
        _reloader(tmp_path, [])
    (tmp_path / "tls.crt").write_bytes(b.cert)
    (tmp_path / "ca.crt").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="CLINISYNTH_TLS_CLIENT_CA"):
        ReloadingCertificates(
            str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), str(tmp_path / "ca.crt")
        )


def test_validate_accepts_a_chain_whose_leaf_matches_the_key(ca) -> None:
    leaf = ca.server()
    served = validate(leaf.cert + ca.pem, leaf.key, ca.pem)
    assert served.serial == leaf.serial and served.client_ca == ca.pem


# --- client certificates → accounts ------------------------------------------------------------


def _accounts_file(tmp_path: pathlib.Path, body: str) -> str:
    path = tmp_path / "accounts.toml"
    path.write_text(body)
    return str(path)


def test_certificates_map_by_fingerprint_san_and_subject(tmp_path, ca) -> None:
    pinned = ca.client("pinned")
    robot = ca.client("robot", uri="spiffe://hospital/robot")
    subject = ca.client("bridge", organization="Hospital")
    path = _accounts_file(
        tmp_path,
        f"""
[[accounts]]
name = "pinned-job"
roles = ["scorer"]
cert_sha256 = "{":".join(pinned.sha256[i : i + 2] for i in range(0, 64, 2)).upper()}"

[[accounts]]
name = "robot"
roles = ["requester"]
tenant = "radiology"
cert_san = "uri:spiffe://hospital/robot"

[[accounts]]
name = "bridge"
roles = ["trainer"]
cert_subject = "CN=bridge,O=Hospital"
token_sha256 = "{token_sha256("bridge-token")}"
""",
    )
    certs = CertificateAccounts.load(path, "accounts")
    got = certs.principal(parse_peer_certificate(robot.cert))
    assert got == roles.Principal("robot", frozenset({"requester"}), "radiology", via="mtls")
    assert certs.principal(parse_peer_certificate(pinned.cert)).name == "pinned-job"
    assert certs.principal(parse_peer_certificate(subject.cert)).roles == {"trainer"}
    with pytest.raises(Unauthenticated, match="maps to no account"):
        certs.principal(parse_peer_certificate(ca.client("stranger").cert))
    # the same file still maps the bridge's token, as a service account
    tokens = load_service_accounts(path, "accounts")
    assert tokens[token_sha256("bridge-token")].via == "service-account"


def test_a_token_wins_over_the_certificate(tmp_path, ca) -> None:
    robot = ca.client("robot", uri="spiffe://hospital/robot")
    path = _accounts_file(
        tmp_path,
        f"""
[[accounts]]
name = "robot"
roles = ["requester"]
cert_san = "URI:spiffe://hospital/robot"

[[accounts]]
name = "operator"
roles = ["admin"]
token_sha256 = "{token_sha256("op-token")}"
""",
    )
    auth = BearerAuth(
        accounts=load_service_accounts(path, "a"), certificates=CertificateAccounts.load(path, "a")
    )
    peer = parse_peer_certificate(robot.cert)
    assert auth.authenticate("/x/Y", [], peer).name == "robot"
    token = [("authorization", "Bearer op-token")]
    assert auth.authenticate("/x/Y", token, peer).name == "operator"
    with pytest.raises(Unauthenticated):  # a bad token is refused, never replaced by the cert
        auth.authenticate("/x/Y", [("authorization", "Bearer nope")], peer)
    with pytest.raises(Unauthenticated):  # no certificate, no token
        auth.authenticate("/x/Y", [])
    assert auth.authenticate("/grpc.health.v1.Health/Check", [], None) == roles.PUBLIC


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('name = "a"\nroles = []\n', "accounts[0].token_sha256"),
        ('name = "a"\ncert_san = "spiffe://x"\n', "accounts[0].cert_san"),
        ('name = "a"\ncert_san = "IP:not-an-ip"\n', "accounts[0].cert_san"),
        ('name = "a"\ncert_sha256 = "abc"\n', "accounts[0].cert_sha256"),
        ('name = "a"\ncert_subject = "robot"\n', "accounts[0].cert_subject"),
        ('name = "a"\ncert_subject = 3\n', "accounts[0].cert_subject"),
        ('name = "a"\ncert_san = "DNS:x"\nroles = ["root"]\n', "accounts[0].roles"),
    ],
)
def test_the_accounts_file_is_refused_by_field(tmp_path, body, field) -> None:
    path = _accounts_file(tmp_path, "[[accounts]]\n" + body)
    with pytest.raises(InvalidArgument) as info:
        CertificateAccounts.load(path, "CLINISYNTH_AUTH_SERVICE_ACCOUNTS")
    assert info.value.violations[0].field == f"CLINISYNTH_AUTH_SERVICE_ACCOUNTS: {field}"


def test_two_accounts_may_not_claim_one_certificate_name(tmp_path) -> None:
    entry = '[[accounts]]\nname = "{}"\ncert_san = "DNS:Robot.example"\n'
    path = _accounts_file(tmp_path, entry.format("a") + entry.format("b").lower())
    with pytest.raises(InvalidArgument, match=r"accounts\[1\].cert_san"):
        CertificateAccounts.load(path, "accounts")


def test_a_client_ca_turns_authentication_on(tmp_path) -> None:
    config = load_config("reward", env={"CLINISYNTH_TLS_CLIENT_CA": str(tmp_path / "ca.crt")})
    assert config.tls_client_ca.endswith("ca.crt")
    auth = authenticator_for(config)
    assert isinstance(auth, BearerAuth)
    with pytest.raises(Unauthenticated):
        auth.authenticate("/x/Y", [])
