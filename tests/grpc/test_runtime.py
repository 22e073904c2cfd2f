"""The shared service runtime: health, reflection, UNIMPLEMENTED, auth, TLS, error mapping."""

from __future__ import annotations

import datetime as dt
import time
import urllib.request

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from clinisynth.v1 import finetune_pb2, finetune_pb2_grpc
from clinisynth_server import errors
from clinisynth_server.runtime.config import load_config
from clinisynth_server.runtime.server import start_server

ECHO = "/test.Echo/Raise"


def _raising_handler(error: Exception | None):
    """A generic service whose one method raises ``error`` (or answers b'ok')."""

    def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
        if error is not None:
            raise error
        return b"ok"

    handler = grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=None, response_serializer=None
    )
    return grpc.method_handlers_generic_handler("test.Echo", {"Raise": handler})


def _start(register, **overrides):
    config = load_config("finetune", env={}, port=0, metrics_port=0, **overrides)
    return start_server(config, register)


ERROR_CASES = [
    (
        errors.InvalidArgument.for_field("num_images", "must be 1..16"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (errors.NotFound("no such job"), grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists("exists"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition("not yet"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable("triton is down"), grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhausted("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Cancelled("stop"), grpc.StatusCode.CANCELLED),
    (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unimplemented("later"), grpc.StatusCode.UNIMPLEMENTED),
    (errors.Unauthenticated("who"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.Internal("bug"), grpc.StatusCode.INTERNAL),
    (ZeroDivisionError("secret detail"), grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize(("error", "code"), ERROR_CASES, ids=lambda v: type(v).__name__)
def test_every_domain_error_maps_to_its_status(error, code):
    running = _start(
        lambda server, metrics: (server.add_generic_rpc_handlers((_raising_handler(error),)), [])[1]
    )
    try:
        with (
            grpc.insecure_channel(running.address) as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            channel.unary_unary(ECHO)(b"x", timeout=10)
        err = info.value
        assert err.code() == code
        status = rpc_status.from_call(err)
        assert status is not None and status.code == code.value[0]
        if isinstance(error, errors.InvalidArgument):
            bad = error_details_pb2.BadRequest()
            assert status.details[0].Unpack(bad)
            assert bad.field_violations[0].field == "num_images"
        if isinstance(error, ZeroDivisionError):
            assert "secret detail" not in err.details() and "incident" in err.details()
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert f'code="{code.name}",method="Raise",service="finetune"' in text
    finally:
        running.stop(0)


def _base_servicer(server: grpc.Server, metrics: object) -> list[str]:
    """The generated base servicer: every RPC answers UNIMPLEMENTED."""
    finetune_pb2_grpc.add_FinetuneServiceServicer_to_server(
        finetune_pb2_grpc.FinetuneServiceServicer(), server
    )
    return [finetune_pb2.DESCRIPTOR.services_by_name["FinetuneService"].full_name]


@pytest.fixture(scope="module")
def finetune_placeholder():
    config = load_config("finetune", env={}, port=0, metrics_port=0)
    running = start_server(config, _base_servicer)
    yield running
    running.stop(0)


def test_health_serving_for_server_and_each_service(finetune_placeholder):
    with grpc.insecure_channel(finetune_placeholder.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", *finetune_placeholder.service_names):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(finetune_placeholder):
    with grpc.insecure_channel(finetune_placeholder.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"grpc.health.v1.Health", *finetune_placeholder.service_names} <= names


def test_unbuilt_rpcs_answer_unimplemented(finetune_placeholder):
    with grpc.insecure_channel(finetune_placeholder.address) as channel:
        stub = finetune_pb2_grpc.FinetuneServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListJobKinds(finetune_pb2.ListJobKindsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_graceful_stop_reports_not_serving_then_refuses(finetune_placeholder):
    config = load_config("finetune", env={}, port=0, metrics_port=0)
    running = start_server(config, lambda s, m: [])
    running.stop(0.5)
    with grpc.insecure_channel(running.address) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_tokens_guard_everything_but_health():
    running = _start(
        lambda server, metrics: (server.add_generic_rpc_handlers((_raising_handler(None),)), [])[1],
        auth_tokens=("s3cret",),
    )
    try:
        with grpc.insecure_channel(running.address) as channel:
            call = channel.unary_unary(ECHO)
            with pytest.raises(grpc.RpcError) as info:
                call(b"x", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                call(b"x", timeout=5, metadata=(("authorization", "Bearer wrong"),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert call(b"x", timeout=5, metadata=(("authorization", "Bearer s3cret"),)) == b"ok"
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    return cert_pem


def test_tls_serves_and_sdk_connects_with_root_certificate(tmp_path):
    import clinisynth

    cert_pem = _self_signed(tmp_path)
    config = load_config(
        "finetune",
        env={},
        port=0,
        metrics_port=0,
        host="localhost",
        tls_cert=str(tmp_path / "tls.crt"),
        tls_key=str(tmp_path / "tls.key"),
    )
    running = start_server(config, _base_servicer)
    try:
        address = f"localhost:{running.port}"
        with clinisynth.Client(
            endpoints={"finetune": address}, tls=True, root_certificates=cert_pem
        ) as client:
            assert client.health() == {"finetune": "SERVING"}
        with clinisynth.Client(endpoints={"finetune": address}) as plain:
            assert plain.health()["finetune"] == "UNAVAILABLE"
    finally:
        running.stop(0)


def test_config_from_env_and_file(tmp_path):
    cfg_file = tmp_path / "clinisynth.toml"
    cfg_file.write_text('workers = 3\n[reward]\nport = 6000\nraters = "a,b"\n')
    env = {
        "CLINISYNTH_CONFIG": str(cfg_file),
        "CLINISYNTH_REWARD_METRICS_PORT": "7000",
        "CLINISYNTH_TRITON_URL": "triton:8001",
        "CLINISYNTH_REWARD_HTTP_PORT": "0",
    }
    config = load_config("reward", env=env)
    assert (config.port, config.metrics_port, config.workers) == (6000, 7000, 3)
    assert config.triton_url == "triton:8001" and config.get("http_port") == "0"
    with pytest.raises(errors.InvalidArgument) as info:
        load_config("reward", env={"CLINISYNTH_REWARD_PORT": "eighty"})
    assert info.value.violations[0].field == "CLINISYNTH_REWARD_PORT"
    assert load_config("generator", env={}).port == 50051


def _sleeping_handler(seconds: float):
    """``test.Echo/Sleep`` holds its thread for ``seconds`` (stands in for a long generation)."""

    def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(seconds)
        return b"done"

    handler = grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=None, response_serializer=None
    )
    return grpc.method_handlers_generic_handler("test.Echo", {"Sleep": handler})


def _health_latencies(stub: health_pb2_grpc.HealthStub, probes: int, gap_s: float) -> list[float]:
    out = []
    for _ in range(probes):
        t0 = time.perf_counter()
        resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        out.append(time.perf_counter() - t0)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(gap_s)
    return out


def test_health_answers_at_once_while_every_worker_is_busy_and_calls_queue():
    """2 worker threads, 6 calls of 2 s each (2 run, 4 wait their turn for up to 6 s): health
    still answers in well under a second, the 6 all finish, and calls beyond the 6 the server
    holds are refused at once with RESOURCE_EXHAUSTED + RetryInfo rather than lost."""
    running = _start(
        lambda server, metrics: (server.add_generic_rpc_handlers((_sleeping_handler(2.0),)), [])[1],
        workers=2,
        extra={"max_pending_rpcs": "6"},
    )
    try:
        with grpc.insecure_channel(running.address) as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)
            health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected, idle
            call = channel.unary_unary("/test.Echo/Sleep")
            started = time.perf_counter()
            held = [call.future(b"x", timeout=60) for _ in range(6)]
            time.sleep(0.3)  # all six reached the server: two running, four queued
            with pytest.raises(grpc.RpcError) as info:
                call(b"x", timeout=10)
            refused_after = time.perf_counter() - started
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = rpc_status.from_call(info.value)
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status.details)
            assert retry.retry_delay.ToTimedelta().total_seconds() > 0
            assert refused_after < 1.5  # refused at once, not after the queue drained
            # Health while the queue holds 4 s of work: < 1 s (it was the queue's wait before).
            latencies = _health_latencies(health_stub, probes=5, gap_s=0.2)
            assert time.perf_counter() - started < 2.0, "probes ran after the busy period"
            assert max(latencies) < 1.0, latencies
            assert [f.result(timeout=60) for f in held] == [b"done"] * 6  # none lost
            assert time.perf_counter() - started >= 5.5  # 3 rounds of 2 s on 2 threads
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert 'code="RESOURCE_EXHAUSTED",method="Sleep",service="finetune"' in text
    finally:
        running.stop(0)


def test_max_pending_rpcs_must_be_a_positive_integer():
    for bad in ("many", "0", "-3"):
        with pytest.raises(errors.InvalidArgument) as info:
            _start(lambda server, metrics: [], extra={"max_pending_rpcs": bad})
        assert info.value.violations[0].field == "CLINISYNTH_FINETUNE_MAX_PENDING_RPCS"
