"""``clinisynth-serve <service>``: run one service process until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import importlib
import sys

from clinisynth_server.runtime.config import SERVICES, load_config
from clinisynth_server.runtime.dependencies import bind_health
from clinisynth_server.runtime.logs import setup_logging
from clinisynth_server.runtime.server import run_forever, start_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinisynth-serve", description=__doc__)
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--port", type=int, help="gRPC port (0 = any free port)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 = any free port)")
    ns = parser.parse_args(argv)
    overrides = {}
    if ns.port is not None:
        overrides["port"] = ns.port
    if ns.metrics_port is not None:
        overrides["metrics_port"] = ns.metrics_port
    config = load_config(ns.service, **overrides)
    setup_logging(ns.service, config.log_format, config.log_level)
    app = importlib.import_module(f"clinisynth_server.{ns.service}.app")
    running = start_server(config, app.create(config))
    bind_health(config, running.set_serving)  # NOT_SERVING while Triton is down
    # One line the supervisor reads to learn the bound ports.
    print(f"READY {ns.service} grpc={running.port} metrics={running.metrics_port}", flush=True)
    run_forever(running)
    return 0


if __name__ == "__main__":
    sys.exit(main())
