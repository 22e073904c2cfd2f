"""Channels, metadata, deadlines and bounded retries: the only place the SDK touches grpc calls.

``Transport`` and ``AsyncTransport`` twin only the I/O; settings, the retry decision
(:func:`retry_after`) and error mapping (``_errors.from_rpc_error``) are shared.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio

from clinisynth._discovery import Endpoints, discover
from clinisynth._errors import (
    RETRYABLE,
    ClinisynthError,
    StackNotFoundError,
    UnauthenticatedError,
    from_rpc_error,
)
from clinisynth._rpc import Rpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),  # retries are ours: bounded and only for idempotent calls
]
DEFAULT_TIMEOUT = 300.0
# The longest a server's RetryInfo may make one retry wait: advice beyond it (a misconfigured
# or hostile server) must not hang the caller.
MAX_RETRY_DELAY_S = 30.0


def _backoff(attempt: int) -> float:
    return min(2.0, 0.1 * (2**attempt)) * (0.5 + random.random() / 2)


def retry_after(
    error: ClinisynthError, attempt: int, attempts: int, timeout: float | None
) -> float | None:
    """Seconds to wait before the next attempt, or ``None``: give up and raise ``error``.

    Only UNAVAILABLE / RESOURCE_EXHAUSTED are retried. A ``google.rpc.RetryInfo`` delay sent by
    the server (admission control says when to come back) is honoured, capped at
    ``MAX_RETRY_DELAY_S``; advice longer than the call's own deadline raises at once, since
    waiting it out would overrun what the caller allowed. Without advice: jittered exponential
    backoff.
    """
    if error.code not in RETRYABLE or attempt + 1 >= attempts:
        return None
    if error.retry_delay is None:
        return _backoff(attempt)
    delay = min(error.retry_delay, MAX_RETRY_DELAY_S)
    if timeout is not None and delay > timeout:
        return None
    return delay


class _Settings:
    def __init__(
        self,
        endpoints: Endpoints,
        *,
        token: str | None,
        token_file: str | None = None,
        tls: bool,
        root_certificates: bytes | None,
        timeout: float | None,
        retries: int,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.token = token
        self.token_file = token_file
        # The one place channel credentials are built (sync and async transports share it).
        self.credentials = (
            grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            if tls
            else None
        )
        self.timeout = timeout
        self.retries = retries

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The bearer header of the next call; a token file is re-read each call (rotation)."""
        token = self.token
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as exc:
                raise UnauthenticatedError(
                    f"token file {self.token_file!r} cannot be read: {exc}"
                ) from None
        return (("authorization", f"Bearer {token}"),) if token else ()

    def address(self, service: str) -> str:
        address = self.endpoints.for_service(service)
        if not address:
            raise ClinisynthError(f"no address known for the {service} service", code="UNAVAILABLE")
        return address

    def deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout


def make_settings(
    address: str | None,
    endpoints: Endpoints | dict[str, str] | None,
    token: str | None,
    tls: bool,
    root_certificates: bytes | None,
    timeout: float | None,
    retries: int,
    token_file: str | None = None,
    *,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
) -> _Settings:
    """The client's options resolved: explicit endpoints, a host, or the recorded stack.

    ``token_file`` (else ``$CLINISYNTH_TOKEN_FILE`` when no ``token`` is given) wins over
    ``token``: it is read on every call, so a rotated token is picked up without a new client.
    Without ``root_certificates``, ``$CLINISYNTH_TLS_CA`` names the CA certificate to trust
    (and turns TLS on): a remote stack whose certificate a site or development CA signed.
    ``certificate_chain`` / ``private_key`` (PEM; else the files ``$CLINISYNTH_CLIENT_CERT`` /
    ``$CLINISYNTH_CLIENT_KEY``, both or neither) are the client certificate a server that verifies
    client certificates (mTLS) asks for; they turn TLS on.
    """
    if token_file is None and not token:
        token_file = os.environ.get("CLINISYNTH_TOKEN_FILE") or None
    if isinstance(endpoints, dict):
        endpoints = Endpoints.from_dict(dict(endpoints))
    if endpoints is None:
        endpoints = Endpoints.on_host(address) if address else discover()
    if endpoints is None:
        raise StackNotFoundError(
            "no clinisynth stack found: start one with `clinisynth up --detach`, or pass "
            "address='host' / endpoints={...}, or set CLINISYNTH_<SERVICE>_ADDRESS"
        )
    if retries < 0:
        raise ValueError("retries must be >= 0")
    if endpoints.tls:  # the stack serves TLS only: say so without flags
        tls = True
        if root_certificates is None and endpoints.ca_cert:
            with open(endpoints.ca_cert, "rb") as f:
                root_certificates = f.read()
    ca_file = os.environ.get("CLINISYNTH_TLS_CA")
    if root_certificates is None and ca_file:  # a remote stack's CA (a site or dev CA)
        with open(ca_file, "rb") as f:
            root_certificates = f.read()
        tls = True
    certificate_chain, private_key = _client_certificate(certificate_chain, private_key)
    if certificate_chain is not None:
        tls = True
    return _Settings(
        endpoints,
        token=token,
        token_file=token_file,
        tls=tls,
        root_certificates=root_certificates,
        timeout=timeout,
        retries=retries,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )


def _client_certificate(
    chain: bytes | None, key: bytes | None
) -> tuple[bytes | None, bytes | None]:
    """The client certificate and key: given, else from ``$CLINISYNTH_CLIENT_CERT`` / ``_KEY``."""
    if chain is None and key is None:
        cert_file = os.environ.get("CLINISYNTH_CLIENT_CERT", "").strip()
        key_file = os.environ.get("CLINISYNTH_CLIENT_KEY", "").strip()
        if bool(cert_file) != bool(key_file):
            raise ValueError(
                "set both CLINISYNTH_CLIENT_CERT and CLINISYNTH_CLIENT_KEY, or neither"
            )
        if not cert_file:
            return None, None
        with open(cert_file, "rb") as f_cert, open(key_file, "rb") as f_key:
            return f_cert.read(), f_key.read()
    if chain is None or key is None:
        raise ValueError("certificate_chain and private_key go together (a client certificate)")
    return chain, key


class Transport:
    """Blocking transport: one channel per service, created on first use."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            address = self.settings.address(service)
            creds = self.settings.credentials
            self._channels[service] = (
                grpc.secure_channel(address, creds, options=_OPTIONS)
                if creds
                else grpc.insecure_channel(address, options=_OPTIONS)
            )
        return self._channels[service]

    def call(self, rpc: Rpc, request: Any, *, timeout: float | None = None) -> Any:
        """A unary (or client-streaming, with an iterator request) RPC, retried if safe."""
        method = getattr(rpc.stub(self.channel(rpc.service)), rpc.method)
        deadline = self.settings.deadline(timeout)
        attempts = 1 + (self.settings.retries if rpc.retryable(request) else 0)
        for attempt in range(attempts):
            try:
                return method(request, timeout=deadline, metadata=self.settings.metadata)
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                delay = retry_after(error, attempt, attempts, deadline)
                if delay is None:
                    raise error from None
                time.sleep(delay)
        raise AssertionError("unreachable")

    def stream(self, rpc: Rpc, request: Any, *, timeout: float | None = None) -> Iterator[Any]:
        """A server-streaming RPC; closing the iterator cancels the call."""
        call = getattr(rpc.stub(self.channel(rpc.service)), rpc.method)(
            request, timeout=self.settings.deadline(timeout), metadata=self.settings.metadata
        )
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


class AsyncTransport:
    """asyncio twin of :class:`Transport` on grpc.aio."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            address = self.settings.address(service)
            creds = self.settings.credentials
            self._channels[service] = (
                grpc.aio.secure_channel(address, creds, options=_OPTIONS)
                if creds
                else grpc.aio.insecure_channel(address, options=_OPTIONS)
            )
        return self._channels[service]

    async def call(self, rpc: Rpc, request: Any, *, timeout: float | None = None) -> Any:
        """A unary (or client-streaming, with an iterator request) RPC, retried if safe."""
        method = getattr(rpc.stub(self.channel(rpc.service)), rpc.method)
        deadline = self.settings.deadline(timeout)
        attempts = 1 + (self.settings.retries if rpc.retryable(request) else 0)
        for attempt in range(attempts):
            try:
                return await method(request, timeout=deadline, metadata=self.settings.metadata)
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                delay = retry_after(error, attempt, attempts, deadline)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def stream(
        self, rpc: Rpc, request: Any, *, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        """A server-streaming RPC; closing the iterator cancels the call."""
        call = getattr(rpc.stub(self.channel(rpc.service)), rpc.method)(
            request, timeout=self.settings.deadline(timeout), metadata=self.settings.metadata
        )
        try:
            async for item in call:
                yield item
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
