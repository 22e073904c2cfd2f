"""Per-tenant quotas (token bucket, slots, config) and the fair gate, with an injected clock."""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from clinisynth_server.errors import Cancelled, InvalidArgument, ResourceExhausted
from clinisynth_server.runtime.quotas import (
    DEFAULT_SLOT_RETRY_S,
    JOB_RETRY_S,
    FairGate,
    Limits,
    QuotaConfig,
    Quotas,
    TokenBucket,
    load_quotas,
    parse_quotas,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _quotas(default: Limits | None = None, **tenants: Limits) -> tuple[Quotas, Clock, Counter]:
    clock = Clock()
    refusals = Counter("q_refusals_total", "", ["service", "limit"], registry=CollectorRegistry())
    config = QuotaConfig(default or Limits(), tenants)
    return Quotas(config, service="generator", clock=clock, refusals=refusals), clock, refusals


def _refused(refusals: Counter, limit: str) -> float:
    return refusals.labels("generator", limit)._value.get()


# --- config -------------------------------------------------------------------------------------


def test_nothing_configured_is_unlimited(tmp_path: pathlib.Path) -> None:
    assert load_quotas("") == QuotaConfig()
    (tmp_path / "c.toml").write_text('[pacs.x]\ndicomweb_url = "http://h"\n')
    config = load_quotas(str(tmp_path / "c.toml"))
    assert config.for_tenant("anyone") == Limits()
    quotas = Quotas(config)
    for _ in range(1000):
        with quotas.generation("anyone", 64):
            pass
    quotas.check_jobs("anyone", 10**6)


def test_tenant_tables_override_the_default_key_by_key(tmp_path: pathlib.Path) -> None:
    (tmp_path / "c.toml").write_text(
        "[quotas.default]\nimages_per_minute = 100\nconcurrent_generations = 4\n"
        '[quotas.tenant."ward-3"]\nconcurrent_generations = 1\nconcurrent_jobs = 2\n'
    )
    config = load_quotas(str(tmp_path / "c.toml"))
    assert config.for_tenant("other") == Limits(images_per_minute=100, concurrent_generations=4)
    assert config.for_tenant("ward-3") == Limits(
        images_per_minute=100, concurrent_generations=1, concurrent_jobs=2
    )


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"default": {"images_per_minute": 0}}, "quotas.default.images_per_minute"),
        ({"default": {"concurrent_jobs": 1.5}}, "quotas.default.concurrent_jobs"),
        ({"default": {"concurrent_generations": True}}, "quotas.default.concurrent_generations"),
        ({"default": {"images_per_hour": 3}}, "quotas.default"),
        ({"tenant": {"a": {"concurrent_jobs": -1}}}, "quotas.tenant.a.concurrent_jobs"),
        ({"tenant": {"a": 3}}, "quotas.tenant.a"),
        ({"tenants": {}}, "quotas"),
    ],
)
def test_bad_config_names_the_setting(table: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_quotas(table)
    assert err.value.violations[0].field == field


# --- token bucket -------------------------------------------------------------------------------


def test_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=4.0, clock=clock)
    assert bucket.take(4) == 0.0
    assert bucket.take(1) == pytest.approx(0.5)  # one token comes in 1 / rate seconds
    assert bucket.take(3) == pytest.approx(1.5)  # a refused take takes nothing
    clock.now += 1.5
    assert bucket.take(3) == 0.0
    clock.now += 100
    assert bucket.take(4) == 0.0 and bucket.take(1) > 0  # never more than the capacity


def test_images_per_minute_refuses_with_the_wait_until_enough_tokens() -> None:
    quotas, clock, refusals = _quotas(Limits(images_per_minute=60, images_burst=4))
    with quotas.generation("a", 3):
        pass
    with pytest.raises(ResourceExhausted) as err, quotas.generation("a", 3):
        pass
    e = err.value
    assert e.metadata["limit"] == "images_per_minute" and e.metadata["tenant"] == "a"
    assert float(e.metadata["retry_after_s"]) == pytest.approx(2.0)  # 2 tokens missing at 1/s
    assert "images_per_minute" in e.message and "'a'" in e.message
    assert _refused(refusals, "images_per_minute") == 1
    with quotas.generation("b", 4):  # another tenant has its own bucket
        pass
    clock.now += 2.0
    with quotas.generation("a", 3):
        pass


def test_images_are_given_back_when_the_generation_fails() -> None:
    quotas, _clock, _ = _quotas(Limits(images_per_minute=60, images_burst=4))
    with pytest.raises(RuntimeError), quotas.generation("a", 4):
        raise RuntimeError("triton went away")
    with quotas.generation("a", 4):  # the failed request's images came back
        pass


def test_more_images_than_the_burst_is_a_caller_error_not_a_wait() -> None:
    quotas, _clock, refusals = _quotas(Limits(images_per_minute=10))
    with pytest.raises(InvalidArgument) as err, quotas.generation("a", 11):
        pass
    assert err.value.violations[0].field == "num_images"
    assert _refused(refusals, "images_per_minute") == 0


# --- slots --------------------------------------------------------------------------------------


def test_concurrent_generations_refused_then_recovered_and_released_on_error() -> None:
    quotas, clock, refusals = _quotas(Limits(concurrent_generations=2))
    first = quotas.generation("a", 1)
    second = quotas.generation("a", 1)
    first.__enter__()
    second.__enter__()
    with pytest.raises(ResourceExhausted) as err, quotas.generation("a", 1):
        pass
    assert err.value.metadata["limit"] == "concurrent_generations"
    # No generation has finished yet: the default advice.
    assert float(err.value.metadata["retry_after_s"]) == pytest.approx(DEFAULT_SLOT_RETRY_S)
    with quotas.generation("b", 1):  # per tenant
        pass
    clock.now += 10.0
    first.__exit__(None, None, None)  # held 10 s
    # A failing call gives its slot back too.
    with pytest.raises(ValueError), quotas.generation("a", 1):
        raise ValueError("bad")
    clock.now += 4.0
    # Still one held, one free: taking it and one more is refused.
    with pytest.raises(ResourceExhausted), quotas.generation("a", 1), quotas.generation("a", 1):
        pass
    assert _refused(refusals, "concurrent_generations") == 2


def test_slot_retry_advice_is_mean_hold_minus_age_of_oldest() -> None:
    quotas, clock, _ = _quotas(Limits(concurrent_generations=1))
    for _ in range(3):
        with quotas.generation("a", 1):
            clock.now += 8.0  # every generation holds its slot 8 s
    holder = quotas.generation("a", 1)
    holder.__enter__()
    clock.now += 3.0
    with pytest.raises(ResourceExhausted) as err, quotas.generation("a", 1):
        pass
    assert float(err.value.metadata["retry_after_s"]) == pytest.approx(5.0)
    holder.__exit__(None, None, None)


def test_concurrent_jobs() -> None:
    quotas, _clock, refusals = _quotas(Limits(concurrent_jobs=2), big=Limits(concurrent_jobs=5))
    quotas.check_jobs("a", 1)
    with pytest.raises(ResourceExhausted) as err:
        quotas.check_jobs("a", 2)
    assert err.value.metadata == {
        "limit": "concurrent_jobs",
        "tenant": "a",
        "quota": "2",
        "retry_after_s": f"{JOB_RETRY_S:.3f}",
    }
    quotas.check_jobs("big", 4)
    assert refusals.labels("generator", "concurrent_jobs")._value.get() == 1


def test_the_empty_tenant_is_named_in_messages() -> None:
    quotas, _clock, _ = _quotas(Limits(concurrent_jobs=1))
    with pytest.raises(ResourceExhausted) as err:
        quotas.check_jobs("", 1)
    assert "(no tenant)" in err.value.message


# --- fair gate ----------------------------------------------------------------------------------


def _wait_until(cond: Callable[[], bool]) -> None:
    event = threading.Event()
    while not cond():
        event.wait(0.005)


def test_gate_serves_tenants_round_robin_not_fifo() -> None:
    gate = FairGate(1, poll_s=0.01)
    gate.acquire("a", lambda: None)  # the one slot is taken
    order: list[str] = []
    threads = []

    def waiter(name: str) -> None:
        with gate.held(name[0], lambda: None):
            order.append(name)

    # a floods first, then b arrives: FIFO would run all of a before b.
    queued = {"a": 0, "b": 0}
    for name in ["a1", "a2", "a3", "a4", "b1", "b2"]:
        t = threading.Thread(target=waiter, args=(name,))
        t.start()
        threads.append(t)
        queued[name[0]] += 1
        want = queued[name[0]]
        _wait_until(lambda t=name[0], n=want: gate.snapshot()[t][1] == n)  # in line, in order
    gate.release("a")
    for t in threads:
        t.join()
    assert order == ["a1", "b1", "a2", "b2", "a3", "a4"]
    assert gate.snapshot() == {}


def test_gate_waiter_that_gives_up_leaves_the_queue() -> None:
    gate = FairGate(1, poll_s=0.01)
    gate.acquire("a", lambda: None)
    stop = threading.Event()
    outcome: list[str] = []

    def check() -> None:
        if stop.is_set():
            raise Cancelled("the call was cancelled")

    def waiter() -> None:
        try:
            gate.acquire("b", check)
            outcome.append("entered")
        except Cancelled:
            outcome.append("cancelled")

    t = threading.Thread(target=waiter)
    t.start()
    _wait_until(lambda: gate.snapshot().get("b") == (0, 1))
    stop.set()
    t.join()
    assert outcome == ["cancelled"] and gate.snapshot() == {"a": (1, 0)}
    gate.release("a")
    gate.acquire("c", lambda: None)  # the freed slot was not lost to the cancelled waiter
    assert gate.snapshot() == {"c": (1, 0)}


def test_gate_with_no_slots_never_waits() -> None:
    gate = FairGate(0)
    for _ in range(50):
        gate.acquire("a", lambda: None)
    assert gate.snapshot() == {"a": (50, 0)}


# --- finetune: concurrent_jobs counted over the tenant's queued + running jobs ------------------


def test_finetune_concurrent_jobs_per_tenant_survive_a_restart(tmp_path: pathlib.Path) -> None:
    import numpy as np

    from clinisynth_lab.phantoms import datasets as layouts
    from clinisynth_server.catalog import Catalog
    from clinisynth_server.finetune.service import FinetuneService, Settings
    from clinisynth_server.store import open_store

    store = open_store(str(tmp_path / "store"))
    (tmp_path / "repo").mkdir()
    pixels = (np.arange(6 * 16 * 16, dtype=np.uint8) * 7).reshape(6, 16, 16)
    layouts.write_image_folder_to_store(store, "datasets/c", pixels, [0, 1] * 3, ["x", "y"])
    refusals = Counter("j_refusals_total", "", ["service", "limit"], registry=CollectorRegistry())

    def service() -> FinetuneService:  # no scheduler thread: jobs stay queued
        svc = FinetuneService(
            store,
            Catalog(store, ttl_s=0.0),
            None,
            None,
            Settings(model_repository=str(tmp_path / "repo")),
            quotas=Quotas(
                QuotaConfig(Limits(concurrent_jobs=1)), service="finetune", refusals=refusals
            ),
        )
        for record in svc.jobs.all():
            svc._records[record.id] = record
        return svc

    def create(svc: FinetuneService, tenant: str, request_id: str = "") -> str:
        params = {"max_steps": "2"}
        # both tenants train on one data set of tenant "": created as admins, who see it
        return svc.create(
            "classifier", "datasets/c", params, tenant=tenant, request_id=request_id, admin=True
        ).id

    svc = service()
    first = create(svc, "a", request_id="r1")
    with pytest.raises(ResourceExhausted) as err:
        create(svc, "a")
    assert err.value.metadata["limit"] == "concurrent_jobs" and err.value.metadata["tenant"] == "a"
    assert create(svc, "a", request_id="r1") == first  # a retry of the same create is no new job
    create(svc, "b")  # another tenant's count
    restarted = service()  # the tenant is in the job record, not only in memory
    with pytest.raises(ResourceExhausted):
        create(restarted, "a")
    restarted.cancel(first, tenant="a")  # a job that ended frees its slot
    create(restarted, "a")
    assert refusals.labels("finetune", "concurrent_jobs")._value.get() == 2
