"""Wiring of the generator service: store, Triton client, catalog, domain, servicer."""

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

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


def create(config: ServiceConfig) -> Callable[[grpc.Server, ServiceMetrics], Sequence[str]]:
    def register(server: grpc.Server, metrics: ServiceMetrics) -> Sequence[str]:
        deps = Dependencies.open(config, metrics)
        catalog = Catalog(deps.store, metrics=metrics)
        outbox = open_outbox(config, deps.store)
        cache = pathlib.Path(config.get("cache_dir") or default_home() / "cache")
        generator = Generator(
            catalog,
            deps.triton,
            deps.store,
            cache_dir=cache,
            metrics=metrics.generator,
            reward_scorer=deps.reward_scorer(),
            outbox=outbox,
        )
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(
            GeneratorServicer(generator, catalog, deps.store, outbox), server
        )
        return [SERVICE_NAME]

    return register
