"""The one mapping from the domain error tree to gRPC status codes with google.rpc details."""

from __future__ import annotations

import logging
import uuid

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from clinisynth_server.errors import ClinisynthError

log = logging.getLogger(__name__)
DOMAIN = "clinisynth"


def grpc_code(err: ClinisynthError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)


def to_status(err: ClinisynthError) -> grpc.Status:
    """A grpc.Status with google.rpc.Status details: BadRequest for fields, ErrorInfo always."""
    details: list[any_pb2.Any] = []
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in err.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    if err.code == "FAILED_PRECONDITION" and err.metadata.get("field"):
        # a precondition about one request field (an out-of-domain input, ...): which one, why
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=err.reason or err.code,
                    subject=err.metadata["field"],
                    description=err.message,
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        details.append(packed)
    info = error_details_pb2.ErrorInfo(
        reason=err.reason or err.code, domain=DOMAIN, metadata=err.metadata
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if err.metadata.get("retry_after_s"):  # a refusal that says when to come back
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(float(err.metadata["retry_after_s"]) * 1e9))
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, err.code, code_pb2.INTERNAL), message=err.message, details=details
    )
    return rpc_status.to_status(status)


def internal_status(exc: BaseException) -> grpc.Status:
    """An unexpected exception: INTERNAL with an incident id; the traceback goes to the log only."""
    incident = uuid.uuid4().hex[:12]
    log.exception("unhandled error (incident %s): %s", incident, type(exc).__name__)
    status = status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error (incident {incident})"
    )
    return rpc_status.to_status(status)
