"""gRPC server bootstrap shared by the four services.

``start_server`` builds a server with the interceptor chain, grpc.health.v1, reflection, optional
TLS (certificates re-read when their files change, optional client certificates: :mod:`.tls`) and
message-size limits, starts the Prometheus endpoint, and returns a handle; ``run_forever``
adds graceful shutdown on SIGTERM / SIGINT.

Health answers within milliseconds whatever the load (:class:`Admission`): gRPC Python runs every
call of a server on one thread pool, so a pool busy with long generations used to queue health
checks behind them (seconds), and a probe that times out restarts a healthy service.

Every server also serves ``AuditService`` over the audit trail (:mod:`.audit`) its interceptor
writes into the service's own store (the one its ``register`` opened): each service writes its
records to the shared store and any one lists all of them. A server whose ``register`` opened no
store (a bare test server) audits nothing and does not serve it.
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

from clinisynth.v1 import audit_pb2_grpc
from clinisynth_server.errors import InvalidArgument, ResourceExhausted
from clinisynth_server.runtime import dependencies
from clinisynth_server.runtime.audit import SERVICE_NAME as AUDIT_SERVICE_NAME
from clinisynth_server.runtime.audit import AuditLog, AuditServicer
from clinisynth_server.runtime.auth import authenticator_for
from clinisynth_server.runtime.config import ServiceConfig
from clinisynth_server.runtime.interceptors import ServiceInterceptor
from clinisynth_server.runtime.metrics import ServiceMetrics, create_metrics
from clinisynth_server.runtime.tls import CertificateSet, ReloadingCertificates

log = logging.getLogger(__name__)
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
# Threads of the control lane: health checks and refusals, each a few microseconds of work.
CONTROL_THREADS = 4
# Calls the control lane may hold at once before gRPC itself refuses (a flood of probes).
CONTROL_HEADROOM = 64
RETRY_AFTER_S = 1.0


class _CountingPool(futures.ThreadPoolExecutor):
    """A thread pool that knows how many calls it holds (running + waiting for a thread)."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._count_lock = threading.Lock()
        self.load = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        with self._count_lock:
            self.load += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)  # always runs, whatever became of the call
        return future

    def _done(self, _future: futures.Future | None) -> None:
        with self._count_lock:
            self.load -= 1


def _on_pool(handler: grpc.RpcMethodHandler, pool: futures.ThreadPoolExecutor) -> Any:
    """The same handler, run on ``pool`` (gRPC's per-behaviour ``experimental_thread_pool``)."""
    kind = next(
        k
        for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        if getattr(handler, k) is not None
    )
    behavior = getattr(handler, kind)

    def run(request: Any, context: grpc.ServicerContext) -> Any:
        return behavior(request, context)

    # gRPC reads the pool off the behaviour function; its handlers are namedtuples, the ABC
    # declares neither the attribute nor _replace.
    run.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return handler._replace(**{kind: run})  # type: ignore[attr-defined]  # a namedtuple


def _refusing(handler: grpc.RpcMethodHandler, error: Exception) -> Any:
    """The same handler whose behaviour raises ``error`` without reading the request."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        raise error

    kind = next(
        k
        for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        if getattr(handler, k) is not None
    )
    return handler._replace(**{kind: refuse})  # type: ignore[attr-defined]  # a namedtuple


class Admission:
    """Two lanes on one port, so health never waits behind model work.

    Why this design: gRPC Python serves every call of a server on one executor and allows one
    server per port, so a second server for health is not possible and a ``grpc.aio`` health path
    would need the whole server to be asyncio. gRPC does honour a per-behaviour thread pool
    (``experimental_thread_pool``, the same hook grpc_health uses for Watch), so:

    - ``Health/Check`` runs on a small *control* pool that model work never reaches;
    - ``Health/Watch`` runs there too, as gRPC's non-blocking stream (:meth:`serve_watch`): the
      call registers a callback and returns, so an open watch holds no thread of either pool
      (a wrapped, blocking watch used to hold a work thread for its lifetime, queued behind
      model work before its first message, and count against ``capacity``);
    - every other call runs on the *work* pool (``workers`` threads, as before) and queues there
      in arrival order when all threads are busy, up to ``capacity`` calls held in all (running
      + waiting); beyond that it is refused at once with RESOURCE_EXHAUSTED carrying RetryInfo
      (the SDK retries idempotent calls), the refusal itself also on the control pool;
    - the count is exact: it is taken where gRPC submits a call and released by the future's
      done-callback, so a call cancelled before it ran cannot leak a slot;
    - gRPC's own ``maximum_concurrent_rpcs`` is ``capacity + CONTROL_HEADROOM``, so it refuses a
      health check only under a flood of probes, never because model work filled the server.

    A refusal of a unary call still reads its request on the control pool (gRPC delivers the
    message before the behaviour runs); at loopback speed that is milliseconds even at the
    message-size limit.

    Two interceptors share one decision: :meth:`outer` (first in the chain) picks the lane and
    decides admission; :meth:`inner` (last, inside the metrics / error-mapping interceptor)
    raises the refusal, so refusals are counted and mapped like every other error. Both run in
    gRPC's single polling thread, synchronously one inside the other, which is what makes the
    hand-over through a thread-local safe.
    """

    def __init__(self, service: str, workers: int, capacity: int) -> None:
        self.capacity = max(capacity, workers)
        self.work = _CountingPool(workers, thread_name_prefix=service)
        self.control = futures.ThreadPoolExecutor(
            max_workers=CONTROL_THREADS, thread_name_prefix=f"{service}-health"
        )
        self._decision = threading.local()
        self._watch: grpc.RpcMethodHandler | None = None

    def serve_watch(self, servicer: health.HealthServicer) -> None:
        """Serve ``servicer``'s Watch non-blocking on the control pool, outside the chain.

        Why outside: the interceptors wrap a behaviour in a generator, which drops the
        ``experimental_non_blocking`` / ``experimental_thread_pool`` attributes gRPC reads off
        it; health is public (no token) and a stream open for hours has no latency to record.
        """

        def watch(
            request: health_pb2.HealthCheckRequest,
            context: grpc.ServicerContext,
            send_response_callback: Callable[[Any], None] | None = None,
        ) -> Any:
            return servicer.Watch(request, context, send_response_callback)

        # gRPC reads both off the behaviour; plain function attributes the type doesn't declare.
        watch.experimental_non_blocking = True  # type: ignore[attr-defined]  # see above
        watch.experimental_thread_pool = self.control  # type: ignore[attr-defined]  # see above
        self._watch = grpc.unary_stream_rpc_method_handler(
            watch,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        )

    @property
    def maximum_concurrent_rpcs(self) -> int:
        return self.capacity + CONTROL_HEADROOM

    def outer(self) -> grpc.ServerInterceptor:
        admission = self

        class _Lanes(grpc.ServerInterceptor):
            def intercept_service(self, continuation: Any, details: Any) -> Any:
                if details.method == HEALTH_WATCH and admission._watch is not None:
                    return admission._watch
                control = details.method == HEALTH_CHECK
                refuse = not control and admission.work.load >= admission.capacity
                admission._decision.refuse = refuse
                try:
                    handler = continuation(details)
                finally:
                    admission._decision.refuse = False
                if handler is None:
                    return None
                return _on_pool(handler, admission.control) if control or refuse else handler

        return _Lanes()

    def inner(self) -> grpc.ServerInterceptor:
        admission = self

        class _Gate(grpc.ServerInterceptor):
            def intercept_service(self, continuation: Any, details: Any) -> Any:
                handler = continuation(details)
                if handler is None or not getattr(admission._decision, "refuse", False):
                    return handler
                return _refusing(
                    handler,
                    ResourceExhausted(
                        f"server busy: {admission.capacity} calls running or queued; retry in "
                        f"{RETRY_AFTER_S:g} s",
                        reason="SERVER_BUSY",
                        metadata={
                            "retry_after_s": f"{RETRY_AFTER_S:g}",
                            "capacity": str(admission.capacity),
                        },
                    ),
                )

        return _Gate()

    def shutdown(self) -> None:
        self.work.shutdown(wait=False, cancel_futures=True)
        self.control.shutdown(wait=False, cancel_futures=True)


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
    admission: Admission | None = None
    # The TLS certificate set being served (re-read when its files change); None = plaintext.
    certificates: ReloadingCertificates | None = None
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
        if self.admission is not None:
            self.admission.shutdown()
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


def _certificates(config: ServiceConfig, metrics: ServiceMetrics) -> ReloadingCertificates | None:
    """The port's certificate set (re-read when its files change), or ``None``: plaintext."""
    if not (config.tls_cert and config.tls_key):
        if config.tls_client_ca:
            raise InvalidArgument.for_field(
                "CLINISYNTH_TLS_CLIENT_CA", "needs CLINISYNTH_TLS_CERT and CLINISYNTH_TLS_KEY"
            )
        return None
    tls_m = metrics.tls

    def reloaded(outcome: str) -> None:
        if tls_m is not None:
            tls_m.reloads.labels(config.service, outcome).inc()

    def serving(served: CertificateSet) -> None:
        if tls_m is not None:
            tls_m.expiry.labels(config.service).set(served.not_after)

    return ReloadingCertificates(
        config.tls_cert,
        config.tls_key,
        config.tls_client_ca,
        on_reload=reloaded,
        on_serving=serving,
    )


def _capacity(config: ServiceConfig) -> int:
    """Calls held at once beyond health (``CLINISYNTH_<SERVICE>_MAX_PENDING_RPCS``; 4 × workers,
    the old ``maximum_concurrent_rpcs``): the rest wait in order, then RESOURCE_EXHAUSTED."""
    raw = config.get("max_pending_rpcs", str(config.workers * 4))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidArgument.for_field(
            f"CLINISYNTH_{config.service.upper()}_MAX_PENDING_RPCS",
            f"a positive integer, got {raw!r}",
        )
    return value


def start_server(
    config: ServiceConfig,
    register: Callable[[grpc.Server, ServiceMetrics], Sequence[str]],
    *,
    metrics: ServiceMetrics | None = None,
    serve_metrics: bool = True,
) -> RunningServer:
    """Start the gRPC server of ``config.service`` on ``config.host:config.port`` (0 = any)."""
    metrics = metrics or create_metrics(config.service)
    certificates = _certificates(config, metrics)  # a bad file refuses to start, by setting
    trail = AuditLog(config.service, metrics=metrics.audit)
    interceptor = ServiceInterceptor(config.service, metrics, authenticator_for(config), trail)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    admission = Admission(config.service, config.workers, _capacity(config))
    server = grpc.server(
        admission.work,
        interceptors=[admission.outer(), interceptor, admission.inner()],
        options=options,
        maximum_concurrent_rpcs=admission.maximum_concurrent_rpcs,
    )
    names = list(register(server, metrics))
    # The store the service opened (one store per process, shared with its domain code); the
    # interceptor only runs once the server starts, below, so binding it now loses no call.
    deps = dependencies.opened_for(config)
    if deps is not None:
        trail.bind(deps.store)
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(trail), server)
        names.append(AUDIT_SERVICE_NAME)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    admission.serve_watch(health_servicer)
    reflection.enable_server_reflection(
        (
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{config.host}:{config.port}"
    port = (
        server.add_secure_port(address, certificates.credentials())
        if certificates
        else server.add_insecure_port(address)
    )
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
        admission=admission,
        certificates=certificates,
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


def when_stopped(server: grpc.Server, fn: Callable[[], None], name: str) -> None:
    """Run ``fn`` once ``server`` has stopped: for what a service's ``register`` starts beside
    its servicers (the review page, the PACS outbox worker), which the server does not own."""

    def wait() -> None:
        server.wait_for_termination()
        try:
            fn()
        except Exception:  # shutdown must go on
            log.exception("%s: stopping failed", name)

    threading.Thread(target=wait, daemon=True, name=f"{name}-stop").start()


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
