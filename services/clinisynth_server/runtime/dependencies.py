"""The dependencies every service opens the same way: the artifact store and Triton.

A background thread checks both every few seconds and exports ``clinisynth_dependency_up``; the
calls themselves fail fast with UNAVAILABLE when a dependency is down (the store and the Triton
client map connection errors), so nothing hangs and nothing is half-done. Once the process binds
its health setter (:func:`bind_health`), the same check turns grpc.health.v1 NOT_SERVING while
Triton is down (every forward pass needs it) and SERVING again when it is back, so a load
balancer or the stack's probes stop sending work to a service that can only fail.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinisynth_server.errors import ClinisynthError, InvalidArgument
from clinisynth_server.runtime.config import ServiceConfig
from clinisynth_server.runtime.metrics import ServiceMetrics
from clinisynth_server.store import NUMBER_OPTIONS, open_store, parse_number
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.triton.client import TritonClient

log = logging.getLogger(__name__)
CHECK_INTERVAL_S = 2.0
# A probe of a hung dependency must not stall the check (the RPC timeout is far longer).
PROBE_TIMEOUT_S = 2.0
# Dependencies opened in this process, by the id of the config they were opened with (the
# config object is the one the server is started with, so the two meet again in bind_health).
_OPENED: weakref.WeakValueDictionary[int, Dependencies] = weakref.WeakValueDictionary()
STORE_OPTIONS = (
    "endpoint",
    "access_key",
    "secret_key",
    "region",
    "secure",
    "create_bucket",
    *NUMBER_OPTIONS,  # connect_timeout_s, read_timeout_s, retries
)


@dataclass
class Dependencies:
    config: ServiceConfig
    store: ArtifactStore
    triton: TritonClient
    metrics: ServiceMetrics | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _set_serving: Callable[[bool], None] | None = None
    _serving: bool | None = None

    @classmethod
    def open(cls, config: ServiceConfig, metrics: ServiceMetrics | None = None) -> Dependencies:
        # CLINISYNTH_<SERVICE>_STORE_<OPTION> overrides the shared CLINISYNTH_STORE_<OPTION>.
        options: dict[str, Any] = {  # strings from the environment; "secure" becomes a bool
            key.removeprefix("store_"): value
            for key, value in config.extra.items()
            if key.startswith("store_") and key.removeprefix("store_") in STORE_OPTIONS
        }
        if "secure" in options:
            options["secure"] = options["secure"].lower() in ("1", "true", "yes")
        prefix = f"CLINISYNTH_{config.service.upper()}_STORE_"
        for name, kind in NUMBER_OPTIONS.items():
            if name in options:
                options[name] = parse_number(prefix + name.upper(), options[name], kind)
        store = open_store(config.store_url, **options)
        triton = TritonClient(
            config.triton_url,
            timeout_s=float(config.get("triton_timeout_s", "120")),
            key_file=config.triton_key_file or None,
        )
        deps = cls(config, store, triton, metrics)
        _OPENED[id(config)] = deps
        if metrics is not None:
            threading.Thread(target=deps._watch, daemon=True, name="dependency-check").start()
        return deps

    def check(self) -> dict[str, bool]:
        up = {}
        try:
            self.store.ping()
            up["store"] = True
        except ClinisynthError:
            up["store"] = False
        try:
            up["triton"] = bool(self.triton.is_ready(timeout_s=PROBE_TIMEOUT_S))
        except ClinisynthError:
            up["triton"] = False
        return up

    def bind_health(self, set_serving: Callable[[bool], None]) -> None:
        """Let the dependency check drive the service's grpc.health.v1 status."""
        self._set_serving = set_serving
        self._serving = None

    def _watch(self) -> None:
        assert self.metrics is not None
        gauge = self.metrics.grpc.dependency_up
        while not self._stop.is_set():
            up = self.check()
            for name, ok in up.items():
                gauge.labels(self.config.service, name).set(1 if ok else 0)
            self._update_health(up["triton"])
            self._stop.wait(CHECK_INTERVAL_S)

    def _update_health(self, serving: bool) -> None:
        setter = self._set_serving
        if setter is None or self._stop.is_set() or serving == self._serving:
            return
        if self._serving is not None or not serving:  # the first SERVING is the server's own
            log.warning(
                "triton %s: health %s",
                "is back" if serving else "is down",
                "SERVING" if serving else "NOT_SERVING",
            )
        self._serving = serving
        try:
            setter(serving)
        except Exception:  # a health update must never end the check
            log.exception("could not update the health status")

    def reward_scorer(self) -> Any:
        """A callable scoring images with a reward model in Triton (for reward-filtered
        generation), or one that explains why it cannot."""

        def score(
            images: np.ndarray, condition: str, model: str, version: str, *, catalog: Any = None
        ) -> np.ndarray:
            try:
                from clinisynth_server.reward.scoring import score_arrays
            except ImportError as exc:
                raise InvalidArgument.for_field(
                    "reward_filter", "reward scoring is not available in this build"
                ) from exc
            from clinisynth_server.catalog import Catalog

            # The caller's view of the catalog: the default reward model is one it may see.
            view = catalog if catalog is not None else Catalog(self.store)
            return score_arrays(view, self.triton, images, condition, model=model, version=version)

        return score

    def close(self) -> None:
        self._stop.set()
        self._set_serving = None
        self.triton.close()
        self.store.close()


def opened_for(config: ServiceConfig) -> Dependencies | None:
    """The dependencies a service's ``register`` opened with ``config`` (None: it opened none)."""
    return _OPENED.get(id(config))


def bind_health(config: ServiceConfig, set_serving: Callable[[bool], None]) -> bool:
    """Hand the health setter of the server started with ``config`` to its dependencies (the
    server's ``set_serving``); False when this process opened none for that config."""
    deps = opened_for(config)
    if deps is None:
        return False
    deps.bind_health(set_serving)
    return True
