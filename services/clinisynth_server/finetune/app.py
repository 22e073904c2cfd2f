"""Wiring of the finetune service: servicers registered on a server.

Not built yet: every RPC answers UNIMPLEMENTED (the generated base servicer), never a fake result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from clinisynth.v1 import finetune_pb2, finetune_pb2_grpc

from clinisynth_server.runtime.config import ServiceConfig
from clinisynth_server.runtime.metrics import ServiceMetrics

SERVICE_NAME = finetune_pb2.DESCRIPTOR.services_by_name["FinetuneService"].full_name


def create(config: ServiceConfig) -> Callable[[grpc.Server, ServiceMetrics], Sequence[str]]:
    def register(server: grpc.Server, metrics: ServiceMetrics) -> Sequence[str]:
        finetune_pb2_grpc.add_FinetuneServiceServicer_to_server(
            finetune_pb2_grpc.FinetuneServiceServicer(), server
        )
        return [SERVICE_NAME]

    return register
