"""Wiring of the reward service: servicers registered on a server.

Not built yet: every RPC answers UNIMPLEMENTED (the generated base servicer), never a fake result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from clinisynth.v1 import reward_pb2, reward_pb2_grpc

from clinisynth_server.runtime.config import ServiceConfig
from clinisynth_server.runtime.metrics import ServiceMetrics

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


def create(config: ServiceConfig) -> Callable[[grpc.Server, ServiceMetrics], Sequence[str]]:
    def register(server: grpc.Server, metrics: ServiceMetrics) -> Sequence[str]:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(
            reward_pb2_grpc.RewardServiceServicer(), server
        )
        return [SERVICE_NAME]

    return register
