"""Client certificates as principals and certificates renewed without a restart, over real TLS.

Every server here is ``runtime.server.start_server`` on a loopback port with certificates a CA
made in the test signs: the handshake, the client-certificate verification and the reload all
happen in gRPC's own TLS stack. Role checks are the one role table's; the RPC names are real
(``GeneratorService/ListModels`` for any role, ``FinetuneService/DeleteModel`` admin only), served
by a generic handler that answers the caller's principal.
"""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_helpers import Issued, TestCA, served_serial

from clinisynth.v1 import audit_pb2, audit_pb2_grpc
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.runtime.auth import principal_of, token_sha256
from clinisynth_server.runtime.config import load_config
from clinisynth_server.runtime.dependencies import Dependencies
from clinisynth_server.runtime.server import RunningServer, start_server

HEALTHCHECK = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "docker" / "healthcheck.py"
ANY_ROLE = "/clinisynth.v1.GeneratorService/ListModels"
ADMIN_ONLY = "/clinisynth.v1.FinetuneService/DeleteModel"


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    p = principal_of(context)
    return f"{p.name}|{p.via}|{p.tenant}|{','.join(sorted(p.roles))}".encode()


def _register(server: grpc.Server, metrics: object) -> list[str]:
    handler = grpc.unary_unary_rpc_method_handler(_whoami)  # raw bytes in and out
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("clinisynth.v1.GeneratorService", {
                "ListModels": handler
            }),
            grpc.method_handlers_generic_handler("clinisynth.v1.FinetuneService", {
                "DeleteModel": handler
            }),
        )
    )  # fmt: skip
    return []


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def tls_files(tmp_path: pathlib.Path, ca: TestCA) -> pathlib.Path:
    ca.server().write(tmp_path, "tls")
    (tmp_path / "client-ca.crt").write_bytes(ca.pem)
    return tmp_path


def _install(folder: pathlib.Path, issued: Issued) -> None:
    """Renew as a Secret mount does: each file replaced whole by a rename."""
    for name, data in (("tls.crt", issued.cert), ("tls.key", issued.key)):
        (folder / f".{name}").write_bytes(data)
        os.replace(folder / f".{name}", folder / name)


def _start(folder: pathlib.Path, *, audited: bool = False, **settings: str) -> RunningServer:
    """A server on the TLS files in ``folder``; ``audited``: with a store, so calls leave audit
    records and ``AuditService`` is served (as every real service does)."""
    config = load_config(
        "generator",
        env={},
        port=0,
        metrics_port=0,
        host="localhost",
        tls_cert=str(folder / "tls.crt"),
        tls_key=str(folder / "tls.key"),
        store_url=str(folder / "store"),
        **settings,
    )

    opened: list[Dependencies] = []  # held while the server runs (the registry is weak)

    def register(server: grpc.Server, metrics: object) -> list[str]:
        if audited:  # the store the interceptor writes audit records into
            opened.append(Dependencies.open(config))
        return _register(server, metrics)

    running = start_server(config, register, serve_metrics=False)
    running.on_stop(opened.clear)
    return running


def _channel(
    running: RunningServer, ca: TestCA, client: Issued | None, *, fresh: bool = True
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        ca.pem,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    # A channel option nobody else sets keeps gRPC from sharing a subchannel (a connection)
    # with another channel of this test: every channel is a new handshake.
    options = [("grpc.channel_id", os.urandom(8).hex())] if fresh else []
    return grpc.secure_channel(f"localhost:{running.port}", creds, options=options)


@pytest.fixture
def mtls(tls_files: pathlib.Path, ca: TestCA):
    accounts = tls_files / "accounts.toml"
    robot = ca.client("robot", uri="spiffe://hospital/pacs-robot")
    accounts.write_text(
        f"""
[[accounts]]
name = "pacs-robot"
roles = ["requester"]
tenant = "radiology"
cert_san = "URI:spiffe://hospital/pacs-robot"

[[accounts]]
name = "operator"
roles = ["admin"]
token_sha256 = "{token_sha256("operator-token")}"
"""
    )
    running = _start(
        tls_files,
        audited=True,
        tls_client_ca=str(tls_files / "client-ca.crt"),
        auth_service_accounts=str(accounts),
    )
    yield running, robot
    running.stop(0)


def test_a_mapped_certificate_is_its_account_and_roles_are_enforced(mtls, ca, caplog) -> None:
    running, robot = mtls
    caplog.set_level(logging.INFO, logger="clinisynth.access")
    with _channel(running, ca, robot) as channel:
        whoami = channel.unary_unary(ANY_ROLE)(b"", timeout=10)
        assert whoami == b"pacs-robot|mtls|radiology|requester"
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(ADMIN_ONLY)(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # a bearer token wins over the certificate: the operator calls through the robot's
        # connection (a gateway holding one certificate, calling for its users)
        token = (("authorization", "Bearer operator-token"),)
        as_operator = channel.unary_unary(ADMIN_ONLY)(b"", timeout=10, metadata=token)
        assert as_operator.startswith(b"operator|service-account|")
        with pytest.raises(grpc.RpcError) as info:  # a bad token is not rescued by the cert
            channel.unary_unary(ANY_ROLE)(
                b"", timeout=10, metadata=(("authorization", "Bearer wrong"),)
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        audit = audit_pb2_grpc.AuditServiceStub(channel).ListAudit(
            audit_pb2.ListAuditRequest(method="DeleteModel"), timeout=10, metadata=token
        )
    assert [(r.principal, r.tenant, r.via, r.code) for r in audit.records] == [
        ("pacs-robot", "radiology", "mtls", "PERMISSION_DENIED"),
        ("operator", "", "service-account", "OK"),
    ]
    logged = [r for r in caplog.records if getattr(r, "method", "") == ADMIN_ONLY]
    assert [
        (getattr(r, "principal", ""), getattr(r, "via", ""), getattr(r, "code", "")) for r in logged
    ] == [
        ("pacs-robot", "mtls", "PERMISSION_DENIED"),
        ("operator", "service-account", "OK"),
    ]


def test_an_unmapped_certificate_is_unauthenticated(mtls, ca) -> None:
    running, _robot = mtls
    with _channel(running, ca, ca.client("stranger")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(ANY_ROLE)(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "maps to no account" in (info.value.details() or "")
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )  # the handshake admitted it: public calls need no account
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("client", ["none", "other CA", "server usage"])
def test_the_handshake_refuses_a_missing_or_unverified_certificate(mtls, ca, client) -> None:
    running, _robot = mtls
    issued = {
        "none": None,
        "other CA": TestCA("another CA").client("robot", uri="spiffe://hospital/pacs-robot"),
        "server usage": ca.server("robot"),  # signed by the CA, but not for client auth
    }[client]
    with _channel(running, ca, issued) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no connection at all


def test_the_sdk_connects_with_a_client_certificate(mtls, ca, tmp_path, monkeypatch) -> None:
    import clinisynth

    running, robot = mtls
    endpoints = {"generator": f"localhost:{running.port}"}
    with clinisynth.Client(
        endpoints=endpoints,
        root_certificates=ca.pem,
        certificate_chain=robot.cert,
        private_key=robot.key,
    ) as client:
        assert client.health() == {"generator": "SERVING"}
    with clinisynth.Client(endpoints=endpoints, root_certificates=ca.pem) as client:
        assert client.health() == {"generator": "UNAVAILABLE"}  # no certificate: no handshake
    cert, key = robot.write(tmp_path, "robot")
    monkeypatch.setenv("CLINISYNTH_CLIENT_CERT", str(cert))
    monkeypatch.setenv("CLINISYNTH_CLIENT_KEY", str(key))
    with clinisynth.Client(endpoints=endpoints, root_certificates=ca.pem) as client:
        assert client.health() == {"generator": "SERVING"}
    monkeypatch.delenv("CLINISYNTH_CLIENT_KEY")
    with pytest.raises(ValueError, match="CLINISYNTH_CLIENT_KEY"):
        clinisynth.Client(endpoints=endpoints, root_certificates=ca.pem)


def test_the_cli_takes_cert_and_key_files(mtls, ca, tmp_path, monkeypatch) -> None:
    from clinisynth.cli import build_parser
    from clinisynth.cli._common import client_from

    running, robot = mtls
    cert, key = robot.write(tmp_path, "robot")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    monkeypatch.setenv("CLINISYNTH_HOME", str(tmp_path))  # no recorded stack to find
    monkeypatch.setenv("CLINISYNTH_GENERATOR_ADDRESS", f"localhost:{running.port}")
    for name in ("CLINISYNTH_CLIENT_CERT", "CLINISYNTH_CLIENT_KEY", "CLINISYNTH_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    flags = ["--ca-file", str(tmp_path / "ca.crt"), "--cert-file", str(cert)]
    ns = build_parser().parse_args([*flags, "--key-file", str(key), "status"])
    with client_from(ns) as client:
        assert client.health() == {"generator": "SERVING"}
    with pytest.raises(SystemExit, match="--key-file"):
        client_from(build_parser().parse_args([*flags, "status"]))


# --- certificates renewed on disk ---------------------------------------------------------------


def _reloads(running: RunningServer, outcome: str) -> float:
    value = running.metrics.registry.get_sample_value(
        "clinisynth_tls_reloads_total", {"service": "generator", "outcome": outcome}
    )
    return value or 0.0


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(
    tls_files, ca
) -> None:
    running = _start(tls_files)
    try:
        first = running.certificates.served.serial if running.certificates else 0
        assert served_serial(running.port, ca.pem) == first
        with _channel(running, ca, None, fresh=False) as old:
            health = health_pb2_grpc.HealthStub(old)
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before

            renewed = ca.server()
            _install(tls_files, renewed)
            assert served_serial(running.port, ca.pem) == renewed.serial  # a new connection
            assert _reloads(running, "reloaded") == 1
            expiry = running.metrics.registry.get_sample_value(
                "clinisynth_tls_certificate_expiry_timestamp_seconds", {"service": "generator"}
            )
            assert running.certificates is not None
            assert expiry == pytest.approx(running.certificates.served.not_after)
            # the connection opened before the renewal goes on, on its old certificate
            resp = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with _channel(running, ca, None) as new:  # and gRPC clients connect afresh
            resp = health_pb2_grpc.HealthStub(new).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def test_a_corrupt_or_half_written_renewal_keeps_the_old_certificate(tls_files, ca) -> None:
    running = _start(tls_files)
    try:
        first = served_serial(running.port, ca.pem)
        renewed = ca.server()
        (tls_files / "tls.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncat")
        assert served_serial(running.port, ca.pem) == first
        (tls_files / "tls.crt").write_bytes(renewed.cert)  # the certificate, not yet its key
        assert served_serial(running.port, ca.pem) == first
        assert _reloads(running, "failed") == 2 and _reloads(running, "reloaded") == 0
        (tls_files / "tls.key").write_bytes(renewed.key)  # the renewal completes
        assert served_serial(running.port, ca.pem) == renewed.serial
        assert _reloads(running, "reloaded") == 1
    finally:
        running.stop(0)


def _health(running: RunningServer, ca: TestCA, client: Issued | None) -> str:
    """Health over a new connection: SERVING, or UNAVAILABLE when the handshake is refused."""
    with _channel(running, ca, client) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_renewed_client_ca_is_used_for_new_handshakes(tls_files, ca) -> None:
    robot = ca.client("robot", uri="spiffe://hospital/pacs-robot")
    next_ca = TestCA("next client CA")
    next_robot = next_ca.client("robot", uri="spiffe://hospital/pacs-robot")
    running = _start(tls_files, tls_client_ca=str(tls_files / "client-ca.crt"))
    try:
        assert _health(running, ca, robot) == "SERVING"
        assert _health(running, ca, next_robot) == "UNAVAILABLE"
        (tls_files / "client-ca.crt").write_bytes(ca.pem + next_ca.pem)  # both, during the move
        assert _health(running, ca, next_robot) == "SERVING"
        assert _health(running, ca, robot) == "SERVING"
        (tls_files / "client-ca.crt").write_bytes(next_ca.pem)  # the old CA retired
        assert _health(running, ca, robot) == "UNAVAILABLE"
        assert _reloads(running, "reloaded") == 2
    finally:
        running.stop(0)


def test_bad_tls_settings_refuse_to_start(tls_files, ca) -> None:
    (tls_files / "tls.key").write_bytes(ca.server().key)  # not the certificate's key
    with pytest.raises(InvalidArgument, match="CLINISYNTH_TLS_KEY"):
        _start(tls_files)
    config = load_config("generator", env={}, port=0, tls_client_ca=str(tls_files / "x.crt"))
    with pytest.raises(InvalidArgument, match="CLINISYNTH_TLS_CLIENT_CA"):
        start_server(config, _register, serve_metrics=False)


def test_the_review_pages_https_takes_renewed_files_too(tls_files, ca) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler

    from clinisynth_server.reward.web import _HttpsServer, tls_context

    files = (str(tls_files / "tls.crt"), str(tls_files / "tls.key"))
    httpd = _HttpsServer(("localhost", 0), BaseHTTPRequestHandler, tls_context(*files), files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        port = int(httpd.server_address[1])
        first = served_serial(port, ca.pem)
        (tls_files / "tls.key").write_bytes(b"half-written")
        assert served_serial(port, ca.pem) == first
        renewed = ca.server()
        _install(tls_files, renewed)
        assert served_serial(port, ca.pem) == renewed.serial
    finally:
        httpd.shutdown()
        httpd.server_close()


def _probe(running: RunningServer, **env: str) -> subprocess.CompletedProcess[str]:
    """The image's health probe (deploy/docker/healthcheck.py) with only ``env`` set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLINISYNTH_")}
    argv = [sys.executable, str(HEALTHCHECK), "generator", "--port", str(running.port)]
    return subprocess.run(
        [*argv, "--timeout", "5"], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def test_the_health_probe_presents_a_client_certificate(tls_files, ca) -> None:
    ca.server(client_auth=True).write(tls_files, "tls")  # the service's own, usable as a client
    running = _start(tls_files, tls_client_ca=str(tls_files / "client-ca.crt"))
    service = {
        "CLINISYNTH_TLS_CERT": str(tls_files / "tls.crt"),
        "CLINISYNTH_TLS_KEY": str(tls_files / "tls.key"),
        "CLINISYNTH_TLS_CA": str(tls_files / "client-ca.crt"),
    }
    try:
        refused = _probe(running, **service)  # the probe of a service without mTLS
        assert refused.returncode == 1, refused.stdout
        probe = _probe(running, **service, CLINISYNTH_TLS_CLIENT_CA=service["CLINISYNTH_TLS_CA"])
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stderr
        robot_cert, robot_key = ca.client("probe").write(tls_files, "probe")
        own = _probe(
            running,
            **service,
            CLINISYNTH_TLS_CLIENT_CA=service["CLINISYNTH_TLS_CA"],
            CLINISYNTH_HEALTHCHECK_TLS_CERT=str(robot_cert),
            CLINISYNTH_HEALTHCHECK_TLS_KEY=str(robot_key),
        )
        assert own.returncode == 0, own.stderr
    finally:
        running.stop(0)


def test_the_stacks_readiness_probe_presents_the_services_certificate(tls_files, ca) -> None:
    from clinisynth_server.stack import TlsSettings, wait_serving

    ca.server(client_auth=True).write(tls_files, "tls")
    running = _start(tls_files, tls_client_ca=str(tls_files / "client-ca.crt"))
    env = {
        "CLINISYNTH_TLS_CERT": str(tls_files / "tls.crt"),
        "CLINISYNTH_TLS_KEY": str(tls_files / "tls.key"),
        "CLINISYNTH_TLS_CA": str(tls_files / "client-ca.crt"),
    }
    address = f"localhost:{running.port}"
    try:
        plain = TlsSettings.from_env(env)  # as if the services did not verify client certs
        assert not plain.client_auth and not wait_serving(address, 1.0, tls=plain)
        mtls = TlsSettings.from_env({**env, "CLINISYNTH_TLS_CLIENT_CA": env["CLINISYNTH_TLS_CA"]})
        assert mtls.client_auth and wait_serving(address, 10.0, tls=mtls)
    finally:
        running.stop(0)
