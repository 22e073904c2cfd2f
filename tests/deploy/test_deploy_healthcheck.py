"""deploy/docker/healthcheck.py (the image's clinisynth-healthcheck) against a real gRPC server
with grpc.health.v1 on loopback: exit 0 only for SERVING; bearer token and port from env."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from deploy_helpers import DEPLOY
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SCRIPT = DEPLOY / "docker" / "healthcheck.py"


class _RecordingInterceptor(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        self.metadata.append(dict(details.invocation_metadata))
        return continuation(details)


@pytest.fixture
def server() -> Iterator[tuple[int, health.HealthServicer, _RecordingInterceptor]]:
    interceptor = _RecordingInterceptor()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[interceptor])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield port, servicer, interceptor
    finally:
        srv.stop(grace=None)


def _probe(service: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLINISYNTH_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), service, "--host", "127.0.0.1", "--timeout", "5"],
        env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_serving_is_healthy_and_port_comes_from_env(server) -> None:  # type: ignore[no-untyped-def]
    port, servicer, _ = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    proc = _probe("reward", CLINISYNTH_REWARD_PORT=str(port))
    assert proc.returncode == 0, proc.stderr
    assert "SERVING" in proc.stdout


def test_not_serving_is_unhealthy(server) -> None:  # type: ignore[no-untyped-def]
    port, servicer, _ = server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    proc = _probe("generator", CLINISYNTH_GENERATOR_PORT=str(port))
    assert proc.returncode == 1 and "NOT_SERVING" in proc.stdout


def test_unreachable_is_unhealthy() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    proc = _probe("finetune", CLINISYNTH_FINETUNE_PORT=str(closed))
    assert proc.returncode == 1 and "unhealthy" in proc.stderr


def test_first_auth_token_is_sent_as_bearer(server) -> None:  # type: ignore[no-untyped-def]
    port, servicer, interceptor = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    proc = _probe(
        "counterfactual",
        CLINISYNTH_COUNTERFACTUAL_PORT=str(port),
        CLINISYNTH_AUTH_TOKENS=" tok-a , tok-b",
    )
    assert proc.returncode == 0, proc.stderr
    assert interceptor.metadata[-1]["authorization"] == "Bearer tok-a"
