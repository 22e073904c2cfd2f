"""The SDK's one exception tree; gRPC errors are translated in exactly one place."""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ClinisynthError(Exception):
    """Base of every SDK error. ``code`` is the gRPC status name."""

    code: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.field_violations = field_violations
        self.reason = reason
        self.metadata = dict(metadata or {})
        # google.rpc.RetryInfo: the server's advice (s) on when to try again, if it gave one.
        self.retry_delay = retry_delay

    @property
    def fields(self) -> list[str]:
        """Names of the request fields the server rejected."""
        return [v.field for v in self.field_violations]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgumentError(ClinisynthError):
    code = "INVALID_ARGUMENT"


class NotFoundError(ClinisynthError):
    code = "NOT_FOUND"


class AlreadyExistsError(ClinisynthError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(ClinisynthError):
    code = "FAILED_PRECONDITION"


class UnavailableError(ClinisynthError):
    """The service or one of its dependencies is down; idempotent calls were retried."""

    code = "UNAVAILABLE"


class ResourceExhaustedError(ClinisynthError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(ClinisynthError):
    code = "DEADLINE_EXCEEDED"


class CancelledError(ClinisynthError):
    code = "CANCELLED"


class UnauthenticatedError(ClinisynthError):
    code = "UNAUTHENTICATED"


class PermissionDeniedError(ClinisynthError):
    code = "PERMISSION_DENIED"


class UnimplementedError(ClinisynthError):
    """The service does not offer this capability (yet)."""

    code = "UNIMPLEMENTED"


class InternalError(ClinisynthError):
    code = "INTERNAL"


class StackNotFoundError(ClinisynthError):
    """No running stack was found and no address was given."""

    code = "UNAVAILABLE"


_BY_CODE: dict[str, type[ClinisynthError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        UnavailableError,
        ResourceExhaustedError,
        DeadlineExceededError,
        CancelledError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnimplementedError,
        InternalError,
    )
}
RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})


def from_rpc_error(err: grpc.RpcError) -> ClinisynthError:
    """Translate a grpc.RpcError (with google.rpc.Status details when present)."""
    code_obj = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    code = code_obj.name if isinstance(code_obj, grpc.StatusCode) else "UNKNOWN"
    message = (err.details() if hasattr(err, "details") else None) or code
    violations: list[FieldViolation] = []
    reason, metadata = "", {}
    retry_delay: float | None = None
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(err)  # type: ignore[arg-type]  # a grpc.RpcError from a call is a grpc.Call at run time
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations += [
                        FieldViolation(v.field, v.description) for v in bad.field_violations
                    ]
                elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, metadata = info.reason, dict(info.metadata)
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    retry_delay = max(0.0, retry.retry_delay.ToNanoseconds() / 1e9)
    except (ValueError, AttributeError, TypeError):
        pass  # details are a bonus; the code and message always come through
    cls = _BY_CODE.get(code, ClinisynthError)
    return cls(
        message,
        code=code,
        field_violations=tuple(violations),
        reason=reason,
        metadata=metadata,
        retry_delay=retry_delay,
    )
