"""Per-tenant quotas and fair share through the real generator (JWT auth, real Triton, tiny model).

Two generator services share the session's Triton and store: one with quotas (a tenant limited
in images per minute, one limited to one generation at a time), one with a single sampling slot
(``generation_slots = 1``) where a flooding tenant and a light one compete. Assertions are on
codes, RetryInfo, counts and the ORDER of completions, never on wall time.
"""

from __future__ import annotations

import importlib
import pathlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from auth_helpers import Issuer

import clinisynth
from clinisynth.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from clinisynth_server.runtime.config import load_config
from clinisynth_server.runtime.server import start_server

pytestmark = pytest.mark.stack

MODEL = "cells-tiny"
QUOTAS = """
[quotas.tenant.rate]
images_per_minute = 30
images_burst = 2

[quotas.tenant.one]
concurrent_generations = 1
"""


def _start(triton_url: str, store_url: str, home: pathlib.Path, **extra: str) -> tuple[Any, Any]:
    """A generator in-process (as conftest.start_service) that also hands back its domain."""
    env = {
        "CLINISYNTH_TRITON_URL": triton_url,
        "CLINISYNTH_STORE_URL": store_url,
        "CLINISYNTH_GENERATOR_CACHE_DIR": str(home / "cache"),
    }
    env.update({f"CLINISYNTH_GENERATOR_{k.upper()}": v for k, v in extra.items()})
    config = load_config("generator", env=env, port=0, metrics_port=0)
    register = importlib.import_module("clinisynth_server.generator.app").create(config)
    running = start_server(config, register, serve_metrics=False)
    return running, register.generator


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def quota_server(
    triton_server: Any,
    store_url: str,
    registered_models: Any,
    issuer: Issuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    home = tmp_path_factory.mktemp("quotas")
    (home / "clinisynth.toml").write_text(QUOTAS)
    running, _ = _start(
        triton_server.grpc_url,
        store_url,
        home,
        config_file=str(home / "clinisynth.toml"),
        **issuer.settings(home),
    )
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def fair_server(
    triton_server: Any,
    store_url: str,
    registered_models: Any,
    issuer: Issuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, Any]]:
    home = tmp_path_factory.mktemp("fair")
    running, generator = _start(
        triton_server.grpc_url,
        store_url,
        home,
        generation_slots="1",
        workers="12",
        **issuer.settings(home),
    )
    yield running, generator
    running.stop(0)


def _client(server: Any, issuer: Issuer, tenant: str, *, retries: int) -> clinisynth.Client:
    token = issuer.token("requester", sub=f"user-{tenant}", clinisynth_tenant=tenant)
    return clinisynth.Client(
        endpoints={"generator": server.address}, token=token, timeout=120, retries=retries
    )


def _refusals(server: Any) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in server.metrics.registry.collect():
        if family.name == "clinisynth_quota_refusals":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _wait_until(cond: Callable[[], bool]) -> None:
    tick = threading.Event()
    for _ in range(6000):  # a safety net against a hang, not a timing assertion
        if cond():
            return
        tick.wait(0.01)
    raise AssertionError("the state waited for never came")


def test_images_per_minute_refuses_with_retry_info_and_the_sdk_waits_it_out(
    quota_server: Any, issuer: Issuer
) -> None:
    with _client(quota_server, issuer, "free", retries=0) as free:  # an unlimited tenant
        for seed in range(3):
            assert len(free.generate(MODEL, class_name="monocyte", n=2, seed=seed, steps=2)) == 2
    # 2 images at once, then 1 every 2 s: the second call right after the first is refused.
    with _client(quota_server, issuer, "rate", retries=0) as once:
        assert len(once.generate(MODEL, class_name="monocyte", n=2, seed=1, steps=2)) == 2
        with pytest.raises(clinisynth.ClinisynthError) as err:
            once.generate(MODEL, class_name="monocyte", n=2, seed=2, steps=2)
    e = err.value
    assert e.code == "RESOURCE_EXHAUSTED"
    assert e.retry_delay is not None and e.retry_delay > 0
    assert "images_per_minute" in str(e) and "'rate'" in str(e)
    # With retries on, the SDK honours RetryInfo and the same call goes through.
    with _client(quota_server, issuer, "rate", retries=3) as patient:
        assert len(patient.generate(MODEL, class_name="monocyte", n=2, seed=2, steps=2)) == 2
    refusals = _refusals(quota_server)
    key = (("limit", "images_per_minute"), ("service", "generator"))
    assert refusals[key] >= 1  # labelled by service and limit only: no tenant label
    # Never satisfiable (more than the burst in one request): the caller's error, by field.
    once = _client(quota_server, issuer, "rate", retries=0)
    with once, pytest.raises(clinisynth.ClinisynthError) as err:
        once.generate(MODEL, class_name="monocyte", n=3, seed=4, steps=2)
    assert err.value.code == "INVALID_ARGUMENT" and "num_images" in str(err.value)


def test_concurrent_generations_exhausted_then_recovered(quota_server: Any, issuer: Issuer) -> None:
    token = issuer.token("requester", sub="user-one", clinisynth_tenant="one")
    channel = grpc.insecure_channel(quota_server.address)
    stub = generator_pb2_grpc.GeneratorServiceStub(channel)
    request = generator_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name=MODEL), class_name="monocyte", steps=999, seed=5
    )
    holder = stub.GenerateStream(request, metadata=[("authorization", f"Bearer {token}")])
    try:
        first = next(holder)  # sampling: the tenant's one slot is held
        assert first.WhichOneof("event") == "progress"
        once = _client(quota_server, issuer, "one", retries=0)
        with once, pytest.raises(clinisynth.ClinisynthError) as err:
            once.generate(MODEL, class_name="monocyte", seed=6, steps=2)
        assert err.value.code == "RESOURCE_EXHAUSTED"
        assert err.value.retry_delay is not None and err.value.retry_delay > 0
        assert "concurrent_generations" in str(err.value) and "'one'" in str(err.value)
        with _client(quota_server, issuer, "other", retries=0) as other:  # its own slots
            assert len(other.generate(MODEL, class_name="monocyte", seed=6, steps=2)) == 1
    finally:
        holder.cancel()  # the cancelled call gives its slot back
        channel.close()
    with _client(quota_server, issuer, "one", retries=5) as patient:
        assert len(patient.generate(MODEL, class_name="monocyte", seed=6, steps=2)) == 1
        assert len(patient.generate(MODEL, class_name="monocyte", seed=7, steps=2)) == 1
    key = (("limit", "concurrent_generations"), ("service", "generator"))
    assert _refusals(quota_server)[key] >= 1


def test_a_flooding_tenant_does_not_starve_another(
    fair_server: tuple[Any, Any], issuer: Issuer
) -> None:
    server, generator = fair_server
    done: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def call(tenant: str, seed: int) -> None:
        try:
            with _client(server, issuer, tenant, retries=0) as client:
                client.generate(MODEL, class_name="neutrophil", seed=seed, steps=40)
            with lock:
                done.append(tenant)
        except BaseException as exc:  # reported below
            errors.append(exc)

    flood = [threading.Thread(target=call, args=("a", 100 + i)) for i in range(6)]
    for t in flood:
        t.start()

    def arrived(tenant: str, n: int) -> bool:
        running, waiting = generator.gate.snapshot().get(tenant, (0, 0))
        with lock:
            return running + waiting + done.count(tenant) == n or bool(errors)

    _wait_until(lambda: arrived("a", 6))  # all of a's calls are in the gate (or done)
    light = [threading.Thread(target=call, args=("b", 200 + i)) for i in range(2)]
    for t in light:
        t.start()
    for t in flood + light:
        t.join()
    assert not errors
    assert sorted(done) == ["a"] * 6 + ["b"] * 2
    # b's calls were served between a's (round-robin), not after a's whole queue (FIFO would
    # finish both last): at least two of a's calls finish after b's last one.
    last_b = max(i for i, tenant in enumerate(done) if tenant == "b")
    assert done[last_b + 1 :].count("a") >= 2, done
