"""Pluggable authentication: an ``Authenticator`` sees call metadata and returns a principal."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Protocol

from clinisynth_server.errors import Unauthenticated

# Calls anyone may make: probes and discovery.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Authenticator(Protocol):
    def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        """Return the caller's principal or raise :class:`Unauthenticated`."""
        ...


class AllowAll:
    def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        return "anonymous"


class StaticTokens:
    """``authorization: Bearer <token>`` must match one of the configured tokens."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [t.encode() for t in tokens if t]

    def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            return "anonymous"
        header = next((v for k, v in metadata if k.lower() == "authorization"), None)
        if header is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        value = header.decode() if isinstance(header, bytes) else header
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        if not any(hmac.compare_digest(token.encode(), t) for t in self._tokens):
            raise Unauthenticated("unknown bearer token")
        return f"token:{token[:4]}…"


def authenticator_for(tokens: Sequence[str]) -> Authenticator:
    return StaticTokens(tokens) if tokens else AllowAll()
