"""One error tree for all domain code; one interceptor maps it to gRPC status codes.

Domain code (store, methods, services) raises these and never imports grpc: the code is
a plain string naming the gRPC status (``"INVALID_ARGUMENT"``) so the mapping lives in
one place (:mod:`clinisynth_server.runtime.errors_map`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: ``field`` is the proto path (``"images[2].png"``)."""

    field: str
    description: str


class ClinisynthError(Exception):
    """Base of every domain error: a status code name, a message and structured details."""

    code: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        violations: list[FieldViolation] | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.violations: list[FieldViolation] = list(violations or [])
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ClinisynthError):
    """Bad input. Always names the field: use :meth:`for_field` or pass ``violations``."""

    code = "INVALID_ARGUMENT"

    @classmethod
    def for_field(cls, field_name: str, description: str) -> InvalidArgument:
        return cls(
            f"{field_name}: {description}",
            violations=[FieldViolation(field_name, description)],
        )


class NotFound(ClinisynthError):
    code = "NOT_FOUND"


class AlreadyExists(ClinisynthError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ClinisynthError):
    code = "FAILED_PRECONDITION"


class Unavailable(ClinisynthError):
    """A dependency (Triton, the store, another service) is down or unreachable."""

    code = "UNAVAILABLE"


class ResourceExhausted(ClinisynthError):
    code = "RESOURCE_EXHAUSTED"


class Cancelled(ClinisynthError):
    code = "CANCELLED"


class DeadlineExceeded(ClinisynthError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(ClinisynthError):
    code = "UNIMPLEMENTED"


class Unauthenticated(ClinisynthError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ClinisynthError):
    code = "PERMISSION_DENIED"


class Internal(ClinisynthError):
    code = "INTERNAL"


@dataclass
class ValidationErrors:
    """Collects every bad field of a request so the caller learns them all at once."""

    violations: list[FieldViolation] = field(default_factory=list)

    def add(self, field_name: str, description: str) -> None:
        self.violations.append(FieldViolation(field_name, description))

    def raise_if_any(self) -> None:
        if self.violations:
            first = self.violations[0]
            more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
            raise InvalidArgument(
                f"{first.field}: {first.description}{more}", violations=self.violations
            )
