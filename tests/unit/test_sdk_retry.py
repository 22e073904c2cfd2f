"""The SDK's one retry loop honours google.rpc.RetryInfo, against a real in-process gRPC server.

The server refuses the first ``refusals`` calls with RESOURCE_EXHAUSTED carrying a RetryInfo
delay (what the services' admission control sends), then answers. The test measures, on the
server side, how long the SDK waited between attempts.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import clinisynth
from clinisynth import _transport
from clinisynth.v1 import common_pb2, generator_pb2, generator_pb2_grpc

ADVISED_S = 0.8  # well above the SDK's own first backoff (at most 0.1 s)


class Refusing(generator_pb2_grpc.GeneratorServiceServicer):
    """Refuses the first ``refusals`` calls with RESOURCE_EXHAUSTED + RetryInfo(delay)."""

    def __init__(self) -> None:
        self.refusals = 1
        self.delay_s = ADVISED_S
        self.arrivals: list[float] = []
        self._lock = threading.Lock()

    def _refuse_or_pass(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.arrivals.append(time.monotonic())
            refuse = len(self.arrivals) <= self.refusals
        if refuse:
            info = error_details_pb2.RetryInfo()
            info.retry_delay.FromNanoseconds(int(self.delay_s * 1e9))
            detail = any_pb2.Any()
            detail.Pack(info)
            status = status_pb2.Status(
                code=code_pb2.RESOURCE_EXHAUSTED, message="admission queue full", details=[detail]
            )
            context.abort_with_status(rpc_status.to_status(status))

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._refuse_or_pass(context)
        return common_pb2.ListModelsResponse(
            models=[common_pb2.ModelInfo(name="cells", version="1")]
        )

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._refuse_or_pass(context)
        return generator_pb2.GenerateResponse(request_id="r1")


@pytest.fixture
def server() -> Iterator[tuple[Refusing, str]]:
    servicer = Refusing()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        srv.stop(None)


def _gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(arrivals)]


def test_waits_the_advised_delay_before_retrying(server: tuple[Refusing, str]) -> None:
    servicer, address = server
    with clinisynth.Client(endpoints={"generator": address}, timeout=10) as client:
        models = client.list_models()
    assert [m.name for m in models] == ["cells"]
    assert len(servicer.arrivals) == 2
    # Lower bound: the advice (less 50 ms of timer slack); upper: advice + scheduling noise
    # on a loaded 2-core machine.
    assert ADVISED_S - 0.05 <= _gaps(servicer.arrivals)[0] < ADVISED_S + 1.5


def test_async_client_waits_the_advised_delay(server: tuple[Refusing, str]) -> None:
    servicer, address = server

    async def run() -> list[clinisynth.ModelInfo]:
        async with clinisynth.AsyncClient(endpoints={"generator": address}, timeout=10) as c:
            return await c.list_models()

    assert [m.name for m in asyncio.run(run())] == ["cells"]
    assert len(servicer.arrivals) == 2
    assert ADVISED_S - 0.05 <= _gaps(servicer.arrivals)[0] < ADVISED_S + 1.5


def test_advice_is_capped(server: tuple[Refusing, str], monkeypatch: pytest.MonkeyPatch) -> None:
    servicer, address = server
    servicer.delay_s = 5.0
    monkeypatch.setattr(_transport, "MAX_RETRY_DELAY_S", 0.3)
    with clinisynth.Client(endpoints={"generator": address}, timeout=10) as client:
        client.list_models()
    assert 0.25 <= _gaps(servicer.arrivals)[0] < 0.3 + 1.5


def test_advice_beyond_the_deadline_fails_at_once(server: tuple[Refusing, str]) -> None:
    servicer, address = server
    servicer.delay_s = 3600.0
    started = time.monotonic()
    with (
        clinisynth.Client(endpoints={"generator": address}, timeout=2) as client,
        pytest.raises(clinisynth.ResourceExhaustedError) as info,
    ):
        client.list_models()
    assert time.monotonic() - started < 1.5
    assert len(servicer.arrivals) == 1
    assert info.value.retry_delay == pytest.approx(3600.0)


def test_only_repeatable_generate_calls_wait_and_retry(server: tuple[Refusing, str]) -> None:
    """The declaration decides: a seeded generate repeats (after the advice), others don't."""
    servicer, address = server
    with (
        clinisynth.Client(endpoints={"generator": address}, timeout=10) as client,
        pytest.raises(clinisynth.ResourceExhaustedError),
    ):
        client.generate("cells")  # no seed: a repeat would make different images
    assert len(servicer.arrivals) == 1
    servicer.arrivals.clear()
    with clinisynth.Client(endpoints={"generator": address}, timeout=10) as client:
        assert client.generate("cells", seed=3).request_id == "r1"
    assert len(servicer.arrivals) == 2
    assert ADVISED_S - 0.05 <= _gaps(servicer.arrivals)[0] < ADVISED_S + 1.5
