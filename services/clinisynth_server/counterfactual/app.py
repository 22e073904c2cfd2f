"""Wiring of the counterfactual service: store, Triton client, catalog, domain, servicer.

Settings (``CLINISYNTH_COUNTERFACTUAL_<KEY>``): ``MODEL_REPOSITORY`` — the Triton model repository
folder; when set, guidance models for new denoiser + classifier combinations are written and
loaded on first use (see :mod:`.guidance`); ``INSTANCE_KIND`` — ``cpu`` (default) or ``gpu`` for
those models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from clinisynth.v1 import counterfactual_pb2, counterfactual_pb2_grpc
from clinisynth_server.catalog import Catalog
from clinisynth_server.counterfactual.service import Counterfactuals
from clinisynth_server.counterfactual.servicer import CounterfactualServicer
from clinisynth_server.pacs.outbox import open_outbox
from clinisynth_server.runtime.config import ServiceConfig
from clinisynth_server.runtime.dependencies import Dependencies
from clinisynth_server.runtime.metrics import ServiceMetrics
from clinisynth_server.runtime.server import when_stopped

SERVICE_NAME = counterfactual_pb2.DESCRIPTOR.services_by_name["CounterfactualService"].full_name


def create(config: ServiceConfig) -> Callable[[grpc.Server, ServiceMetrics], Sequence[str]]:
    def register(server: grpc.Server, metrics: ServiceMetrics) -> Sequence[str]:
        deps = Dependencies.open(config, metrics)
        catalog = Catalog(deps.store, metrics=metrics)
        outbox = open_outbox(config, deps.store, metrics.pacs)
        when_stopped(server, outbox.stop, "pacs-outbox")
        counterfactuals = Counterfactuals(
            catalog,
            deps.triton,
            deps.store,
            model_repository=config.get("model_repository") or None,
            instance_kind=config.get("instance_kind", "cpu"),
            metrics=metrics.counterfactual,
            outbox=outbox,
        )
        counterfactual_pb2_grpc.add_CounterfactualServiceServicer_to_server(
            CounterfactualServicer(counterfactuals, catalog, deps.store), server
        )
        return [SERVICE_NAME]

    return register
