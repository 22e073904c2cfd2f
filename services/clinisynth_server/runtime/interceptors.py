"""The server interceptor chain: authentication, metrics, audit, access log and error mapping.

One interceptor wraps each handler so the order is explicit: count in-flight → authenticate
(a :class:`~.roles.Principal`, attached to the context for :func:`~.auth.principal_of`) →
authorize against the one role table (:mod:`.roles`) → call → write the call's audit record
(:mod:`.audit`; before the reply leaves, and a success whose record cannot be written answers
UNAVAILABLE) → map ClinisynthError to a status with details (anything else → INTERNAL with an
incident id) → record latency by method and final code. Streams are timed until they end.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from clinisynth_server.errors import ClinisynthError
from clinisynth_server.runtime import audit as audit_trail
from clinisynth_server.runtime.audit import AuditLog, CallAudit
from clinisynth_server.runtime.auth import Authenticator, attach, attached
from clinisynth_server.runtime.errors_map import internal_status, to_status
from clinisynth_server.runtime.metrics import ServiceMetrics
from clinisynth_server.runtime.roles import authorize
from clinisynth_server.runtime.tls import peer_certificate

log = logging.getLogger("clinisynth.access")
_SKIP_METRICS = ("/grpc.reflection.",)


def _final_code(context: grpc.ServicerContext) -> str:
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _code_of(exc: BaseException, context: grpc.ServicerContext) -> str:
    if isinstance(exc, ClinisynthError):
        return exc.code
    if _final_code(context) != "OK":
        return _final_code(context)
    return "INTERNAL" if context.is_active() else "CANCELLED"


class ServiceInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        service: str,
        metrics: ServiceMetrics,
        auth: Authenticator,
        audit: AuditLog | None = None,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.auth = auth
        self.audit = audit or AuditLog(service)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        short = method.rsplit("/", 1)[-1]
        metadata = tuple(details.invocation_metadata or ())
        observe = not method.startswith(_SKIP_METRICS)

        def begin(context: grpc.ServicerContext, call: CallAudit | None) -> float:
            if observe:
                self.metrics.grpc.in_flight.labels(self.service, short).inc()
            if call is not None:
                call.peer = context.peer()
                audit_trail.attach(context, call)
            principal = self.auth.authenticate(method, metadata, peer_certificate(context))
            if call is not None:
                call.principal = principal  # recorded even when the role check refuses it
            attach(context, principal)  # the access log names it, refused or not
            authorize(method, principal)
            return time.perf_counter()

        def commit(call: CallAudit | None, code: str) -> None:
            """Write the record before the reply; raises Unavailable when it cannot be."""
            if call is not None and not call.committed:
                self.audit.commit(call, code)

        def commit_failed(call: CallAudit | None, code: str) -> None:
            """The record of a call that failed: its own code stands if the write fails too
            (nothing was acknowledged; the failure is counted and logged)."""
            if call is not None and not call.committed:
                with contextlib.suppress(ClinisynthError):
                    self.audit.commit(call, code)

        def finish(start: float, code: str, context: grpc.ServicerContext) -> None:
            elapsed = time.perf_counter() - start
            if not observe:
                return
            self.metrics.grpc.in_flight.labels(self.service, short).dec()
            self.metrics.grpc.requests.labels(self.service, short, code).inc()
            self.metrics.grpc.duration.labels(self.service, short, code).observe(elapsed)
            principal = attached(context)
            log.info(
                "%s %s %.1fms",
                method,
                code,
                elapsed * 1000,
                extra={
                    "method": method,
                    "code": code,
                    "duration_ms": round(elapsed * 1000, 1),
                    "peer": context.peer(),
                    "principal": principal.name if principal is not None else "",
                    "via": principal.via if principal is not None else "",
                },
            )

        def fail(exc: BaseException, context: grpc.ServicerContext) -> str:
            """Abort the call with the mapped status; return the code to record."""
            if isinstance(exc, ClinisynthError):
                if exc.code == "INTERNAL":
                    log.error("%s failed: %s", method, exc.message)
                code = exc.code
                status = to_status(exc)
            elif _final_code(context) != "OK":  # the handler called context.abort() itself
                return _final_code(context)
            elif not context.is_active():
                return "CANCELLED"
            else:
                code = "INTERNAL"
                status = internal_status(exc)
            context.abort_with_status(status)  # raises
            return code  # pragma: no cover

        def incoming(call: CallAudit | None, request: Any, streamed: bool) -> Any:
            if call is None:
                return request
            if streamed:
                return call.incoming_stream(request)
            call.incoming(request)
            return request

        def unary_result(behavior: Callable, streamed: bool) -> Callable:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                code = "OK"
                trail = self.audit.begin(method, metadata)
                try:
                    start = begin(context, trail)
                    response = behavior(incoming(trail, request, streamed), context)
                    code = _final_code(context)
                    if trail is not None:
                        trail.outgoing(response)
                    commit(trail, code)
                    return response
                except BaseException as exc:
                    code = _code_of(exc, context)
                    commit_failed(trail, code)
                    fail(exc, context)
                    raise
                finally:
                    finish(start, code, context)

            return run

        def stream_result(behavior: Callable, streamed: bool) -> Callable:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                code = "OK"
                trail = self.audit.begin(method, metadata)
                try:
                    start = begin(context, trail)
                    for message in behavior(incoming(trail, request, streamed), context):
                        if trail is not None:
                            trail.outgoing(message)
                        yield message
                    code = _final_code(context)
                    commit(trail, code)  # before the final status: the stream's "answer"
                except GeneratorExit:
                    code = "CANCELLED"
                    commit_failed(trail, code)
                    raise
                except BaseException as exc:
                    code = _code_of(exc, context)
                    commit_failed(trail, code)
                    fail(exc, context)
                    raise
                finally:
                    finish(start, code, context)

            return run

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                unary_result(handler.unary_unary, streamed=False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                stream_result(handler.unary_stream, streamed=False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                unary_result(handler.stream_unary, streamed=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            stream_result(handler.stream_stream, streamed=True),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
