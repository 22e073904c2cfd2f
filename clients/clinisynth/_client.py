"""``Client`` and its asyncio twin ``AsyncClient``: one object for every clinisynth service.

with clinisynth.Client() as client:          # finds the stack started by `clinisynth up`
    result = client.generate("cells", class_name="neutrophil", n=4, seed=1)
    result.save("out/")
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc

from clinisynth._counterfactual import AsyncCounterfactualCalls, CounterfactualCalls
from clinisynth._discovery import SERVICES, Endpoints, discover
from clinisynth._errors import ClinisynthError, StackNotFoundError
from clinisynth._finetune import AsyncFinetuneCalls, FinetuneCalls
from clinisynth._generator import AsyncGeneratorCalls, GeneratorCalls
from clinisynth._reward import AsyncRewardCalls, RewardCalls
from clinisynth._transport import AsyncTransport, Transport, _Settings

DEFAULT_TIMEOUT = 300.0


def _settings(
    address: str | None,
    endpoints: Endpoints | dict[str, str] | None,
    token: str | None,
    tls: bool,
    root_certificates: bytes | None,
    timeout: float | None,
    retries: int,
) -> _Settings:
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
    return _Settings(
        endpoints,
        token=token,
        tls=tls,
        root_certificates=root_certificates,
        timeout=timeout,
        retries=retries,
    )


class Client(GeneratorCalls, RewardCalls, CounterfactualCalls, FinetuneCalls):
    """Blocking client. Keyword-only options; every call takes an optional ``timeout`` (s).

    ``address``: a host running every service at its default port; ``endpoints``: explicit
    addresses per service; neither: the stack recorded by ``clinisynth up``. ``retries`` bounds
    the retries of idempotent calls on UNAVAILABLE / RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        endpoints: Endpoints | dict[str, str] | None = None,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = 3,
    ) -> None:
        self._t = Transport(
            _settings(address, endpoints, token, tls, root_certificates, timeout, retries)
        )

    @property
    def endpoints(self) -> Endpoints:
        return self._t.settings.endpoints

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._t.close()

    # -- health -----------------------------------------------------------------------------
    def health(self, *, timeout: float | None = 5.0) -> dict[str, str]:
        """grpc.health.v1 status of every service ("SERVING", "NOT_SERVING", "UNAVAILABLE")."""
        out: dict[str, str] = {}
        for service in SERVICES:
            if not self.endpoints.for_service(service):
                continue
            try:
                resp = self._t.unary(
                    service,
                    health_pb2_grpc.HealthStub,
                    "Check",
                    health_pb2.HealthCheckRequest(),
                    idempotent=False,
                    timeout=timeout,
                )
                out[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except ClinisynthError as err:
                out[service] = err.code
        return out


class AsyncClient(
    AsyncGeneratorCalls, AsyncRewardCalls, AsyncCounterfactualCalls, AsyncFinetuneCalls
):
    """asyncio twin of :class:`Client` (same options, ``await`` every call)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        endpoints: Endpoints | dict[str, str] | None = None,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = 3,
    ) -> None:
        self._t = AsyncTransport(
            _settings(address, endpoints, token, tls, root_certificates, timeout, retries)
        )

    @property
    def endpoints(self) -> Endpoints:
        return self._t.settings.endpoints

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._t.close()

    async def health(self, *, timeout: float | None = 5.0) -> dict[str, str]:
        out: dict[str, str] = {}
        for service in SERVICES:
            if not self.endpoints.for_service(service):
                continue
            try:
                resp = await self._t.unary(
                    service,
                    health_pb2_grpc.HealthStub,
                    "Check",
                    health_pb2.HealthCheckRequest(),
                    idempotent=False,
                    timeout=timeout,
                )
                out[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except ClinisynthError as err:
                out[service] = err.code
        return out
