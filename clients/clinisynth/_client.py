"""``Client`` and its asyncio twin ``AsyncClient``: one object for every clinisynth service.

with clinisynth.Client() as client:          # finds the stack started by `clinisynth up`
    result = client.generate("cells", class_name="neutrophil", n=4, seed=1)
    result.save("out/")
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from clinisynth import _generator
from clinisynth._discovery import SERVICES, Endpoints, discover
from clinisynth._errors import ClinisynthError, StackNotFoundError
from clinisynth._transport import AsyncTransport, Transport, _Settings
from clinisynth._types import GenerationResult, ModelInfo

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
    return _Settings(
        endpoints,
        token=token,
        tls=tls,
        root_certificates=root_certificates,
        timeout=timeout,
        retries=retries,
    )


class Client:
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

    # -- generator --------------------------------------------------------------------------
    def list_models(
        self,
        kind: str | None = None,
        *,
        name: str | None = None,
        all_versions: bool = False,
        timeout: float | None = None,
    ) -> list[ModelInfo]:
        """Every model the stack serves (kind: text_to_image, class_conditional, ...)."""
        pages, token = [], ""
        while True:
            req = _generator.list_models_request(kind, name, all_versions, token)
            resp = self._t.unary(
                "generator", _generator.STUB, "ListModels", req, idempotent=True, timeout=timeout
            )
            pages.append(resp)
            token = resp.next_page_token
            if not token:
                return _generator.model_infos(pages)

    def generate(
        self,
        model: str,
        *,
        progress: _generator.ProgressCallback | bool | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Generate images. ``model`` is ``"name"`` or ``"name@version"``.

        Options: prompt, negative_prompt, class_name, n, width, height, steps, guidance_scale,
        sampler, seed, eta, format ("png", "png16", "dicom", "raw"), store, min_reward,
        best_of_n, reward_model, preview_every, modality, request_id. ``progress``: a callback
        receiving ProgressEvents (or True for a tqdm bar); uses the streaming RPC.
        """
        req = _generator.generate_request(model, **options)
        if not progress:
            resp = self._t.unary(
                "generator",
                _generator.STUB,
                "Generate",
                req,
                idempotent=req.HasField("seed"),
                timeout=timeout,
            )
            return _generator.generation_result(resp)
        callback, bar = _progress_callback(progress)
        try:
            assembler = _generator.StreamAssembler(callback)
            for event in self._t.stream(
                "generator", _generator.STUB, "GenerateStream", req, timeout=timeout
            ):
                assembler.feed(event)
            return assembler.finish()
        finally:
            if bar is not None:
                bar.close()


class AsyncClient:
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

    async def list_models(
        self,
        kind: str | None = None,
        *,
        name: str | None = None,
        all_versions: bool = False,
        timeout: float | None = None,
    ) -> list[ModelInfo]:
        pages, token = [], ""
        while True:
            req = _generator.list_models_request(kind, name, all_versions, token)
            resp = await self._t.unary(
                "generator", _generator.STUB, "ListModels", req, idempotent=True, timeout=timeout
            )
            pages.append(resp)
            token = resp.next_page_token
            if not token:
                return _generator.model_infos(pages)

    async def generate(
        self,
        model: str,
        *,
        progress: _generator.ProgressCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> GenerationResult:
        req = _generator.generate_request(model, **options)
        if progress is None:
            resp = await self._t.unary(
                "generator",
                _generator.STUB,
                "Generate",
                req,
                idempotent=req.HasField("seed"),
                timeout=timeout,
            )
            return _generator.generation_result(resp)
        assembler = _generator.StreamAssembler(progress)
        async for event in self._t.stream(
            "generator", _generator.STUB, "GenerateStream", req, timeout=timeout
        ):
            assembler.feed(event)
        return assembler.finish()


def _progress_callback(progress: Any) -> tuple[Any, Any]:
    """A user callback as is, or ``True`` → a tqdm bar over the denoising steps."""
    if callable(progress):
        return progress, None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", desc="generating")

    def update(event: Any) -> None:
        if event.total_steps and bar.total != event.total_steps:
            bar.total = event.total_steps
        if event.step > bar.n:
            bar.update(event.step - bar.n)

    return update, bar
