"""grpc.health.v1 answers within a second while a real generator, on the session's Triton, has
more long generations in hand than it has threads: health runs on its own lane, never queued
behind model work, and the queued generations still all finish."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clinisynth.v1 import common_pb2, generator_pb2, generator_pb2_grpc

pytestmark = pytest.mark.stack

WORKERS = 2
CALLS = 8  # 2 run, 6 wait their turn


@pytest.fixture()
def busy_generator(triton_server, store_url, session_dir, registered_models):
    from conftest import start_service

    running = start_service(
        "generator",
        triton_server.grpc_url,
        store_url,
        session_dir / "busy-generator",
        workers=str(WORKERS),
    )
    yield running
    running.stop(0)


def test_health_within_a_second_while_generations_queue(busy_generator):
    request = generator_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name="cells-tiny"),
        class_name="neutrophil",
        seed=1,
        steps=400,
        format=common_pb2.IMAGE_FORMAT_RAW,
    )
    with grpc.insecure_channel(busy_generator.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)  # connected before the load
        generate = generator_pb2_grpc.GeneratorServiceStub(channel).Generate
        t0 = time.perf_counter()
        calls = [generate.future(request, timeout=600) for _ in range(CALLS)]
        first = calls[0].result()  # one generation's length: how long a queued call waits
        one_call_s = time.perf_counter() - t0
        latencies = []
        for _ in range(6):
            started = time.perf_counter()
            resp = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            latencies.append(time.perf_counter() - started)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.1)
        still_queued = sum(not c.done() for c in calls)
        results = [first] + [c.result() for c in calls[1:]]
    # The probes ran while calls still waited behind busy threads; before, each probe queued
    # behind them too and took about a generation's length (here several seconds).
    assert still_queued > WORKERS, (still_queued, one_call_s)
    assert one_call_s > 1.0, "generations too short to show queueing"
    assert max(latencies) < 1.0, latencies
    assert all(len(r.images) == 1 for r in results)  # every queued call was served


WATCHES = 8  # more than the control lane's threads: an open watch must hold none


def test_health_watch_streams_answer_within_a_second_while_generations_queue(busy_generator):
    request = generator_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name="cells-tiny"),
        class_name="neutrophil",
        seed=2,
        steps=400,
        format=common_pb2.IMAGE_FORMAT_RAW,
    )
    with grpc.insecure_channel(busy_generator.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)  # connected before the load
        generate = generator_pb2_grpc.GeneratorServiceStub(channel).Generate
        calls = [generate.future(request, timeout=600) for _ in range(CALLS)]
        time.sleep(0.5)  # both work threads busy, the rest queued
        first_message, watches = [], []
        for _ in range(WATCHES):
            started = time.perf_counter()
            stream = health.Watch(health_pb2.HealthCheckRequest(), timeout=600)
            first = next(stream)
            first_message.append(time.perf_counter() - started)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            watches.append(stream)
        started = time.perf_counter()  # Check still answers with every watch open
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        check_s = time.perf_counter() - started
        still_queued = sum(not c.done() for c in calls)
        busy_generator.set_serving(False)  # every open watch is told at once
        updates = []
        for stream in watches:
            started = time.perf_counter()
            update = next(stream)
            updates.append(time.perf_counter() - started)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        busy_generator.set_serving(True)
        for stream in watches:
            stream.cancel()
        results = [c.result() for c in calls]
    # Before, Watch ran wrapped (blocking) on the work pool: its first message waited behind the
    # queued generations (a generation's length, seconds), and each open watch held a thread.
    assert still_queued > WORKERS, still_queued
    assert max(first_message) < 1.0, first_message
    assert check_s < 1.0, check_s
    assert max(updates) < 1.0, updates
    assert all(len(r.images) == 1 for r in results)  # the load itself was served
