"""Channels, metadata, deadlines and bounded retries: the only place the SDK touches grpc calls."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio

from clinisynth._discovery import Endpoints
from clinisynth._errors import RETRYABLE, ClinisynthError, from_rpc_error

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),  # retries are ours: bounded and only for idempotent calls
]


def _backoff(attempt: int) -> float:
    return min(2.0, 0.1 * (2**attempt)) * (0.5 + random.random() / 2)


class _Settings:
    def __init__(
        self,
        endpoints: Endpoints,
        *,
        token: str | None,
        tls: bool,
        root_certificates: bytes | None,
        timeout: float | None,
        retries: int,
    ) -> None:
        self.endpoints = endpoints
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.credentials = (
            grpc.ssl_channel_credentials(root_certificates=root_certificates) if tls else None
        )
        self.timeout = timeout
        self.retries = retries

    def address(self, service: str) -> str:
        address = self.endpoints.for_service(service)
        if not address:
            raise ClinisynthError(f"no address known for the {service} service", code="UNAVAILABLE")
        return address


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

    def unary(
        self,
        service: str,
        stub_factory: Callable[[grpc.Channel], Any],
        method: str,
        request: Any,
        *,
        idempotent: bool,
        timeout: float | None = None,
    ) -> Any:
        """Call a unary (or client-streaming, with an iterator request) RPC."""
        stub = stub_factory(self.channel(service))
        attempts = 1 + (self.settings.retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                return getattr(stub, method)(
                    request,
                    timeout=timeout if timeout is not None else self.settings.timeout,
                    metadata=self.settings.metadata,
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if error.code in RETRYABLE and attempt + 1 < attempts:
                    time.sleep(_backoff(attempt))
                    continue
                raise error from None
        raise AssertionError("unreachable")

    def stream(
        self,
        service: str,
        stub_factory: Callable[[grpc.Channel], Any],
        method: str,
        request: Any,
        *,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Call a server-streaming RPC; closing the iterator cancels the call."""
        stub = stub_factory(self.channel(service))
        call = getattr(stub, method)(
            request,
            timeout=timeout if timeout is not None else self.settings.timeout,
            metadata=self.settings.metadata,
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

    async def unary(
        self,
        service: str,
        stub_factory: Callable[[Any], Any],
        method: str,
        request: Any,
        *,
        idempotent: bool,
        timeout: float | None = None,
    ) -> Any:
        import asyncio

        stub = stub_factory(self.channel(service))
        attempts = 1 + (self.settings.retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                return await getattr(stub, method)(
                    request,
                    timeout=timeout if timeout is not None else self.settings.timeout,
                    metadata=self.settings.metadata,
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if error.code in RETRYABLE and attempt + 1 < attempts:
                    await asyncio.sleep(_backoff(attempt))
                    continue
                raise error from None
        raise AssertionError("unreachable")

    async def stream(
        self,
        service: str,
        stub_factory: Callable[[Any], Any],
        method: str,
        request: Any,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        stub = stub_factory(self.channel(service))
        call = getattr(stub, method)(
            request,
            timeout=timeout if timeout is not None else self.settings.timeout,
            metadata=self.settings.metadata,
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
