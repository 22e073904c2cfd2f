"""gRPC server bootstrap shared by the four services.

``start_server`` builds a server with the interceptor chain, grpc.health.v1, reflection, optional
TLS and message-size limits, starts the Prometheus endpoint, and returns a handle; ``run_forever``
adds graceful shutdown on SIGTERM / SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from clinisynth_server.runtime.auth import authenticator_for
from clinisynth_server.runtime.config import ServiceConfig
from clinisynth_server.runtime.interceptors import ServiceInterceptor
from clinisynth_server.runtime.metrics import ServiceMetrics, create_metrics

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    config: ServiceConfig
    server: grpc.Server
    port: int
    metrics: ServiceMetrics
    health: health.HealthServicer
    service_names: Sequence[str]
    metrics_port: int = 0
    _metrics_http: Any = None
    _on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def on_stop(self, fn: Callable[[], None]) -> None:
        self._on_stop.append(fn)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight calls finish within ``grace`` seconds, then close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.set_serving(False)
        self.server.stop(self.config.grace_s if grace is None else grace).wait()
        for fn in reversed(self._on_stop):
            try:
                fn()
            except Exception:  # shutdown must go on
                log.exception("shutdown hook failed")
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert and config.tls_key):
        return None
    with open(config.tls_key, "rb") as f_key, open(config.tls_cert, "rb") as f_cert:
        return grpc.ssl_server_credentials([(f_key.read(), f_cert.read())])


def start_server(
    config: ServiceConfig,
    register: Callable[[grpc.Server, ServiceMetrics], Sequence[str]],
    *,
    metrics: ServiceMetrics | None = None,
    serve_metrics: bool = True,
) -> RunningServer:
    """Start the gRPC server of ``config.service`` on ``config.host:config.port`` (0 = any)."""
    metrics = metrics or create_metrics(config.service)
    interceptor = ServiceInterceptor(config.service, metrics, authenticator_for(config.auth_tokens))
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix=config.service),
        interceptors=[interceptor],
        options=options,
        maximum_concurrent_rpcs=config.workers * 4,
    )
    names = list(register(server, metrics))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{config.host}:{config.port}"
    creds = _credentials(config)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"{config.service}: could not bind {address}")
    server.start()
    running = RunningServer(
        config=config,
        server=server,
        port=port,
        metrics=metrics,
        health=health_servicer,
        service_names=names,
    )
    if serve_metrics:
        http_server, _thread = start_http_server(
            config.metrics_port, addr=config.host, registry=metrics.registry
        )
        running._metrics_http = http_server
        running.metrics_port = http_server.server_port
    running.set_serving(True)
    log.info(
        "%s serving on %s (metrics :%s)", config.service, running.address, running.metrics_port
    )
    return running


def run_forever(running: RunningServer) -> None:
    """Block until SIGTERM / SIGINT, then shut down gracefully."""
    done = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        log.info("signal %s: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    done.wait()
    running.stop()
