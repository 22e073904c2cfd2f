"""Per-tenant quotas and a fair admission gate. Domain code: no grpc here.

Limits (docs/OPERATIONS.md, "Quotas") come from the ``[quotas.default]`` and
``[quotas.tenant.NAME]`` tables of the ``CLINISYNTH_CONFIG`` file; a tenant's table overrides
the default key by key, and a key set nowhere is unlimited (nothing configured = no limits):

- ``images_per_minute``: a token bucket over generated images, refilled at that rate and
  holding at most ``images_burst`` tokens (default: one minute's worth); a request for n images
  takes n tokens, given back when the request fails;
- ``concurrent_generations``: Generate / GenerateStream calls of the tenant held at once;
- ``concurrent_jobs``: finetune jobs of the tenant queued or running.

A refusal is :class:`~clinisynth_server.errors.ResourceExhausted` naming the limit and the
tenant, with ``retry_after_s`` (the time until the bucket holds enough tokens, or an estimate of
when a slot frees) so the caller gets RESOURCE_EXHAUSTED with ``google.rpc.RetryInfo``.

:class:`FairGate` is the generator's fair share: at most ``slots`` generations sample at once and
the rest wait in one queue per tenant, served round-robin, so one tenant's flood queues behind
itself instead of in front of everyone else.
"""

from __future__ import annotations

import pathlib
import threading
import time
import tomllib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from clinisynth_server.errors import InvalidArgument, ResourceExhausted

Clock = Callable[[], float]
# A refusal's retry advice when nothing better is known (no generation has finished yet).
DEFAULT_SLOT_RETRY_S = 1.0
# Finetune jobs last minutes to hours: when one frees its slot cannot be predicted.
JOB_RETRY_S = 60.0
MIN_RETRY_S = 0.01
# Weight of the newest hold duration in the running mean of how long a slot is held.
EWMA_WEIGHT = 0.3
LIMITS = ("images_per_minute", "images_burst", "concurrent_generations", "concurrent_jobs")


class RefusalCounter(Protocol):
    """What :class:`Quotas` counts refusals with (``clinisynth_quota_refusals_total``)."""

    def labels(self, *values: str) -> Any: ...


@dataclass(frozen=True)
class Limits:
    """One tenant's limits; ``None`` = unlimited."""

    images_per_minute: float | None = None
    images_burst: float | None = None
    concurrent_generations: int | None = None
    concurrent_jobs: int | None = None

    def over(self, base: Limits) -> Limits:
        """These limits where set, ``base``'s elsewhere."""
        return replace(
            base,
            **{
                f.name: getattr(self, f.name)
                for f in fields(self)
                if getattr(self, f.name) is not None
            },
        )


@dataclass(frozen=True)
class QuotaConfig:
    default: Limits = field(default_factory=Limits)
    tenants: Mapping[str, Limits] = field(default_factory=dict)

    def for_tenant(self, tenant: str) -> Limits:
        own = self.tenants.get(tenant)
        return own.over(self.default) if own is not None else self.default


def _limits(table: Any, where: str) -> Limits:
    if not isinstance(table, Mapping):
        raise InvalidArgument.for_field(where, "must be a table")
    unknown = set(table) - set(LIMITS)
    if unknown:
        raise InvalidArgument.for_field(
            where, f"unknown keys {sorted(unknown)}; known {list(LIMITS)}"
        )

    def number(key: str) -> float | None:
        raw = table.get(key)
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw <= 0:
            raise InvalidArgument.for_field(f"{where}.{key}", f"a positive number, got {raw!r}")
        return float(raw)

    def count(key: str) -> int | None:
        raw = table.get(key)
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
            raise InvalidArgument.for_field(f"{where}.{key}", f"a positive integer, got {raw!r}")
        return raw

    return Limits(
        images_per_minute=number("images_per_minute"),
        images_burst=number("images_burst"),
        concurrent_generations=count("concurrent_generations"),
        concurrent_jobs=count("concurrent_jobs"),
    )


def parse_quotas(table: Mapping[str, Any]) -> QuotaConfig:
    """Check a ``[quotas]`` table; errors name ``quotas.default.<key>`` / ``quotas.tenant.N``."""
    unknown = set(table) - {"default", "tenant"}
    if unknown:
        raise InvalidArgument.for_field(
            "quotas", f"unknown tables {sorted(unknown)}; known default, tenant"
        )
    default = _limits(table.get("default", {}), "quotas.default")
    tenants_table = table.get("tenant", {})
    if not isinstance(tenants_table, Mapping):
        raise InvalidArgument.for_field("quotas.tenant", "must be a table of tenants")
    tenants = {
        str(name): _limits(limits, f"quotas.tenant.{name}")
        for name, limits in tenants_table.items()
    }
    return QuotaConfig(default, tenants)


def load_quotas(config_file: str) -> QuotaConfig:
    """The ``[quotas]`` table of ``config_file``; no file or no table = unlimited."""
    if not config_file:
        return QuotaConfig()
    data = tomllib.loads(pathlib.Path(config_file).read_text())
    return parse_quotas(data.get("quotas", {}))


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` held; starts full."""

    def __init__(self, rate: float, capacity: float, clock: Clock) -> None:
        self.rate, self.capacity, self.clock = rate, capacity, clock
        self.tokens = capacity
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, n: float) -> float:
        """Take ``n`` tokens and return 0, or take none and return the seconds until ``n`` are
        there (``n`` must be at most ``capacity``)."""
        self._refill()
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate

    def give_back(self, n: float) -> None:
        self._refill()
        self.tokens = min(self.capacity, self.tokens + n)


class Slots:
    """At most ``limit`` holders; knows how long a slot is held on average (for retry advice)."""

    def __init__(self, limit: int, clock: Clock) -> None:
        self.limit, self.clock = limit, clock
        self._held: dict[int, float] = {}  # ticket → when taken
        self._next = 0
        self.mean_hold_s: float | None = None

    @property
    def held(self) -> int:
        return len(self._held)

    def try_take(self) -> int | None:
        """A ticket, or ``None`` when all ``limit`` slots are held."""
        if len(self._held) >= self.limit:
            return None
        self._next += 1
        self._held[self._next] = self.clock()
        return self._next

    def give_back(self, ticket: int) -> None:
        taken = self._held.pop(ticket, None)
        if taken is None:
            return
        held = max(self.clock() - taken, 0.0)
        mean = self.mean_hold_s
        self.mean_hold_s = held if mean is None else (1 - EWMA_WEIGHT) * mean + EWMA_WEIGHT * held

    def retry_after(self) -> float:
        """When the oldest holder is expected to finish, from the mean hold time."""
        if self.mean_hold_s is None or not self._held:
            return DEFAULT_SLOT_RETRY_S
        oldest = self.clock() - min(self._held.values())
        return max(self.mean_hold_s - oldest, MIN_RETRY_S)


def _tenant_name(tenant: str) -> str:
    return repr(tenant) if tenant else "(no tenant)"


class Quotas:
    """Enforces one service's per-tenant limits (thread-safe)."""

    def __init__(
        self,
        config: QuotaConfig | None = None,
        *,
        service: str = "",
        clock: Clock = time.monotonic,
        refusals: RefusalCounter | None = None,
    ) -> None:
        self.config = config or QuotaConfig()
        self.service = service
        self.clock = clock
        self.refusals = refusals
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self._slots: dict[str, Slots] = {}

    def _refuse(
        self, limit: str, tenant: str, value: float, why: str, retry_s: float
    ) -> ResourceExhausted:
        if self.refusals is not None:
            self.refusals.labels(self.service, limit).inc()
        retry_s = max(retry_s, MIN_RETRY_S)
        return ResourceExhausted(
            f"quota {limit} = {value:g} of tenant {_tenant_name(tenant)} exceeded: {why}; "
            f"retry in {retry_s:.2f} s",
            reason="QUOTA_EXCEEDED",
            metadata={
                "limit": limit,
                "tenant": tenant,
                "quota": f"{value:g}",
                "retry_after_s": f"{retry_s:.3f}",
            },
        )

    def _take_images(self, tenant: str, limits: Limits, n: int, field_name: str) -> bool:
        """Take ``n`` images from the tenant's bucket (True) or raise; False = no limit."""
        rate = limits.images_per_minute
        if rate is None:
            return False
        capacity = limits.images_burst or rate
        if n > capacity:  # can never fit: retrying will not help
            raise InvalidArgument.for_field(
                field_name,
                f"{n} images in one request; tenant {_tenant_name(tenant)} may have at most "
                f"{capacity:g} at once (quota images_per_minute = {rate:g})",
            )
        bucket = self._buckets.get(tenant)
        if bucket is None or (bucket.rate, bucket.capacity) != (rate / 60.0, capacity):
            bucket = self._buckets[tenant] = TokenBucket(rate / 60.0, capacity, self.clock)
        wait = bucket.take(n)
        if wait > 0:
            raise self._refuse(
                "images_per_minute",
                tenant,
                rate,
                f"{n} images asked, {bucket.tokens:.1f} left",
                wait,
            )
        return True

    @contextmanager
    def generation(
        self, tenant: str, images: int, field_name: str = "num_images"
    ) -> Iterator[None]:
        """Hold one ``concurrent_generations`` slot and ``images`` tokens for the ``with`` body.

        The slot is given back when the body ends, however it ends; the tokens are given back
        when it raises (no images were delivered).
        """
        limits = self.config.for_tenant(tenant)
        ticket: int | None = None
        with self._lock:
            slots = None
            if limits.concurrent_generations is not None:
                slots = self._slots.get(tenant)
                if slots is None:
                    slots = self._slots[tenant] = Slots(limits.concurrent_generations, self.clock)
                slots.limit = limits.concurrent_generations
                ticket = slots.try_take()
                if ticket is None:
                    raise self._refuse(
                        "concurrent_generations",
                        tenant,
                        slots.limit,
                        f"{slots.held} generations running",
                        slots.retry_after(),
                    )
            try:
                took = self._take_images(tenant, limits, images, field_name)
            except BaseException:
                if slots is not None and ticket is not None:
                    slots.give_back(ticket)
                raise
        try:
            yield
        except BaseException:
            if took:
                with self._lock:
                    self._buckets[tenant].give_back(images)
            raise
        finally:
            if slots is not None and ticket is not None:
                with self._lock:
                    slots.give_back(ticket)

    def check_jobs(self, tenant: str, active: int) -> None:
        """Refuse a new job when the tenant already has ``concurrent_jobs`` queued / running."""
        limit = self.config.for_tenant(tenant).concurrent_jobs
        if limit is not None and active >= limit:
            raise self._refuse(
                "concurrent_jobs", tenant, limit, f"{active} jobs queued or running", JOB_RETRY_S
            )


@dataclass
class _Ticket:
    granted: bool = False


class FairGate:
    """At most ``slots`` holders; waiters queue per tenant and are served round-robin.

    Tenants with waiters form a ring: a freed slot goes to the first tenant's oldest waiter and
    that tenant moves to the back, so n tenants with queued work each get every n-th slot
    whatever each has queued. ``slots`` 0 = no gate (everyone enters at once).
    """

    def __init__(self, slots: int, *, poll_s: float = 0.05) -> None:
        self.slots = slots
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._running: dict[str, int] = {}
        self._queues: OrderedDict[str, deque[_Ticket]] = OrderedDict()

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """tenant → (running, waiting)."""
        with self._cond:
            names = set(self._running) | set(self._queues)
            return {
                t: (self._running.get(t, 0), len(self._queues.get(t, ()))) for t in sorted(names)
            }

    def _enter_locked(self, tenant: str) -> None:
        self._running[tenant] = self._running.get(tenant, 0) + 1

    def _grant_locked(self) -> None:
        while self._queues and sum(self._running.values()) < self.slots:
            tenant, waiters = self._queues.popitem(last=False)
            waiters.popleft().granted = True
            self._enter_locked(tenant)
            if waiters:
                self._queues[tenant] = waiters  # to the back of the ring
        self._cond.notify_all()

    def acquire(self, tenant: str, check: Callable[[], None]) -> None:
        """Enter, waiting for a slot; ``check`` raises to stop waiting (cancel, deadline)."""
        with self._cond:
            if self.slots <= 0 or (not self._queues and sum(self._running.values()) < self.slots):
                self._enter_locked(tenant)
                return
            ticket = _Ticket()
            self._queues.setdefault(tenant, deque()).append(ticket)
            try:
                while not ticket.granted:
                    check()
                    self._cond.wait(self.poll_s)
            except BaseException:
                if ticket.granted:
                    self._release_locked(tenant)
                else:
                    waiters = self._queues.get(tenant)
                    if waiters is not None:
                        waiters.remove(ticket)
                        if not waiters:
                            del self._queues[tenant]
                raise

    def _release_locked(self, tenant: str) -> None:
        left = self._running.get(tenant, 0) - 1
        if left > 0:
            self._running[tenant] = left
        else:
            self._running.pop(tenant, None)
        self._grant_locked()

    def release(self, tenant: str) -> None:
        with self._cond:
            self._release_locked(tenant)

    @contextmanager
    def held(self, tenant: str, check: Callable[[], None]) -> Iterator[None]:
        self.acquire(tenant, check)
        try:
            yield
        finally:
            self.release(tenant)
