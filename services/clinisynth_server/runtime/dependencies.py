"""The dependencies every service opens the same way: the artifact store and Triton.

A background thread checks both every few seconds and exports ``clinisynth_dependency_up``; the
calls themselves fail fast with UNAVAILABLE when a dependency is down (the store and the Triton
client map connection errors), so nothing hangs and nothing is half-done.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinisynth_server.errors import ClinisynthError, InvalidArgument
from clinisynth_server.runtime.config import ServiceConfig
from clinisynth_server.runtime.metrics import ServiceMetrics
from clinisynth_server.store import open_store
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.triton.client import TritonClient

log = logging.getLogger(__name__)
CHECK_INTERVAL_S = 5.0
STORE_OPTIONS = ("endpoint", "access_key", "secret_key", "region", "secure", "create_bucket")


@dataclass
class Dependencies:
    config: ServiceConfig
    store: ArtifactStore
    triton: TritonClient
    metrics: ServiceMetrics | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def open(cls, config: ServiceConfig, metrics: ServiceMetrics | None = None) -> Dependencies:
        # CLINISYNTH_<SERVICE>_STORE_<OPTION> overrides the shared CLINISYNTH_STORE_<OPTION>.
        options = {
            key.removeprefix("store_"): value
            for key, value in config.extra.items()
            if key.startswith("store_") and key.removeprefix("store_") in STORE_OPTIONS
        }
        if "secure" in options:
            options["secure"] = options["secure"].lower() in ("1", "true", "yes")
        store = open_store(config.store_url, **options)
        triton = TritonClient(
            config.triton_url, timeout_s=float(config.get("triton_timeout_s", "120"))
        )
        deps = cls(config, store, triton, metrics)
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
            up["triton"] = bool(self.triton.is_ready())
        except ClinisynthError:
            up["triton"] = False
        return up

    def _watch(self) -> None:
        assert self.metrics is not None
        gauge = self.metrics.grpc.dependency_up
        while not self._stop.is_set():
            for name, ok in self.check().items():
                gauge.labels(self.config.service, name).set(1 if ok else 0)
            self._stop.wait(CHECK_INTERVAL_S)

    def reward_scorer(self) -> Any:
        """A callable scoring images with a reward model in Triton (for reward-filtered
        generation), or one that explains why it cannot."""

        def score(images: np.ndarray, condition: str, model: str, version: str) -> np.ndarray:
            try:
                from clinisynth_server.reward.scoring import score_arrays
            except ImportError as exc:
                raise InvalidArgument.for_field(
                    "reward_filter", "reward scoring is not available in this build"
                ) from exc
            from clinisynth_server.catalog import Catalog

            return score_arrays(
                Catalog(self.store), self.triton, images, condition, model=model, version=version
            )

        return score

    def close(self) -> None:
        self._stop.set()
        self.triton.close()
        self.store.close()
