"""Wiring of the generator service: store, Triton client, catalog, domain, servicer.

Quotas: the ``[quotas]`` tables of the config file (:mod:`~clinisynth_server.runtime.quotas`).
``generation_slots`` (``CLINISYNTH_GENERATOR_GENERATION_SLOTS``): generations sampling at once;
more wait in the fair gate, one queue per tenant served round-robin (0, the default: no gate).
``memorization_tries`` (``CLINISYNTH_GENERATOR_MEMORIZATION_TRIES``, default 3): samples per image
under ``memorization=regenerate`` before a near-copy fails the request.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import grpc

from clinisynth.v1 import generator_pb2, generator_pb2_grpc
from clinisynth_server.catalog import Catalog
from clinisynth_server.generator.service import Generator
from clinisynth_server.generator.servicer import GeneratorServicer
from clinisynth_server.pacs.outbox import open_outbox
from clinisynth_server.runtime.config import ServiceConfig, default_home
from clinisynth_server.runtime.dependencies import Dependencies
from clinisynth_server.runtime.metrics import ServiceMetrics
from clinisynth_server.runtime.quotas import FairGate, Quotas, load_quotas
from clinisynth_server.runtime.server import when_stopped

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


def generation_slots(config: ServiceConfig) -> int:
    return config.get_int("generation_slots", 0, minimum=0)


def create(config: ServiceConfig) -> Callable[[grpc.Server, ServiceMetrics], Sequence[str]]:
    def register(server: grpc.Server, metrics: ServiceMetrics) -> Sequence[str]:
        deps = Dependencies.open(config, metrics)
        catalog = Catalog(deps.store, metrics=metrics)
        outbox = open_outbox(config, deps.store, metrics.pacs)
        when_stopped(server, outbox.stop, "pacs-outbox")
        cache = pathlib.Path(config.get("cache_dir") or default_home() / "cache")
        generator = Generator(
            catalog,
            deps.triton,
            deps.store,
            cache_dir=cache,
            metrics=metrics.generator,
            reward_scorer=deps.reward_scorer(),
            outbox=outbox,
            quotas=Quotas(
                load_quotas(config.config_file),
                service=config.service,
                refusals=metrics.quota_refusals,
            ),
            gate=FairGate(generation_slots(config)),
            memorization_tries=config.get_int("memorization_tries", 3, minimum=1),
        )
        # an attribute on the function (mypy types functions without attributes): for tests
        register.generator = generator  # type: ignore[attr-defined]
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(
            GeneratorServicer(generator, catalog, deps.store, outbox), server
        )
        return [SERVICE_NAME]

    return register
