"""Wiring of the reward service: store, Triton client, catalog, domain, servicer, review page.

Settings (``CLINISYNTH_REWARD_<KEY>``): ``http_port`` (review page, default 8080, 0 = any free
port), ``raters`` (comma list; when set, only these rater ids may submit), ``classes`` (extra
class names accepted for feedback besides the catalog's and the cell phantoms'),
``max_upload_bytes`` (default 4 MiB per image), ``review_order`` (the review queue's order:
``least_certain`` — the default —, ``disagreement`` or ``random``), ``refresh_interval_s``
(how often the queue and agreement look for other replicas' writes, default 2). On start
the service prints one line ``REVIEW http://<host>:<port>/review`` (the stack supervisor
reads it for ``review_url``); ``https://`` when the service has a TLS certificate, which the page
serves too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

import grpc

from clinisynth.v1 import reward_pb2
from clinisynth_server.catalog import Catalog
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.pacs.config import load_destinations
from clinisynth_server.pacs.fetch import PacsReader
from clinisynth_server.reward.queue import strategy_named
from clinisynth_server.reward.service import DEFAULT_REFRESH_S, Reward
from clinisynth_server.reward.servicer import RewardServicer
from clinisynth_server.reward.web import ReviewWeb
from clinisynth_server.runtime.audit import AuditLog
from clinisynth_server.runtime.auth import authenticator_for
from clinisynth_server.runtime.config import ServiceConfig
from clinisynth_server.runtime.dependencies import Dependencies
from clinisynth_server.runtime.metrics import ServiceMetrics
from clinisynth_server.runtime.server import when_stopped

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
DEFAULT_HTTP_PORT = 8080
log = logging.getLogger(__name__)


def _float(config: ServiceConfig, key: str, default: float) -> float:
    raw = config.get(key, str(default))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise InvalidArgument.for_field(
            f"CLINISYNTH_REWARD_{key.upper()}", f"a number of seconds >= 0, got {raw!r}"
        )
    return value


def _list(config: ServiceConfig, key: str) -> list[str]:
    return [x.strip() for x in config.get(key).split(",") if x.strip()]


class RewardApp:
    """What ``create`` built, kept on the register function (tests and tools reach it there)."""

    reward: Reward | None = None
    web: ReviewWeb | None = None


def create(config: ServiceConfig) -> Callable[[grpc.Server, ServiceMetrics], Sequence[str]]:
    app = RewardApp()

    def register(server: grpc.Server, metrics: ServiceMetrics) -> Sequence[str]:
        from clinisynth.v1 import reward_pb2_grpc

        deps = Dependencies.open(config, metrics)
        catalog = Catalog(deps.store, metrics=metrics)
        reward = Reward(
            catalog,
            deps.triton,
            deps.store,
            metrics=metrics.reward,
            raters=_list(config, "raters"),
            classes=_list(config, "classes"),
            max_upload_bytes=config.get_int("max_upload_bytes", 4 * 1024 * 1024),
            max_request_pixels=config.max_request_pixels,
            review_order=strategy_named(
                config.get("review_order"), "CLINISYNTH_REWARD_REVIEW_ORDER"
            ),
            refresh_interval_s=_float(config, "refresh_interval_s", DEFAULT_REFRESH_S),
            pacs=PacsReader(load_destinations(config.config_file), deps.store),
        )
        reward_pb2_grpc.add_RewardServiceServicer_to_server(
            RewardServicer(reward, catalog, deps.store), server
        )
        port = config.get_int("http_port", DEFAULT_HTTP_PORT)
        auth = authenticator_for(config)  # the page checks callers as gRPC does
        trail = AuditLog(config.service, deps.store, metrics.audit)  # the page's calls too
        tls = (config.tls_cert, config.tls_key)  # the page serves HTTPS with gRPC's certificate
        try:
            web = ReviewWeb(reward, config.host, port, auth, trail, *tls).start()
        except OSError:
            if "http_port" in config.extra:
                raise  # a port the operator chose: fail loudly
            log.warning("review page: port %s is taken; using a free port", port)
            web = ReviewWeb(reward, config.host, 0, auth, trail, *tls).start()
        app.reward, app.web = reward, web
        print(f"REVIEW {web.url}", flush=True)
        sys.stdout.flush()

        when_stopped(server, web.stop, "review-http")
        return [SERVICE_NAME]

    register.app = app  # type: ignore[attr-defined]  # a function attribute, read by tests
    return register
